"""``acecal calibrate``: fit a post-hoc calibrator for ACE and publish a new bundle carrying it. torch is imported
inside the command, so the CLI starts on a client-only install."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from acecal.cli.main import EXIT_INTERRUPTED, app, fail
from acecal.errors import ACECalError
from acecal.formatting import number, signed_percent


def _settings(items: Optional[list[str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"--lts-param needs NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            raise typer.BadParameter(f"--lts-param {k}: {v!r} is not a number or true/false") from None
    return out


@app.command(no_args_is_help=True)
def calibrate(
    model: str = typer.Argument(..., help="bundle id or folder (its network is left unchanged)"),
    method: str = typer.Option(
        "ace-temperature",
        "--method",
        help="ace-temperature (one T minimising ACE) | local-temperature (LTS trained with the soft-binned ACE loss)",
    ),
    data: Optional[Path] = typer.Option(None, "--data", help="dataset.json (or a folder with images/ + labels/)"),
    images: Optional[Path] = typer.Option(None, "--images", help="images folder (instead of --data)"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="labels folder (with --images)"),
    cases: Optional[str] = typer.Option(
        None,
        "--cases",
        help="comma-separated case names to fit on; default: the bundle's own validation split (training.split.val)",
    ),
    model_id: Optional[str] = typer.Option(None, "--id", help="id of the new bundle (default MODEL-METHOD)"),
    out: Optional[Path] = typer.Option(
        None, "--out", help="folder for the new bundle (default: the data directory's models/)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a bundle with the same id"),
    lts_param: Optional[list[str]] = typer.Option(
        None,
        "--lts-param",
        help="local-temperature setting NAME=VALUE (repeatable): hidden, "
        "layers, dilation, use_image, epochs, lr, nll_weight, ...",
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the cross-fitting split into halves"),
    no_cache: bool = typer.Option(False, "--no-cache", help="do not cache the model-space logits"),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="also look up ids in this models folder"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Fit a calibrator on cases the network never trained on, measure it cross-fitted, publish a new bundle.

    The label map never changes (the calibrator divides the logits by a positive temperature per voxel). Prints the
    new bundle's id on stdout; the raw, cross-fitted and in-sample macro ACE go to stderr and into the card.
    """

    def say(msg: str) -> None:
        if not quiet:
            typer.echo(msg, err=True)

    try:
        # lazy: fitting a calibrator loads torch and MONAI (the server extra)
        import torch

        from acecal.bundles import ModelRegistry
        from acecal.bundles.registry import default_data_dir, default_models_dir
        from acecal.training.calibrate import calibrate_bundle
        from acecal.training.calibration_cases import default_cache_dir

        if threads:
            torch.set_num_threads(threads)
        dirs = ([models_dir] if models_dir else []) + [default_models_dir(), default_data_dir() / "models"]
        bundle, m = calibrate_bundle(
            model,
            method=method,
            data=data,
            images=images,
            labels=labels,
            cases=[c.strip() for c in cases.split(",") if c.strip()] if cases else None,
            out_dir=out or default_data_dir() / "models",
            model_id=model_id,
            overwrite=overwrite,
            settings=_settings(lts_param),
            seed=seed,
            cache_dir=None if no_cache else default_cache_dir(),
            registry=ModelRegistry(dirs),
            progress=say,
        )
    except ACECalError as e:
        fail(e.detail)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None

    raw, cf, ins = m["raw"], m["cross_fitted"], m["in_sample"]
    say(f"raw:                    dice {number(raw['dice'])}  macro ACE {number(raw['ace'])}")
    say(
        f"calibrated, cross-fitted: dice {number(cf['dice'])}  macro ACE {number(cf['ace'])}  "
        f"({signed_percent(cf['change_pct'])})"
    )
    say(
        f"calibrated, in-sample:    dice {number(ins['dice'])}  macro ACE {number(ins['ace'])}  "
        f"({signed_percent(ins['change_pct'])})"
    )
    say(f"published model {bundle.id} at {bundle.path}")
    typer.echo(bundle.id)
