"""``acecal train`` and ``acecal evaluate``. The training code (torch, MONAI, pydantic) is imported inside the
commands, so the CLI starts on a client-only install."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from acecal.cli.main import EXIT_INTERRUPTED, app, fail
from acecal.errors import ACECalError
from acecal.formatting import number


def _ints(text: Optional[str], n: Optional[int] = None, what: str = "value") -> Optional[list[int]]:
    if text is None:
        return None
    try:
        vals = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be integers separated by commas, e.g. 64,64,32") from None
    if n is not None and len(vals) != n:
        raise typer.BadParameter(f"{what} needs {n} integers, got {text!r}")
    return vals


def _floats(text: Optional[str], n: int, what: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be numbers separated by commas") from None
    if len(vals) != n:
        raise typer.BadParameter(f"{what} needs {n} numbers, got {text!r}")
    return vals


def _name_values(items: Optional[list[str]], flag: str) -> dict[str, Any]:
    """NAME=VALUE pairs; VALUE is JSON when it parses (numbers, booleans, lists), else a string."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            fail(f"{flag} needs NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


@app.command(no_args_is_help=True)
def train(
    data: Optional[str] = typer.Argument(None, help="dataset.json, or a folder with dataset.json or images/ + labels/"),
    images: Optional[Path] = typer.Option(None, "--images", help="images folder (with --labels)"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="labels folder, same file names as the images"),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="settings file (JSON or YAML); flags override it"
    ),
    loss: Optional[str] = typer.Option(
        None,
        help="baseline_dice_ce | hardl1ace_dice_ce | softl1ace_dice_ce | "
        "labelsmooth_dice_ce | nacl_dice | dicepp_ce | "
        "twohead_dice_ce_softace | twohead_dice_ce_hardace (the last two "
        "with --network SegResNetTwoHead)",
    ),
    loss_param: Optional[list[str]] = typer.Option(None, "--loss-param", help="loss parameter NAME=VALUE (repeat)"),
    loss_warmup_epochs: Optional[int] = typer.Option(
        None,
        "--loss-warmup-epochs",
        help="train the first N epochs with baseline_dice_ce, then --loss (ACE after a Dice+CE warm-up) [0]",
    ),
    epochs: Optional[int] = typer.Option(None, help="total epochs [100]"),
    val_every: Optional[int] = typer.Option(None, help="validate every N epochs [10]"),
    val_fraction: Optional[float] = typer.Option(None, help="share of cases held out for validation [0.2]"),
    val_cases: Optional[str] = typer.Option(None, help="explicit validation case names, comma-separated"),
    seed: Optional[int] = typer.Option(None, help="random seed (initialisation, sampling, split) [12345]"),
    batch_size: Optional[int] = typer.Option(None, help="volumes per step [2]"),
    num_samples: Optional[int] = typer.Option(None, help="patches per volume per step [2]"),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate [2e-4]"),
    weight_decay: Optional[float] = typer.Option(None),
    warmup_epochs: Optional[int] = typer.Option(None, help="warm-up epochs of the cosine schedule [2]"),
    roi: Optional[str] = typer.Option(None, help="sliding-window ROI (validation, inference), e.g. 64,64,64"),
    patch: Optional[str] = typer.Option(
        None,
        help="training patch size [the ROI]; keep it equal to the ROI with GroupNorm networks (see docs/training.md)",
    ),
    spacing: Optional[str] = typer.Option(None, help="model voxel spacing in mm, e.g. 1,1,1"),
    intensity: Optional[str] = typer.Option(None, help="zscore_nonzero | zscore | clip_scale"),
    network: Optional[str] = typer.Option(
        None,
        help="SegResNet | SegResNetDS | SegResNetTwoHead (segmentation + "
        "calibration head; train with a twohead_* loss)",
    ),
    network_arg: Optional[list[str]] = typer.Option(
        None,
        "--network-arg",
        help="network argument NAME=VALUE (repeat), e.g. trunk_grad=0 or calibration_blocks=2 for SegResNetTwoHead",
    ),
    tta: Optional[str] = typer.Option(
        None, "--tta", help="flip test-time augmentation stored in the bundle: none | axis_flips | all_flips [none]"
    ),
    init_filters: Optional[int] = typer.Option(None, help="network width [16]"),
    blocks_down: Optional[str] = typer.Option(None, help="encoder blocks per level, e.g. 1,2,2,4"),
    blocks_up: Optional[str] = typer.Option(None, help="decoder blocks per level (SegResNet), e.g. 1,1,1"),
    modality: Optional[str] = typer.Option(None, help="expected modality, recorded in the bundle [MRI]"),
    no_augment: bool = typer.Option(False, "--no-augment", help="no flips / intensity augmentation"),
    base: Optional[str] = typer.Option(None, "--base", help="fine-tune this bundle (id or folder)"),
    freeze_encoder: bool = typer.Option(False, "--freeze-encoder", help="fine-tuning: train the decoder only"),
    out: Optional[Path] = typer.Option(None, "--out", help="models folder to publish into [<data dir>/models]"),
    model_id: Optional[str] = typer.Option(None, "--id", help="new model id [generated]"),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="checkpoints and log [<data dir>/runs/<id>]"),
    log_file: Optional[Path] = typer.Option(
        None, "--log-file", help="JSON-lines progress log [<work dir>/train.jsonl]"
    ),
    resume: bool = typer.Option(False, "--resume", help="continue the run in the work dir (starts fresh if none)"),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="stop (resumable) after N epochs this sitting"),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="stop (resumable) after ~this many minutes"),
    fit_temperature: bool = typer.Option(False, "--fit-temperature", help="fit a temperature on the validation set"),
    half: bool = typer.Option(False, "--half", help="store float16 weights"),
    cpu_bf16: bool = typer.Option(
        False, "--cpu-bf16", help="bfloat16 autocast on CPUs with native bf16 (~2.5x faster)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing bundle with the same id"),
    no_publish: bool = typer.Option(
        False,
        "--no-publish",
        help="train (or extend) and keep the checkpoints only; a later --resume with more --epochs publishes",
    ),
    description: Optional[str] = typer.Option(None, help="one-line description for the card"),
    data_source: Optional[str] = typer.Option(None, help="data source text for the card"),
    data_licence: Optional[str] = typer.Option(None, help="data licence for the card"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N [cuda if available]"),
    num_workers: Optional[int] = typer.Option(None, help="data loader worker processes [0]"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Train (or, with --base, fine-tune) a SegResNet and publish it as a model bundle.

    Runs on several GPUs or nodes with torchrun: `torchrun --nproc_per_node 4 -m acecal.cli.main train ...`.
    Interrupted runs continue with --resume (same --id or --work-dir).
    """
    # lazy: pydantic and the training code (torch, MONAI) are the server extra
    from pydantic import ValidationError

    from acecal.training.config import TrainConfig
    from acecal.training.engine import Engine

    params = _name_values(loss_param, "--loss-param")
    net_args: dict[str, Any] = _name_values(network_arg, "--network-arg")
    if init_filters is not None:
        net_args["init_filters"] = init_filters
    if blocks_down is not None:
        net_args["blocks_down"] = _ints(blocks_down, what="--blocks-down")
    if blocks_up is not None:
        net_args["blocks_up"] = _ints(blocks_up, what="--blocks-up")
    settings: dict[str, Any] = {
        "data": data,
        "images": str(images) if images else None,
        "labels_dir": str(labels) if labels else None,
        "loss": loss,
        "loss_params": params or None,
        "loss_warmup_epochs": loss_warmup_epochs,
        "epochs": epochs,
        "val_every": val_every,
        "val_fraction": val_fraction,
        "val_cases": [v.strip() for v in val_cases.split(",")] if val_cases else None,
        "seed": seed,
        "batch_size": batch_size,
        "num_samples": num_samples,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup_epochs": warmup_epochs,
        "roi_size": _ints(roi, 3, "--roi"),
        "patch_size": _ints(patch, 3, "--patch"),
        "spacing": _floats(spacing, 3, "--spacing"),
        "modality": modality,
        "base": base,
        "out_dir": str(out) if out else None,
        "model_id": model_id,
        "work_dir": str(work_dir) if work_dir else None,
        "log_file": str(log_file) if log_file else None,
        "stop_after_epochs": stop_after,
        "time_limit_minutes": time_limit,
        "description": description,
        "data_source": data_source,
        "data_licence": data_licence,
        "device": device,
        "num_workers": num_workers,
        "num_threads": threads,
        "tta": tta,
    }
    for flag, key in (
        (no_augment, "augment"),
        (freeze_encoder, "freeze_encoder"),
        (resume, "resume"),
        (fit_temperature, "fit_temperature"),
        (half, "half_precision"),
        (overwrite, "overwrite"),
        (cpu_bf16, "cpu_bf16"),
        (no_publish, "publish"),
    ):
        if flag:
            settings[key] = False if key in ("augment", "publish") else True
    settings = {k: v for k, v in settings.items() if v is not None}
    settings["command"] = "acecal " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        if config is not None:
            if not config.is_file():
                fail(f"the config file {str(config)!r} does not exist")
            cfg = TrainConfig.from_file(config, **settings)
        else:
            cfg = TrainConfig(**settings)
        if intensity is not None or network is not None or net_args:
            upd: dict[str, Any] = {}
            if intensity is not None:
                upd["intensity"] = cfg.intensity.model_copy(update={"mode": intensity})
            if network is not None or net_args:
                upd["network"] = cfg.network.model_copy(
                    update={"name": network or cfg.network.name, "args": {**cfg.network.args, **net_args}}
                )
            cfg = TrainConfig.model_validate({**cfg.model_dump(), **{k: v.model_dump() for k, v in upd.items()}})
    except ValidationError as e:
        fail(
            "bad training settings:\n  "
            + "\n  ".join(f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in e.errors())
        )
    except (ValueError, OSError) as e:
        fail(str(e))

    main_rank = _is_main_rank()
    try:
        result = Engine(cfg, show_progress=False if quiet else None).run()
    except KeyboardInterrupt:
        if main_rank:
            typer.secho(f"interrupted; continue with --resume --id {cfg.model_id or '<id>'}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except ACECalError as e:
        fail(e.detail)
    if not main_rank:
        return
    if result.status == "published":
        m = result.metrics
        if m.get("dice") is not None:
            typer.echo(
                f"validation: dice {m['dice']:.4f}  ace {m['ace']:.4f}  ece {m['ece']:.4f}  mce {m['mce']:.4f}",
                err=True,
            )
        typer.echo(f"published model {result.model_id} at {result.bundle_path}", err=True)
        typer.echo(result.model_id)
    elif result.status == "stopped":
        typer.echo(
            f"stopped after epoch {result.epochs_done}/{result.epochs}; continue with: "
            f"acecal train ... --id {result.model_id} --resume (work dir {result.work_dir})",
            err=True,
        )
    elif result.status == "cancelled":
        typer.echo(f"cancelled at epoch {result.epochs_done}/{result.epochs}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    else:
        typer.echo(f"finished {result.epochs_done} epochs (not published); checkpoints in {result.work_dir}", err=True)


@app.command(no_args_is_help=True)
def evaluate(
    model: str = typer.Option(..., "--model", "-m", help="bundle id or folder"),
    images: Path = typer.Option(..., "--images", help="images folder"),
    labels: Path = typer.Option(..., "--labels", help="labels folder (same file names)"),
    out: Path = typer.Option(..., "--out", help="report folder (report.json, report.md, PNGs)"),
    raw: bool = typer.Option(
        False,
        "--raw",
        help="evaluate the network's own softmax (no post-hoc calibrator); default: the served probabilities",
    ),
    temperature: bool = typer.Option(
        False, "--temperature", help="insist on the bundle's post-hoc calibrator (an error if it has none)"
    ),
    roi_radius: float = typer.Option(
        3.0, "--roi-radius", min=0, max=50, help="error detection: foreground margin in voxel steps"
    ),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="also look up ids in this models folder"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda"),
    no_plots: bool = typer.Option(False, "--no-plots", help="skip the PNG figures"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Evaluate a model on a labelled folder as served: Dice, ACE (and its floor), ECE, MCE per case and per class,
    whether the flags find the errors, reliability figures."""
    try:
        # lazy: the evaluation loads torch, MONAI and SimpleITK (the server extra)
        from acecal.bundles import ModelRegistry
        from acecal.bundles.registry import default_data_dir, default_models_dir
        from acecal.training.evaluate import evaluate as run_evaluate

        dirs = ([models_dir] if models_dir else []) + [default_models_dir(), default_data_dir() / "models"]

        def show(e: dict) -> None:
            if not quiet:
                typer.echo(f"[{e['index']}/{e['total']}] {e['case']}", err=True)

        report = run_evaluate(
            model,
            images,
            labels,
            out,
            raw=raw,
            temperature=temperature,
            roi_radius=roi_radius,
            registry=ModelRegistry(dirs),
            device=device,
            plots=not no_plots,
            progress=show,
        )
    except ACECalError as e:
        fail(e.detail)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    a, mi, fl, ed = report["aggregate"], report["micro"], report["floor"], report["error_detection"]
    typer.echo(
        f"{report['model']}{' (raw)' if report['raw'] else ''}: {report['num_cases']} cases  "
        f"dice {number(a['dice'])}  ace {number(a['ace'])} (floor {number(fl['ace'])}, "
        f"removable {number(fl['removable_ace'])})  ece {number(a['ece'])}  mce {number(a['mce'])}  "
        f"micro ace {number(mi['ace'])}"
    )
    typer.echo(
        f"flags: auroc {number(ed['auroc'], 3)}  recall {number(ed['recall'], 3)}  "
        f"flagged/wrong {number(ed['flagged_over_wrong'], 2)}"
    )
    typer.echo(f"report: {Path(out) / 'report.json'}")
