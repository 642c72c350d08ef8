"""``acecal finetune``, ``acecal jobs``, ``acecal cancel``, ``acecal datasets``: fine-tuning through a server.

Everything goes through :class:`acecal.client.ACEClient` (requests only), so these commands work from the light
client install::

    MODEL=$(acecal finetune --server http://gpu-box:8000 --base hippocampus-softace \\
            --images my/images --labels my/labels --loss hardl1ace_dice_ce --epochs 20 --wait)

uploads the pairs as a dataset (each case checked by the server on arrival), starts a job, shows its progress with
the validation metrics, and prints the new model's id on stdout (the only thing on stdout, for scripts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional

import typer

from acecal.cli.main import app
from acecal.errors import ACECalError, ServerTimeoutError
from acecal.protocol import (
    DATASET_ID,
    DATASET_NUM_CASES,
    FINETUNE_LOSSES,
    JOB_ACCEPTED_ID,
    JOB_QUEUED,
    JOB_STATUSES,
    JOB_SUCCEEDED,
    JobInfo,
)

if TYPE_CHECKING:  # the client (requests) loads only for the commands that talk to a server
    from acecal.client import ACEClient

DEFAULT_SERVER = "http://127.0.0.1:8000"

_server_opt = typer.Option(
    DEFAULT_SERVER, "--server", "-s", envvar="ACECAL_SERVER", show_envvar=True, help="Server URL."
)
_key_opt = typer.Option(None, "--api-key", envvar="ACECAL_API_KEY", show_envvar=True, help="The server's API key.")
_timeout_opt = typer.Option(60.0, "--timeout", help="Read timeout in seconds for each server reply.")


def _client(server: str, api_key: Optional[str], timeout: float) -> ACEClient:
    # lazy: requests loads only for the commands that talk to a server
    from acecal.client import ACEClient

    return ACEClient(server, api_key=api_key, timeout=(10.0, timeout))


def _fail(e: Exception) -> NoReturn:
    typer.echo(f"error: {getattr(e, 'detail', None) or e}", err=True)
    raise typer.Exit(1)


def _n(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def _metrics_text(job: JobInfo) -> str:
    if not job.metrics:
        return ""
    text = f"loss {_n(job.metrics[-1].train_loss)}"
    val = job.last_validation()
    if val is not None:
        text += f"  val dice {_n(val.dice)} ace {_n(val.ace)} ece {_n(val.ece)} mce {_n(val.mce)}"
    return text


def _status_text(job: JobInfo) -> str:
    if job.status == JOB_QUEUED and job.queue_position:
        return f"{job.status} (position {job.queue_position})"
    return job.status


def follow_job(
    client: ACEClient, job_id: str, *, quiet: bool = False, timeout: Optional[float] = None
) -> dict[str, Any]:
    """Follow a job to its end with a progress bar (stderr); returns the final job."""
    # lazy: rich loads only for the commands that draw (the CLI starts fast)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    seen_epochs: set[int] = set()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        disable=quiet,
        transient=False,
    ) as bar:
        task = bar.add_task(job_id, total=1.0, metrics="")

        def update(reply: dict) -> None:
            job = JobInfo.from_json(reply)
            p = job.progress
            for m in job.metrics:
                if m.epoch not in seen_epochs:
                    seen_epochs.add(m.epoch)
                    if m.validated and not quiet:
                        bar.console.print(
                            f"epoch {m.epoch}/{p.epochs}: loss {_n(m.train_loss)}  val dice "
                            f"{_n(m.dice)} ace {_n(m.ace)} ece {_n(m.ece)} mce {_n(m.mce)}",
                            highlight=False,
                        )
            bar.update(
                task,
                completed=p.fraction,
                description=f"{_status_text(job)}: epoch {p.epoch}/{p.epochs}",
                metrics=_metrics_text(job),
            )

        return client.wait_job(job_id, timeout=timeout, on_update=update)


def _report_end(job: JobInfo) -> None:
    if job.status == JOB_SUCCEEDED:
        fm = job.final_metrics or {}
        typer.echo(
            f"job {job.id} succeeded: new model {job.model_id} (validation dice {_n(fm.get('dice'))}, "
            f"ace {_n(fm.get('ace'))}, ece {_n(fm.get('ece'))}, mce {_n(fm.get('mce'))})",
            err=True,
        )
        typer.echo(job.model_id or "")
        return
    typer.echo(f"job {job.id} {job.status}: {job.error or ''}", err=True)
    for line in job.log_tail:
        typer.echo(f"  | {line}", err=True)
    raise typer.Exit(1)


@app.command("finetune")
def finetune(
    base: str = typer.Option(..., "--base", "-b", help="Id of the model to fine-tune (see `acecal models`)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of images to upload."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Folder of label maps, same file names."),
    dataset: Optional[str] = typer.Option(
        None,
        "--dataset",
        "-d",
        help="Use a dataset already on the server instead of uploading (see `acecal datasets`).",
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="Name of the uploaded dataset (default: the images folder's name)."
    ),
    loss: str = typer.Option("hardl1ace_dice_ce", "--loss", help=f"Training loss: {', '.join(FINETUNE_LOSSES)}."),
    epochs: int = typer.Option(20, "--epochs", min=1, help="Training epochs."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default 5e-5)."),
    freeze_encoder: bool = typer.Option(False, "--freeze-encoder", help="Train the decoder only."),
    val_fraction: Optional[float] = typer.Option(
        None, "--val-fraction", help="Share of cases held out for validation (default 0.2, >= 1 case)."
    ),
    val_every: Optional[int] = typer.Option(None, "--val-every", help="Validate every N epochs."),
    fit_temperature: bool = typer.Option(False, "--fit-temperature", help="Fit a temperature on the validation cases."),
    model_id: Optional[str] = typer.Option(None, "--model-id", "--id", help="Id of the new model."),
    wait: bool = typer.Option(
        False,
        "--wait/--no-wait",
        help="Follow the job until it ends and print the new model id (else print the job id and return).",
    ),
    server: str = _server_opt,
    api_key: Optional[str] = _key_opt,
    timeout: float = _timeout_opt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Fine-tune a server's model on your labelled cases; the server publishes the result as a new model."""
    # lazy: rich loads only for the commands that draw (the CLI starts fast)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if loss not in FINETUNE_LOSSES:
        raise typer.BadParameter(
            f"unknown loss {loss!r}; choose one of {', '.join(FINETUNE_LOSSES)}", param_hint="--loss"
        )
    if dataset is None and (images is None or labels is None):
        raise typer.BadParameter("give --images and --labels (folders to upload) or --dataset (an uploaded one)")
    console = Console(stderr=True)
    client = _client(server, api_key, timeout)
    try:
        client.model(base)  # an unknown base fails before anything is uploaded
        if dataset is None:
            assert images is not None and labels is not None  # checked above
            with Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console, disable=quiet
            ) as bar:
                task = bar.add_task("uploading", total=None)

                def on_case(i: int, n: int, fname: str) -> None:
                    bar.update(task, total=n, completed=i, description=f"uploading {fname}")

                ds = client.upload_dataset(images, labels, name=name, model=base, on_case=on_case)
                bar.update(task, completed=ds[DATASET_NUM_CASES], description="uploaded")
            dataset = ds[DATASET_ID]
            console.print(f"dataset {dataset}: {ds[DATASET_NUM_CASES]} case(s) uploaded and checked", highlight=False)
        options = {
            "lr": lr,
            "freeze_encoder": freeze_encoder or None,
            "val_fraction": val_fraction,
            "val_every": val_every,
            "fit_temperature": fit_temperature or None,
            "model_id": model_id,
        }
        acc = client.finetune(base, dataset, loss=loss, epochs=epochs, **options)
        job_id = acc[JOB_ACCEPTED_ID]
        console.print(f"job {job_id} queued: {base} -> {acc['model_id']} ({loss}, {epochs} epoch(s))", highlight=False)
        if not wait:
            typer.echo(job_id)
            return
        try:
            job = JobInfo.from_json(follow_job(client, job_id, quiet=quiet))
        except KeyboardInterrupt:
            console.print(
                f"stopped following; the job goes on. Follow it with `acecal jobs {job_id} --follow`"
                f" or cancel it with `acecal cancel {job_id}`",
                highlight=False,
            )
            raise typer.Exit(130) from None
    except ACECalError as e:
        _fail(e)
    _report_end(job)


