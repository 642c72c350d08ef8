"""``acecal infer`` and ``acecal models``: headless use, through a server (``--server URL``) or in-process.

Both modes write the same outputs per image: ``OUT/<image name>/{labels,confidence,uncertainty,flags}.nrrd`` and
``summary.json`` (the inference reply of :class:`acecal.protocol.InferenceReply`, with ``files`` naming the local
files). Heavy modules (torch, monai, SimpleITK) are imported only for in-process inference, so ``--server`` works from
the light client install.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import stat
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from acecal.cli.main import app
from acecal.errors import ACECalError
from acecal.protocol import BACKGROUND_LABEL, SUMMARY_NAME, VOLUME_FILE_NAMES, InferenceReply, ModelInfo, image_stem

#: ``stage(text)``: what one image's inference is doing now (shown on the progress bar)
Stage = Callable[[str], None]
#: ``run(image, out_dir, stage)``: infer one image into ``out_dir``, in this process or on a server
Runner = Callable[[Path, Path, Stage], InferenceReply]


def regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (after symlinks), asked without opening it."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def case_name(path: Path) -> str:
    """The output folder's name for an image: its file name without the image ending."""
    stem = image_stem(path.name)
    return (stem if stem is not None else path.stem) or "image"


def _unique_dirs(images: List[Path], out: Path) -> list[Path]:
    seen: dict[str, int] = {}
    dirs = []
    for p in images:
        base = re.sub(r"[^\w.-]+", "_", case_name(p))
        n = seen.get(base, 0)
        seen[base] = n + 1
        dirs.append(out / (base if n == 0 else f"{base}_{n + 1}"))
    return dirs


def _params(
    threshold: Optional[float],
    overlap: Optional[float],
    no_calibrator: bool,
    band_mm: Optional[float],
    band_voxels: Optional[float],
    min_region_voxels: Optional[int],
    connectivity: Optional[int],
) -> dict[str, Any]:
    p: dict[str, Any] = {
        "uncertainty_threshold": threshold,
        "overlap": overlap,
        "band_mm": band_mm,
        "band_voxels": band_voxels,
        "min_region_voxels": min_region_voxels,
        "connectivity": connectivity,
    }
    p = {k: v for k, v in p.items() if v is not None}
    if no_calibrator:
        p["use_calibrator"] = False
    return p


@app.command("infer")
def infer(
    images: List[Path] = typer.Argument(..., help="Image files (.nii, .nii.gz, .nrrd, .mha)."),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="Model id (or, without --server, a bundle folder); with --server it defaults to the server's default "
        "model.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one sub-folder per image."),
    server: Optional[str] = typer.Option(
        None, "--server", "-s", envvar="ACECAL_SERVER", help="Server URL; without it inference runs in this process."
    ),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="ACECAL_API_KEY", show_envvar=True),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", help="Uncertainty threshold (default: the model's)."
    ),
    overlap: Optional[float] = typer.Option(None, help="Sliding-window overlap (default: the model's)."),
    no_calibrator: bool = typer.Option(
        False,
        "--no-calibrator",
        "--no-temperature",
        help="Serve the network's own softmax: do not apply the model's post-hoc calibrator (--no-temperature is "
        "its older name).",
    ),
    band_mm: Optional[float] = typer.Option(None, "--band-mm", help="Boundary band half-width in mm."),
    band_voxels: Optional[float] = typer.Option(None, "--band-voxels", help="Boundary band half-width in voxels."),
    min_region_voxels: Optional[int] = typer.Option(None, "--min-region-voxels", help="Drop smaller regions."),
    connectivity: Optional[int] = typer.Option(None, help="Region connectivity: 6, 18 or 26."),
    timeout: float = typer.Option(600.0, help="Read timeout in seconds for each server reply."),
    device: str = typer.Option("auto", help="In-process only: auto, cpu, cuda, cuda:N."),
    models_dir: Optional[List[Path]] = typer.Option(
        None,
        "--models",
        help="In-process only: bundle folders to search (default: shipped models/ and ~/.acecal/models).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Segment images: four volumes (labels, confidence, uncertainty, flags) and summary.json per image."""
    # lazy: rich loads only for the commands that draw (the CLI starts fast)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    params = _params(threshold, overlap, no_calibrator, band_mm, band_voxels, min_region_voxels, connectivity)
    missing = [str(p) for p in images if not p.exists()]
    if missing:
        console.print(f"[red]no such file(s): {', '.join(missing)}")
        raise typer.Exit(2)
    irregular = [str(p) for p in images if not regular_file(p)]
    if irregular:  # a FIFO or a device would block or never end: never opened
        console.print(f"[red]not regular file(s) (a folder, FIFO or device): {', '.join(irregular)}", highlight=False)
        raise typer.Exit(2)
    if not server and not model:
        console.print("[red]--model is needed without --server (a model id or a bundle folder)", highlight=False)
        raise typer.Exit(2)
    out.mkdir(parents=True, exist_ok=True)
    dirs = _unique_dirs(images, out)
    try:
        if server:
            run_one = _remote_runner(server, api_key, model, params, timeout, console.print)
        else:
            assert model is not None  # checked above
            run_one = _local_runner(model, params, device, models_dir)
    except ACECalError as e:  # unknown model, broken bundle, no default model
        console.print(f"[red]{e.detail}", highlight=False)
        raise typer.Exit(1) from None
    failures: list[tuple[Path, str]] = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=False,
    ) as bar:
        task = bar.add_task("images", total=len(images))
        for img, d in zip(images, dirs, strict=True):
            bar.update(task, description=f"{img.name}")

            def stage(text: str, _img: Path = img) -> None:
                bar.update(task, description=f"{_img.name}: {text}")

            try:
                summary = run_one(img, d, stage).summary
                bar.console.print(
                    f"{img.name} -> {d}  ({summary.region_count} uncertain region(s), "
                    f"{summary.uncertain_volume_ml:.2f} ml)",
                    highlight=False,
                )
            except ACECalError as e:
                failures.append((img, e.detail))
                bar.console.print(f"[red]{img.name}: {e.detail}", highlight=False)
                if getattr(e, "code", "") in ("unreachable", "timeout", "unauthorized", "model_not_found"):
                    break  # the same for every image: stop
            bar.advance(task)
        bar.update(task, description="images")
    if failures:
        console.print(f"[red]{len(failures)} of {len(images)} image(s) failed")
        raise typer.Exit(1)


