"""The training / fine-tuning engine behind ``acecal train`` and the server's fine-tuning jobs.

::

    from acecal.training import Engine, TrainConfig
    result = Engine(TrainConfig(data="dataset.json", loss="hardl1ace_dice_ce", epochs=300),
                    progress=print, cancel=threading.Event()).run()
    result.status, result.bundle_path

A run, step by step (:meth:`Engine.run`): plan it (settings, base model, dataset, model space, losses, split: all
checked before a file is written), find the checkpoint to resume from, build the data loaders, build the model and
optimiser, restore the checkpoint's state, train epoch by epoch (one epoch, validation, checkpoint, the sitting's
limits), publish.

Determinism and resume: the network is initialised after ``monai.utils.set_determinism(seed)``; every epoch reseeds
the patch sampler, the data loader and the random transforms from ``(seed, epoch, rank)``, so an epoch's batches do not
depend on what ran before it. ``last.pt`` (model, optimizer, scheduler, AMP scaler, RNG states, epoch, history, best;
:mod:`acecal.training.checkpoints`) is written atomically after every epoch; resuming from it continues with
bit-identical weights to an uninterrupted run (same machine, same thread count).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from monai import transforms as mt
from monai.data import CacheDataset, DataLoader
from monai.losses import DeepSupervisionLoss
from monai.optimizers import WarmupCosineSchedule
from monai.utils import set_determinism
from torch.utils.data.distributed import DistributedSampler

from acecal.bundles import Bundle, BundleConfig, LossRecord, ModelRegistry, NetworkConfig, build_network, resolve_bundle
from acecal.bundles.registry import default_data_dir, default_models_dir
from acecal.data.datasets import Case, DatasetInfo, discover_dataset, split_cases, validate_cases
from acecal.data.transforms import IMAGE, LABEL, model_space_transforms
from acecal.errors import ACECalError, InvalidInputError
from acecal.losses.registry import LOSS_NAMES, TWO_HEAD_COUNTERPARTS, TWO_HEAD_LOSSES, build_loss
from acecal.networks import is_two_head
from acecal.protocol import (
    EVENT_EPOCH,
    EVENT_PUBLISHED,
    EVENT_START,
    EVENT_STOPPED,
    STOP_CANCELLED,
    STOP_SITTING_LIMIT,
    JobEvent,
)
from acecal.tensor_checks import plain_tensor
from acecal.training import ddp
from acecal.training.checkpoints import (
    BEST,
    CONFIG_SNAPSHOT,
    LAST,
    LOG_NAME,
    ResumeError,
    epoch_seed,
    resumable_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from acecal.training.config import TrainConfig
from acecal.training.progress import Cancelled, CancelToken, ProgressCallback, Reporter, is_cancelled
from acecal.training.publish import publish
from acecal.training.validation import case_items, reduce_pass, run_pass, summarise

__all__ = [
    "LAST",
    "BEST",
    "CONFIG_SNAPSHOT",
    "Engine",
    "ResumeError",
    "TrainResult",
    "check_loss_name",
    "check_patch_sizes",
    "encoder_modules",
    "freeze",
    "train",
    "train_transforms",
    "training_loss",
]


@dataclass
class TrainResult:
    """What a run did. ``status``: "published" (bundle written), "completed" (publish=False), "stopped" (sitting limit
    reached; resumable), "cancelled" (cancel token; resumable from the last finished epoch)."""

    status: str
    model_id: str
    work_dir: Path
    log_file: Optional[Path]
    epochs_done: int
    epochs: int
    bundle_path: Optional[Path] = None
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------------------------
# pieces


def encoder_modules(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The encoder of a MONAI SegResNet (``convInit`` + ``down_layers``) or SegResNetDS (``encoder``)."""
    encoder = getattr(net, "encoder", None)
    if isinstance(encoder, torch.nn.Module):
        return [encoder]
    down_layers = getattr(net, "down_layers", None)
    if isinstance(down_layers, torch.nn.Module):
        return [m for m in (getattr(net, "convInit", None), down_layers) if isinstance(m, torch.nn.Module)]
    raise InvalidInputError(f"don't know the encoder of a {type(net).__name__}; cannot freeze it")