@app.command("jobs")
def jobs(
    job_id: Optional[str] = typer.Argument(None, help="Show this job in detail (default: list all jobs)."),
    status: Optional[str] = typer.Option(
        None, "--status", help=f"Only jobs in this state ({', '.join(JOB_STATUSES)})."
    ),
    follow: bool = typer.Option(False, "--follow", "-f", help="With JOB_ID: follow it until it ends."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    server: str = _server_opt,
    api_key: Optional[str] = _key_opt,
    timeout: float = _timeout_opt,
) -> None:
    """List the server's fine-tuning jobs, or show (and follow) one."""
    # lazy: rich loads only for the commands that draw (the CLI starts fast)
    from rich.console import Console
    from rich.table import Table

    client = _client(server, api_key, timeout)
    console = Console()
    try:
        if job_id is not None:
            reply = follow_job(client, job_id) if follow else client.job(job_id)
            if as_json:
                typer.echo(json.dumps(reply, indent=2))
                return
            job = JobInfo.from_json(reply)
            p = job.progress
            console.print(
                f"[bold]{job.id}[/bold]  {_status_text(job)}  epoch {p.epoch}/{p.epochs}  "
                f"{job.base_model} -> {job.target_model_id}  dataset {job.dataset}  loss {job.loss}",
                highlight=False,
            )
            if job.error:
                console.print(f"error: {job.error}", highlight=False)
            t = Table("epoch", "train loss", "dice", "ace", "ece", "mce", "s")
            for m in job.metrics:
                t.add_row(
                    str(m.epoch), _n(m.train_loss), _n(m.dice), _n(m.ace), _n(m.ece), _n(m.mce), f"{m.seconds or 0:.1f}"
                )
            if job.metrics:
                console.print(t)
            for line in job.log_tail:
                console.print(f"  | {line}", highlight=False, markup=False)
            if follow and job.status != JOB_SUCCEEDED:
                raise typer.Exit(1)
            return
        rows = client.jobs(status=status)
    except ACECalError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps({"jobs": rows}, indent=2))
        return
    table = Table(title=f"fine-tuning jobs on {client.base_url}")
    for col in ("job", "status", "epoch", "base -> model", "dataset", "loss", "last validation", "created"):
        table.add_column(col, no_wrap=col in ("job", "status"))
    for j in map(JobInfo.from_json, rows):
        val = j.last_validation()
        table.add_row(
            j.id,
            _status_text(j),
            f"{j.progress.epoch}/{j.epochs}",
            f"{j.base_model} -> {j.target_model_id}",
            str(j.dataset),
            str(j.loss),
            f"dice {_n(val.dice)} ace {_n(val.ace)}" if val else "-",
            str(j.created),
        )
    console.print(table)
    if not rows:
        typer.echo("no jobs", err=True)