def _remote_runner(
    server: str,
    api_key: Optional[str],
    model: Optional[str],
    params: dict[str, Any],
    timeout: float,
    say: Callable[[str], object],
) -> Runner:
    """``model`` None: the server's default model, asked once so that every image of the run gets the same one."""
    # lazy: requests loads only for the commands that talk to a server
    from acecal.client import ACEClient

    client = ACEClient(server, api_key=api_key, timeout=(10.0, timeout))
    if model is None:
        default = client.default_model()
        if default is None:
            raise ACECalError(
                f"the server at {client.base_url} names no default model (it has no model, or is older than default "
                "models): pass --model (acecal models --server lists them)"
            )
        model = default.id
        say(f"model: {model} (the server's default)")

    def run(img: Path, out_dir: Path, stage: Stage) -> InferenceReply:
        def progress(what: str, done: int, total: Optional[int]) -> None:
            pct = f" {100 * done / total:.0f}%" if total else ""
            stage(("uploading" if what == "upload" else what.replace(":", " ")) + pct)
            if what == "upload" and total and done >= total:
                stage("inferring on the server")

        res = client.infer(img, model, params=params, out_dir=out_dir, progress=progress)
        summary = dict(res.raw, files=dict(VOLUME_FILE_NAMES), source={"server": client.base_url, "image": str(img)})
        (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
        return res.reply

    return run


def _local_runner(model: str, params: dict[str, Any], device: str, models_dirs: Optional[List[Path]]) -> Runner:
    # torch boundary: in-process inference loads torch, MONAI and SimpleITK (the server extra)
    from acecal.bundles import ModelRegistry, default_data_dir, default_models_dir, resolve_bundle
    from acecal.inference.pipeline import InferenceOptions, run_inference, write_volumes
    from acecal.inference.predictor import Predictor, resolve_device

    registry = ModelRegistry([*(models_dirs or [default_models_dir()]), default_data_dir() / "models"])
    bundle = resolve_bundle(model, registry)
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    predictor = Predictor(bundle, dev)
    try:
        options = InferenceOptions(**params)
    except TypeError as e:  # pragma: no cover - options mirror the CLI flags
        raise ACECalError(str(e)) from None

    def run(img: Path, out_dir: Path, stage: Stage) -> InferenceReply:
        stage("inferring")
        output = run_inference(predictor, img, options)
        stage("writing")
        write_volumes(out_dir, output)
        summary = {
            "result_id": None,
            **output.report,
            "files": dict(VOLUME_FILE_NAMES),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"bundle": str(bundle.path), "device": str(dev), "image": str(img)},
        }
        reply = InferenceReply.from_json(summary)  # the same wire format as the server's reply
        (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
        return reply

    return run


@app.command("models")
def models(
    server: Optional[str] = typer.Option(
        None,
        "--server",
        "-s",
        envvar="ACECAL_SERVER",
        help="Server URL; without it, the local model folders are listed.",
    ),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="ACECAL_API_KEY", show_envvar=True),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    timeout: float = typer.Option(30.0, help="Read timeout in seconds."),
) -> None:
    """List the models a server (or this machine) offers."""
    # lazy: rich loads only for the commands that draw (the CLI starts fast)
    from rich.console import Console
    from rich.table import Table

    try:
        if server:
            # lazy: requests loads only for the commands that talk to a server
            from acecal.client import ACEClient

            with ACEClient(server, api_key=api_key, timeout=(10.0, timeout)) as c:
                rows = c.models()
        else:
            # lazy: bundles need pydantic (the server extra); --server works without it
            from acecal.bundles import ModelRegistry, default_data_dir, default_models_dir

            reg = ModelRegistry([default_models_dir(), default_data_dir() / "models"])
            rows = [ModelInfo.from_json(b.describe()) for b in reg.list()]
    except ACECalError as e:
        typer.echo(f"error: {e.detail}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"models": [m.to_json() for m in rows]}, indent=2))
        return
    marked = any(m.default for m in rows)
    table = Table(
        title=f"models on {server}" if server else "local models",
        caption="* the server's default model (run when a request names none)" if marked else None,
    )
    table.add_column("id", no_wrap=True, style="bold")
    for col in ("classes", "loss", "T", "threshold", "validation"):
        table.add_column(col)
    for m in rows:
        shown = ", ".join(
            f"{k} {m.metrics[k]:.3f}" for k in ("dice", "ece", "ace") if isinstance(m.metrics.get(k), (int, float))
        )
        classes = ", ".join(m.labels[k] for k in sorted(m.labels, key=int) if k != BACKGROUND_LABEL)
        table.add_row(
            f"{m.id} *" if m.default else m.id,
            classes,
            m.loss,
            "-" if m.temperature is None else f"{m.temperature:.3g}",
            "" if m.uncertainty_threshold is None else str(m.uncertainty_threshold),
            shown,
        )
    Console().print(table)
    if not rows:
        typer.echo("no models found", err=True)