def freeze(modules: list[torch.nn.Module]) -> int:
    """Stop the gradients of every parameter of ``modules``; returns how many values were frozen."""
    n = 0
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
            n += p.numel()
    return n


def check_loss_name(name: str) -> None:
    """Refuse a loss that is not in ``acecal.losses.registry.LOSS_NAMES`` (InvalidInputError)."""
    if name not in LOSS_NAMES:
        raise InvalidInputError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")


def training_loss(name: str, num_classes: int, params: dict) -> torch.nn.Module:
    """The training loss ``name`` with ``params`` over its defaults (:func:`acecal.losses.registry.build_loss`), a
    bad name or bad parameters reported as an InvalidInputError that names the loss."""
    check_loss_name(name)
    try:
        return build_loss(name, num_classes, **params)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"bad parameters for loss {name!r}: {e}") from None


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo; False where unknown)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_transforms(bc: BundleConfig, cfg: TrainConfig) -> mt.Compose:
    """Model space (shared with inference) + padding to the ROI + patch sampling + augmentation."""
    keys = [IMAGE, LABEL]
    patch = tuple(cfg.patch_size or bc.roi_size)
    chain = list(model_space_transforms(bc).transforms)
    chain += [
        mt.SpatialPadd(keys=keys, spatial_size=patch, mode="constant"),
        mt.RandCropByPosNegLabeld(
            keys=keys,
            label_key=LABEL,
            spatial_size=patch,
            pos=cfg.pos_fraction,
            neg=1.0 - cfg.pos_fraction,
            num_samples=cfg.num_samples,
            image_key=None,
            allow_smaller=False,
        ),
    ]
    if cfg.augment:
        chain += [
            mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            mt.RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=0.5),
            mt.RandShiftIntensityd(keys=IMAGE, offsets=0.1, prob=0.5),
        ]
    return mt.Compose(chain)


def check_patch_sizes(bc: BundleConfig, patch: tuple) -> None:
    """SegResNet halves the resolution len(blocks_down) - 1 times: ROI and patch must be divisible by 2**that."""
    levels = len(bc.network.args.get("blocks_down", (1, 2, 2, 4))) - 1
    f = 2 ** max(levels, 0)
    for what, size in (("ROI", tuple(bc.roi_size)), ("patch", patch)):
        if any(int(s) % f for s in size):
            raise InvalidInputError(
                f"the {what} size {'x'.join(map(str, size))} must be divisible by {f} for a "
                f"{bc.network.name} with {levels + 1} levels, e.g. "
                f"{'x'.join(str(-(-int(s) // f) * f) for s in size)}"
            )


def loss_for_network(loss: str, network: NetworkConfig) -> str:
    """The loss to fine-tune ``network`` with when ``loss`` was asked for: a one-head ACE loss becomes its two-head
    counterpart on a two-head network (:data:`acecal.losses.registry.TWO_HEAD_COUNTERPARTS`), anything else is
    ``loss`` (and :func:`check_heads` says whether it fits)."""
    return TWO_HEAD_COUNTERPARTS.get(loss, loss) if is_two_head(network) else loss


def check_heads(network: NetworkConfig, loss: str) -> None:
    """A two-head network (outputs 2C channels) trains with a two-head loss, and only with one."""
    if is_two_head(network) and loss not in TWO_HEAD_LOSSES:
        raise InvalidInputError(
            f"the {network.name} network has a segmentation and a calibration head: train it "
            f"with a two-head loss ({', '.join(TWO_HEAD_LOSSES)}; fine-tuning also takes "
            f"{' or '.join(TWO_HEAD_COUNTERPARTS)} for them), not {loss!r}"
        )
    if loss in TWO_HEAD_LOSSES and not is_two_head(network):
        raise InvalidInputError(
            f"the loss {loss!r} trains a two-head network: use --network SegResNetTwoHead "
            f"(the {network.name} network has one head)"
        )