@app.command("cancel")
def cancel(
    job_id: str = typer.Argument(..., help="The job to cancel."),
    wait: float = typer.Option(60.0, "--wait", help="Seconds to wait for the job to stop (0: don't wait)."),
    server: str = _server_opt,
    api_key: Optional[str] = _key_opt,
    timeout: float = _timeout_opt,
) -> None:
    """Cancel a fine-tuning job: a queued one never starts, a running one stops within seconds, nothing is
    published."""
    client = _client(server, api_key, timeout)
    try:
        job = JobInfo.from_json(client.cancel_job(job_id))
        if wait > 0 and not job.final:
            try:
                job = JobInfo.from_json(client.wait_job(job_id, timeout=wait, poll_s=5.0))
            except ServerTimeoutError:
                job = JobInfo.from_json(client.job(job_id))
    except ACECalError as e:
        _fail(e)
    typer.echo(f"job {job.id}: {job.status}" + (f" ({job.error})" if job.error else ""))
    if job.status == JOB_SUCCEEDED:
        typer.echo(f"the job had already finished: model {job.model_id} was published", err=True)


@app.command("datasets")
def datasets(
    dataset_id: Optional[str] = typer.Argument(None, help="Show this dataset's cases (default: list datasets)."),
    delete: bool = typer.Option(False, "--delete", help="Delete DATASET_ID and its files on the server."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    server: str = _server_opt,
    api_key: Optional[str] = _key_opt,
    timeout: float = _timeout_opt,
) -> None:
    """List the datasets stored on a server, show one, or delete one."""
    # lazy: rich loads only for the commands that draw (the CLI starts fast)
    from rich.console import Console
    from rich.table import Table

    client = _client(server, api_key, timeout)
    console = Console()
    try:
        if delete:
            if dataset_id is None:
                raise typer.BadParameter("--delete needs a DATASET_ID")
            client.delete_dataset(dataset_id)
            typer.echo(f"deleted dataset {dataset_id}")
            return
        if dataset_id is not None:
            ds = client.dataset(dataset_id)
            if as_json:
                typer.echo(json.dumps(ds, indent=2))
                return
            t = Table(
                "case",
                "name",
                "size",
                "spacing",
                "labels",
                title=f"{ds['id']}: {ds['name']}" + (f" (labels of {ds['model']})" if ds.get("model") else ""),
            )
            for c in ds["cases"]:
                t.add_row(
                    c["case_id"],
                    c["name"],
                    "x".join(map(str, c.get("size") or [])),
                    "x".join(f"{s:g}" for s in c.get("spacing") or []),
                    ", ".join(map(str, c.get("label_values") or [])),
                )
            console.print(t)
            return
        rows = client.datasets()
    except ACECalError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps({"datasets": rows}, indent=2))
        return
    t = Table("dataset", "name", "cases", "model", "created", title=f"datasets on {client.base_url}")
    for d in rows:
        t.add_row(d["id"], d["name"], str(d["num_cases"]), d.get("model") or "-", d["created"])
    console.print(t)
    if not rows:
        typer.echo("no datasets", err=True)
