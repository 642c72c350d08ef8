"""``acecal serve``: run the inference server (FastAPI + uvicorn)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

import typer

from acecal.cli.main import app

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@app.command("serve")
def serve(
    host: Optional[str] = typer.Option(
        None, help="Address to bind (default 127.0.0.1: this machine only). [env ACECAL_HOST]"
    ),
    port: Optional[int] = typer.Option(None, help="TCP port (default 8000). [env ACECAL_PORT]"),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="Results, temporary uploads and user models (default ~/.acecal). [env ACECAL_DATA_DIR]"
    ),
    models: Optional[List[Path]] = typer.Option(
        None,
        "--models",
        help="Folder of model bundles; repeat for several (default: the shipped models/). [env ACECAL_MODELS_DIRS]",
    ),
    api_key: Optional[str] = typer.Option(
        None,
        "--api-key",
        envvar="ACECAL_API_KEY",
        show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every endpoint but /health.",
    ),
    default_model: Optional[str] = typer.Option(
        None,
        "--default-model",
        help="Model run by POST /infer without a model id (default hippocampus-ace; when it is not served, the first "
        "model /models lists). [env ACECAL_DEFAULT_MODEL]",
    ),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N (default auto). [env ACECAL_DEVICE]"),
    max_upload_mb: Optional[float] = typer.Option(
        None, "--max-upload-mb", help="Upload size cap in MB (default 2048)."
    ),
    result_ttl_s: Optional[float] = typer.Option(
        None, "--result-ttl-s", help="Seconds results are kept (default 3600)."
    ),
    queue_size: Optional[int] = typer.Option(
        None, "--queue-size", help="Inference requests that may wait beyond the running ones; more get 503 (default 8)."
    ),
    max_voxels: Optional[int] = typer.Option(
        None,
        "--max-voxels",
        help="Voxel values an image may have, checked "
        "from its header (default: from this "
        "machine's memory). [env ACECAL_MAX_VOXELS]",
    ),
    max_model_voxels: Optional[int] = typer.Option(
        None,
        "--max-model-voxels",
        help="Voxels an image may have resampled to a model's spacing "
        "(default: from this machine's memory). "
        "[env ACECAL_MAX_MODEL_VOXELS]",
    ),
    log_level: str = typer.Option("info", help="uvicorn/acecal log level."),
) -> None:
    """Serve models over HTTP: /health, /models, /infer/{model_id}, /results/{id} (API docs at /docs)."""
    # torch boundary: the server (FastAPI, torch, MONAI) loads only when it is started, not for every acecal command
    import uvicorn

    from acecal.api.app import create_app
    from acecal.api.settings import Settings

    overrides: dict[str, Any] = {  # values pydantic checks and converts (an error is shown below)
        k: v
        for k, v in {
            "host": host,
            "port": port,
            "data_dir": data_dir,
            "models_dirs": models or None,
            "api_key": api_key,
            "default_model": default_model,
            "device": device,
            "max_upload_mb": max_upload_mb,
            "result_ttl_s": result_ttl_s,
            "queue_size": queue_size,
            "max_voxels": max_voxels,
            "max_model_voxels": max_model_voxels,
            "log_level": log_level,
        }.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValueError as e:  # pydantic's ValidationError: show it plainly
        typer.echo(f"invalid settings: {e}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.host not in _LOOPBACK and settings.api_key is None:
        typer.echo(
            f"warning: serving on {settings.host} without an API key: anyone who can reach this machine can "
            "use the server (set --api-key or ACECAL_API_KEY)",
            err=True,
        )
    application = create_app(settings)
    typer.echo(
        f"ACECal server on http://{settings.host}:{settings.port} (docs: /docs); models from "
        f"{', '.join(str(d) for d in settings.models_dirs)}; data in {settings.data_dir}"
    )
    uvicorn.run(application, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