def _model_space(cfg: TrainConfig, model_id: str, labels: dict[str, str], base: Optional[Bundle]) -> BundleConfig:
    """The new bundle's config before training: the base's model space when fine-tuning, else the settings'."""
    loss = LossRecord(name=cfg.loss, params=dict(cfg.loss_params))
    if base is not None:
        b = base.config
        return BundleConfig(
            id=model_id,
            description=cfg.description or f"{b.id} fine-tuned",
            network=b.network,
            labels=b.labels,
            in_channels=b.in_channels,
            modality=b.modality,
            spacing=b.spacing,
            orientation=b.orientation,
            intensity=b.intensity,
            roi_size=b.roi_size,
            sw_overlap=b.sw_overlap,
            sw_mode=b.sw_mode,
            sw_batch_size=b.sw_batch_size,
            loss=loss,
            parent=b.id,
            uncertainty_threshold=b.uncertainty_threshold,
            tta=b.tta,
        )
    return BundleConfig(
        id=model_id,
        description=cfg.description,
        network=cfg.network,
        labels=labels,
        in_channels=cfg.in_channels,
        modality=cfg.modality,
        spacing=cfg.spacing,
        orientation=cfg.orientation,
        intensity=cfg.intensity,
        roi_size=cfg.roi_size,
        sw_overlap=cfg.sw_overlap,
        sw_batch_size=cfg.sw_batch_size,
        loss=loss,
        tta=cfg.tta,
    )


def _loss_value(loss_fn: torch.nn.Module, out: Union[torch.Tensor, list], y: torch.Tensor) -> torch.Tensor:
    """The loss of one batch; a deep-supervision output (a list of heads) through MONAI's DeepSupervisionLoss."""
    if isinstance(out, (list, tuple)):
        # any loss module works (MONAI calls it per head); its annotation names torch's _Loss base
        return DeepSupervisionLoss(loss_fn, weight_mode="exp")(list(out), y.float())  # type: ignore[arg-type]
    return loss_fn(out, y)


# ------------------------------------------------------------------------------------------------------------------
# what the steps of one run share


@dataclass
class _Plan:
    """Everything decided before the run writes a file: where it goes, what it trains on, with which loss."""

    ctx: ddp.DistContext
    model_id: str
    work_dir: Path
    out_dir: Path
    log_file: Path
    base: Optional[Bundle]
    info: DatasetInfo
    bc: BundleConfig
    reporter: Reporter
    loss_fn: torch.nn.Module
    warmup_loss_fn: torch.nn.Module  # the first loss_warmup_epochs train with this one
    train_cases: list[Case]
    val_cases: list[Case]


@dataclass
class _Data:
    train_ds: CacheDataset
    sampler: DistributedSampler
    generator: torch.Generator
    loader: DataLoader
    val_ds: Any  # this rank's validation cases in model space (a CacheDataset, or [] when it has none)


@dataclass
class _Model:
    net: torch.nn.Module  # the network itself
    model: torch.nn.Module  # what trains: the network, or its DistributedDataParallel wrapper
    frozen: list[torch.nn.Module]
    opt: torch.optim.Optimizer
    sched: WarmupCosineSchedule
    scaler: torch.amp.GradScaler
    use_amp: bool  # CUDA mixed precision
    cpu_bf16: bool  # bfloat16 autocast on a CPU that computes it natively


@dataclass
class _Progress:
    """Where the run stands: restored from ``last.pt`` on resume."""

    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"dice": None, "epoch": None})


# ------------------------------------------------------------------------------------------------------------------


class Engine:
    """Train or fine-tune one model and publish it as a bundle.

    Args:
        config: the :class:`TrainConfig`.
        progress: called with each progress event (``JobEvent.to_json()``, see :mod:`acecal.training.progress`);
            rank 0 only.
        cancel: a ``threading.Event`` or a callable; checked every iteration and every validation case. When it fires
            the run stops within one iteration, keeps the last finished epoch's checkpoint and publishes nothing.
        show_progress: tqdm bar (default: when stderr is a terminal).
        registry: where to look up ``config.base`` by id (default: shipped models + the data directory's models).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        progress: Optional[ProgressCallback] = None,
        cancel: CancelToken = None,
        show_progress: Optional[bool] = None,
        registry: Optional[ModelRegistry] = None,
    ):
        self.cfg = config
        self.progress = progress
        self.cancel = cancel
        self.show_progress = show_progress
        self.registry = registry

    def run(self) -> TrainResult:
        ctx = ddp.setup(self.cfg.device)
        try:
            result = self._run(ctx)
            # every rank done with the group (and its DDP model gone) before any rank tears it down: a gloo rank
            # whose peer left mid-use aborts the process ("terminate called without an active exception")
            gc.collect()
            ctx.barrier()
            return result
        finally:
            ctx.close()

    def _run(self, ctx: ddp.DistContext) -> TrainResult:
        t_start = time.time()
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        plan = self._plan(ctx)
        state = self._checkpoint_to_resume(plan)
        data = self._data(plan)
        parts = self._model(plan)
        done = self._resume(parts, state)
        if ctx.distributed:
            parts.model = torch.nn.parallel.DistributedDataParallel(
                parts.net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
        result = self._train(plan, data, parts, done, resumed=state is not None, t_start=t_start)
        if result.status != "completed":
            return result
        result.seconds = time.time() - t_start
        return self._publish(plan, data, parts, done, result) if self.cfg.publish else result

    # -- 1. plan: every check that needs no file written ------------------------------------------------------------
    def _resolve_base(self) -> Optional[Bundle]:
        if not self.cfg.base:
            return None
        reg = self.registry or ModelRegistry([default_models_dir(), default_data_dir() / "models"])
        return resolve_bundle(self.cfg.base, reg)

    def _dataset(self, ctx: ddp.DistContext, base: Optional[Bundle]) -> tuple[DatasetInfo, dict[str, str]]:
        """The dataset and its labels, checked on rank 0 (every rank gets the same result or the same error)."""
        cfg = self.cfg
        err: Optional[BaseException] = None
        payload = None
        if ctx.is_main:
            try:
                info = discover_dataset(cfg.data, images=cfg.images, labels=cfg.labels_dir)
                labels = (base.config.labels if base else None) or cfg.labels or info.labels or None
                in_ch = base.config.in_channels if base else cfg.in_channels
                if labels is None:
                    summ = validate_cases(info.cases, 256, in_channels=in_ch)
                    top = max(max(s.label_values) for s in summ)
                    labels = {"0": "background", **{str(k): f"label_{k}" for k in range(1, top + 1)}}
                else:
                    BundleConfig(id="check", labels=labels)  # labels must be 0..N-1
                    validate_cases(info.cases, len(labels), in_channels=in_ch)
                payload = (info, labels)
            except BaseException as e:  # noqa: BLE001 - sent to the other ranks so every rank stops with the same message
                err = e
        payload, err = ctx.broadcast_object((payload, err))
        if err is not None:
            if isinstance(err, ValueError) and not isinstance(err, ACECalError):
                raise InvalidInputError(f"bad labels: {err}") from None
            raise err
        return payload

    def _plan(self, ctx: ddp.DistContext) -> _Plan:
        cfg = self.cfg
        check_loss_name(cfg.loss)  # before the (slower) dataset checks
        base = self._resolve_base()
        if base is not None and (loss := loss_for_network(cfg.loss, base.config.network)) != cfg.loss:
            cfg = self.cfg = cfg.model_copy(update={"loss": loss})
        check_heads(base.config.network if base is not None else cfg.network, cfg.loss)
        model_id = ctx.broadcast_object(cfg.resolved_id())
        work_dir = Path(cfg.work_dir) if cfg.work_dir else default_data_dir() / "runs" / model_id
        out_dir = Path(cfg.out_dir) if cfg.out_dir else default_data_dir() / "models"
        log_file = Path(cfg.log_file) if cfg.log_file else work_dir / LOG_NAME
        problem = None
        if cfg.freeze_encoder and not cfg.base:
            problem = "--freeze-encoder needs --base (a trained model to fine-tune)"
        elif ctx.is_main and cfg.publish and (out_dir / model_id).exists() and not cfg.overwrite:
            problem = f"a model with id {model_id!r} already exists in {out_dir}; choose another --id"
        problem = ctx.broadcast_object(problem)  # every rank stops with the same message
        if problem:
            raise InvalidInputError(problem)
        info, labels = self._dataset(ctx, base)
        # only now: a run refused for bad input leaves no work folder behind
        reporter = Reporter(log_file, self.progress, self.show_progress, enabled=ctx.is_main)
        bc = _model_space(cfg, model_id, labels, base)
        check_patch_sizes(bc, tuple(cfg.patch_size or bc.roi_size))
        loss_fn = training_loss(cfg.loss, bc.num_classes, cfg.loss_params).to(ctx.device)
        # ACE after a Dice+CE warm-up: the first loss_warmup_epochs train with the baseline loss (two heads: the same
        # two-head loss without its ACE term)
        warmup_loss_fn = loss_fn
        if cfg.loss_warmup_epochs:
            warmup_loss_fn = (
                training_loss(cfg.loss, bc.num_classes, {**cfg.loss_params, "ace_weight": 0.0})
                if is_two_head(bc)
                else training_loss("baseline_dice_ce", bc.num_classes, {})
            ).to(ctx.device)
        split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
        train_cases, val_cases = split_cases(
            info.cases, val_fraction=cfg.val_fraction, seed=split_seed, val_cases=cfg.val_cases
        )
        return _Plan(
            ctx,
            model_id,
            work_dir,
            out_dir,
            log_file,
            base,
            info,
            bc,
            reporter,
            loss_fn,
            warmup_loss_fn,
            train_cases,
            val_cases,
        )

    # -- 2. the checkpoint to resume from, and the work directory ---------------------------------------------------
    def _checkpoint_to_resume(self, plan: _Plan) -> Optional[dict]:
        """``last.pt`` when resuming (its settings checked against this run's), else None; then the work directory
        with this run's settings snapshot."""
        state = resumable_state(plan.work_dir, self.cfg.result_affecting(), resume=self.cfg.resume)
        if plan.ctx.is_main:
            plan.work_dir.mkdir(parents=True, exist_ok=True)
            (plan.work_dir / CONFIG_SNAPSHOT).write_text(self.cfg.model_dump_json(indent=2))
        plan.ctx.barrier()
        return state

    # -- 3. data ------------------------------------------------------------------------------------------------------
    def _data(self, plan: _Plan) -> _Data:
        cfg, ctx = self.cfg, plan.ctx
        set_determinism(seed=cfg.seed)
        train_ds = CacheDataset(
            [c.as_dict() for c in plan.train_cases],
            train_transforms(plan.bc, cfg),
            cache_rate=cfg.cache_rate,
            num_workers=max(1, cfg.num_workers),
            progress=False,
        )
        sampler: DistributedSampler = DistributedSampler(
            train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed, drop_last=False
        )
        gen = torch.Generator()
        gen.manual_seed(cfg.seed)
        loader = DataLoader(
            train_ds,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.num_workers,
            generator=gen,
            pin_memory=ctx.device.type == "cuda",
        )
        my_val = plan.val_cases[ctx.rank :: ctx.world_size]
        val_ds: Any = (
            CacheDataset(
                [c.as_dict() for c in my_val],
                model_space_transforms(plan.bc),
                cache_rate=cfg.cache_rate,
                num_workers=max(1, cfg.num_workers),
                progress=False,
            )
            if my_val
            else []
        )
        return _Data(train_ds, sampler, gen, loader, val_ds)

    # -- 4. model, optimiser, schedule --------------------------------------------------------------------------------
    def _model(self, plan: _Plan) -> _Model:
        cfg, device = self.cfg, plan.ctx.device
        set_determinism(seed=cfg.seed)
        try:
            net = build_network(plan.bc)
        except (TypeError, ValueError) as e:  # network arguments the class refuses
            raise InvalidInputError(f"bad network settings for {plan.bc.network.name}: {e}") from None
        if plan.base is not None:
            net.load_state_dict(plan.base.state_dict(), strict=True)
        frozen: list[torch.nn.Module] = []
        if cfg.freeze_encoder:
            frozen = encoder_modules(net)
            freeze(frozen)
        net = net.to(device)
        trainable = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = WarmupCosineSchedule(
            opt, warmup_steps=cfg.warmup_epochs, t_total=cfg.epochs, warmup_multiplier=cfg.warmup_multiplier
        )
        use_amp = cfg.amp and device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        # bf16 needs no loss scaling; only where the CPU computes it natively, elsewhere it is slower than float32
        cpu_bf16 = cfg.cpu_bf16 and device.type == "cpu" and cpu_has_native_bf16()
        return _Model(net, net, frozen, opt, sched, scaler, use_amp, cpu_bf16)

    # -- 5. resume --------------------------------------------------------------------------------------------------
    def _resume(self, parts: _Model, state: Optional[dict]) -> _Progress:
        """Restore the network, optimiser, schedule, AMP scaler and random state of ``last.pt``."""
        if state is None:
            return _Progress()
        parts.net.load_state_dict(state["model"])
        parts.opt.load_state_dict(state["optimizer"])
        parts.sched.load_state_dict(state["scheduler"])
        if parts.sched.t_total != self.cfg.epochs:
            # --epochs changed on resume: the cosine spans the new total from here, and the learning rate of the next
            # epoch is the new schedule's (not the old schedule's last value, 0 at its end). A schedule built at the
            # last finished step (its constructor takes one step) sets that rate; warm-up as the run had it.
            old = parts.sched
            parts.sched = WarmupCosineSchedule(
                parts.opt,
                warmup_steps=old.warmup_steps,
                t_total=self.cfg.epochs,
                end_lr=old.end_lr,
                cycles=old.cycles,
                last_epoch=old.last_epoch - 1,
                warmup_multiplier=old.warmup_multiplier,
            )
        if state.get("scaler") and parts.use_amp:
            parts.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        return _Progress(state["epoch"], state["history"], state["best"])

    # -- 6. the epochs -------------------------------------------------------------------------------------------------
    def _train(
        self, plan: _Plan, data: _Data, parts: _Model, done: _Progress, *, resumed: bool, t_start: float
    ) -> TrainResult:
        """Train from ``done.start_epoch`` to the last epoch, or until the sitting's limit or a cancel."""
        cfg, ctx, reporter = self.cfg, plan.ctx, plan.reporter
        reporter.event(
            JobEvent(
                EVENT_START,
                model_id=plan.model_id,
                epochs=cfg.epochs,
                start_epoch=done.start_epoch,
                train_cases=len(plan.train_cases),
                val_cases=len(plan.val_cases),
                world_size=ctx.world_size,
                resumed=resumed,
                work_dir=str(plan.work_dir),
            )
        )
        steps = len(data.loader)
        reporter.open_bar(total=cfg.epochs * steps, initial=done.start_epoch * steps, desc=plan.model_id)
        result = TrainResult(
            "completed",
            plan.model_id,
            plan.work_dir,
            plan.log_file if ctx.is_main else None,
            done.start_epoch,
            cfg.epochs,
            history=done.history,
        )
        sitting_epochs = 0
        try:
            for epoch in range(done.start_epoch, cfg.epochs):
                t0 = time.time()
                train_loss, lr = self._train_epoch(plan, data, parts, epoch)
                parts.sched.step()
                val, val_count = self._validate(plan, data, parts, done, epoch)
                event = JobEvent(
                    EVENT_EPOCH,
                    epoch=epoch + 1,
                    epochs=cfg.epochs,
                    train_loss=train_loss,
                    lr=lr,
                    seconds=round(time.time() - t0, 3),
                    val=val,
                    val_cases=val_count,
                    best_dice=done.best["dice"],
                    best_epoch=done.best["epoch"],
                )
                done.history.append({k: v for k, v in event.to_json().items() if k != "event"})
                self._checkpoint(plan, parts, done, epoch)
                reporter.event(event)
                result.epochs_done = epoch + 1
                sitting_epochs += 1
                ctx.barrier()
                if epoch + 1 < cfg.epochs and self._sitting_over(ctx, sitting_epochs, t_start):
                    result.status = "stopped"
                    reporter.event(JobEvent(EVENT_STOPPED, reason=STOP_SITTING_LIMIT, epoch=epoch + 1))
                    return result
        except Cancelled:
            result.status = "cancelled"
            reporter.event(JobEvent(EVENT_STOPPED, reason=STOP_CANCELLED, epoch=result.epochs_done))
            return result
        finally:
            reporter.close()
        return result

    def _train_epoch(self, plan: _Plan, data: _Data, parts: _Model, epoch: int) -> tuple[float, float]:
        """One pass over the training patches; returns (mean training loss over all ranks, the epoch's lr)."""
        cfg, ctx, device = self.cfg, plan.ctx, plan.ctx.device
        es = epoch_seed(cfg.seed, epoch, ctx.rank)
        data.sampler.set_epoch(epoch)
        data.generator.manual_seed(es)
        data.train_ds.transform.set_random_state(seed=es)
        parts.model.train()
        for m in parts.frozen:
            m.eval()
        loss_fn = plan.warmup_loss_fn if epoch < cfg.loss_warmup_epochs else plan.loss_fn
        loss_sum = torch.zeros(2, dtype=torch.float64)
        steps = len(data.loader)
        for step, batch in enumerate(data.loader):
            if ctx.any_flag(is_cancelled(self.cancel)):
                raise Cancelled()
            # plain tensors: MONAI's MetaTensor bookkeeping on every op costs real time on the CPU
            x = plain_tensor(batch["image"]).to(device, non_blocking=True)
            y = plain_tensor(batch["label"]).to(device, non_blocking=True).long()
            parts.opt.zero_grad(set_to_none=True)
            with torch.autocast(
                device_type=device.type,
                enabled=parts.use_amp or parts.cpu_bf16,
                dtype=torch.bfloat16 if parts.cpu_bf16 else None,
            ):
                out = parts.model(x)
            out = out.float() if not isinstance(out, (list, tuple)) else [o.float() for o in out]
            loss = _loss_value(loss_fn, out, y)
            parts.scaler.scale(loss).backward()
            parts.scaler.step(parts.opt)
            parts.scaler.update()
            lv = float(loss.detach())
            loss_sum += torch.tensor([lv * x.shape[0], x.shape[0]], dtype=torch.float64)
            plan.reporter.step(epoch + 1, step + 1, steps, lv)
        ctx.all_reduce_sum(loss_sum)
        return float(loss_sum[0]) / max(float(loss_sum[1]), 1.0), parts.opt.param_groups[0]["lr"]

    def _validate(
        self, plan: _Plan, data: _Data, parts: _Model, done: _Progress, epoch: int
    ) -> tuple[Optional[dict], int]:
        """Validate when the epoch is due (every ``val_every`` and the last); a new best Dice updates ``done.best`` and
        ``best.pt``. Returns (the macro metrics or None when not validated, the number of validation cases)."""
        cfg, ctx = self.cfg, plan.ctx
        if not plan.val_cases or ((epoch + 1) % cfg.val_every != 0 and epoch + 1 != cfg.epochs):
            return None, 0
        # under DDP a cancel is honoured at the next training step (all ranks agree there); without test-time
        # augmentation (the final pass before publishing uses the bundle's)
        vp = run_pass(
            ddp.unwrap(parts.model),
            case_items(data.val_ds),
            plan.bc,
            tta="none",
            cancel=None if ctx.distributed else self.cancel,
        )
        vp = reduce_pass(vp, ctx)
        val = summarise(vp)
        # the best weights are chosen among epochs trained with the run's own loss (after any warm-up)
        if (
            val["dice"] is not None
            and epoch + 1 > cfg.loss_warmup_epochs
            and (done.best["dice"] is None or val["dice"] > done.best["dice"])
        ):
            done.best = {"dice": val["dice"], "epoch": epoch + 1, "metrics": val}
            if ctx.is_main:
                save_checkpoint(
                    {"model": ddp.unwrap(parts.model).state_dict(), "epoch": epoch + 1, "metrics": val},
                    plan.work_dir / BEST,
                )
        return val, len(vp.cases)

    def _checkpoint(self, plan: _Plan, parts: _Model, done: _Progress, epoch: int) -> None:
        """``last.pt`` after a finished epoch (rank 0)."""
        if not plan.ctx.is_main:
            return
        save_checkpoint(
            {
                "model": ddp.unwrap(parts.model).state_dict(),
                "optimizer": parts.opt.state_dict(),
                "scheduler": parts.sched.state_dict(),
                "scaler": parts.scaler.state_dict() if parts.use_amp else None,
                "epoch": epoch + 1,
                "history": done.history,
                "best": done.best,
                "rng": rng_state(),
                "config": self.cfg.result_affecting(),
                "split": {"train": [c.name for c in plan.train_cases], "val": [c.name for c in plan.val_cases]},
            },
            plan.work_dir / LAST,
        )

    def _sitting_over(self, ctx: ddp.DistContext, sitting_epochs: int, t_start: float) -> bool:
        cfg = self.cfg
        over = bool(cfg.stop_after_epochs and sitting_epochs >= cfg.stop_after_epochs)
        if cfg.time_limit_minutes and (time.time() - t_start) / 60.0 >= cfg.time_limit_minutes:
            over = True
        return ctx.any_flag(over)

    # -- 7. publish (rank 0) ----------------------------------------------------------------------------------------
    def _publish(self, plan: _Plan, data: _Data, parts: _Model, done: _Progress, result: TrainResult) -> TrainResult:
        cfg, ctx = self.cfg, plan.ctx
        bundle_path, metrics = None, {}
        err: Optional[BaseException] = None
        if ctx.is_main:
            try:
                bundle = publish(
                    cfg,
                    plan.bc,
                    ddp.unwrap(parts.model),
                    work_dir=plan.work_dir,
                    out_dir=plan.out_dir,
                    info=plan.info,
                    train_cases=plan.train_cases,
                    val_cases=plan.val_cases,
                    val_items=self._all_val_items(plan, data) if plan.val_cases else None,
                    history=done.history,
                    best=done.best,
                    base=plan.base,
                    cancel=self.cancel,
                    world_size=ctx.world_size,
                )
                bundle_path, metrics = bundle.path, bundle.config.metrics
                plan.reporter.event(
                    JobEvent(EVENT_PUBLISHED, model_id=plan.model_id, path=str(bundle_path), metrics=metrics)
                )
            except Cancelled:
                err = Cancelled()
            except BaseException as e:  # noqa: BLE001 - re-raised below on every rank, after the broadcast
                err = e
        bundle_path, metrics, err = ctx.broadcast_object((bundle_path, metrics, err))
        if isinstance(err, Cancelled):
            result.status = "cancelled"
            plan.reporter.event(JobEvent(EVENT_STOPPED, reason=STOP_CANCELLED, epoch=result.epochs_done))
            return result
        if err is not None:
            raise err
        result.status, result.bundle_path, result.metrics = "published", bundle_path, metrics
        return result

    def _all_val_items(self, plan: _Plan, data: _Data) -> Callable[[], Any]:
        """Every validation case for the final pass (rank 0 alone sees all of them under DDP)."""

        def items() -> Any:
            ds = (
                data.val_ds
                if not plan.ctx.distributed
                else CacheDataset(
                    [c.as_dict() for c in plan.val_cases],
                    model_space_transforms(plan.bc),
                    cache_rate=self.cfg.cache_rate,
                    progress=False,
                )
            )
            return case_items(ds)

        return items


def train(config: TrainConfig, **kwargs: Any) -> TrainResult:
    """``Engine(config, **kwargs).run()``."""
    return Engine(config, **kwargs).run()
