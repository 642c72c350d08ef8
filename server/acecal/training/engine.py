"""The training / fine-tuning engine behind ``acecal train`` and the server's fine-tuning jobs.

::

    from acecal.training import Engine, TrainConfig
    result = Engine(TrainConfig(data="dataset.json", loss="hardl1ace_dice_ce", epochs=300),
                    progress=print, cancel=threading.Event()).run()
    result.status, result.bundle_path

Determinism and resume: the network is initialised after ``monai.utils.set_determinism(seed)``; every epoch reseeds
the patch sampler, the data loader and the random transforms from ``(seed, epoch, rank)``, so an epoch's batches do not
depend on what ran before it. ``last.pt`` (model, optimizer, scheduler, AMP scaler, RNG states, epoch, history, best)
is written atomically after every epoch; resuming from it continues with bit-identical weights to an uninterrupted run
(same machine, same thread count).
"""

from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from acecal.bundles import Bundle, BundleConfig, LossRecord, ModelRegistry, build_network, resolve_bundle
from acecal.bundles.registry import default_data_dir
from acecal.data.datasets import DatasetError, DatasetInfo, discover_dataset, split_cases, validate_cases
from acecal.errors import ACECalError, InvalidInputError
from acecal.networks import is_two_head
from acecal.training import ddp
from acecal.training.config import TrainConfig
from acecal.training.progress import CancelToken, ProgressCallback, Reporter, is_cancelled

LAST = "last.pt"
BEST = "best.pt"
CONFIG_SNAPSHOT = "train_config.json"


class ResumeError(InvalidInputError):
    code = "resume_error"


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
    if hasattr(net, "encoder"):
        return [net.encoder]
    if hasattr(net, "down_layers"):
        return [m for m in (getattr(net, "convInit", None), net.down_layers) if m is not None]
    raise InvalidInputError(f"don't know the encoder of a {type(net).__name__}; cannot freeze it")


def freeze(modules: list[torch.nn.Module]) -> int:
    n = 0
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
            n += p.numel()
    return n


def build_loss(name: str, num_classes: int, params: dict) -> torch.nn.Module:
    """The training loss by registry name (``acecal.losses.registry``); bad names/parameters -> InvalidInputError."""
    from acecal.losses.registry import LOSS_NAMES
    from acecal.losses.registry import build_loss as _build

    if name not in LOSS_NAMES:
        raise InvalidInputError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    try:
        return _build(name, num_classes, **params)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"bad parameters for loss {name!r}: {e}") from None


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo; False where unknown)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, rank]).generate_state(1)[0])


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except Exception:  # different GPU count on resume: not fatal
            pass


def train_transforms(bc: BundleConfig, cfg: TrainConfig):
    """Model space (shared with inference) + padding to the ROI + patch sampling + augmentation."""
    from monai import transforms as mt

    from acecal.data.transforms import IMAGE, LABEL, model_space_transforms

    keys = [IMAGE, LABEL]
    patch = tuple(cfg.patch_size or bc.roi_size)
    chain = list(model_space_transforms(bc).transforms)
    chain += [
        mt.SpatialPadd(keys=keys, spatial_size=patch, mode="constant"),
        mt.RandCropByPosNegLabeld(
            keys=keys, label_key=LABEL, spatial_size=patch, pos=cfg.pos_fraction, neg=1.0 - cfg.pos_fraction,
            num_samples=cfg.num_samples, image_key=None, allow_smaller=False,
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


def _check_sizes(bc: BundleConfig, patch: tuple) -> None:
    """SegResNet halves the resolution len(blocks_down) - 1 times: ROI and patch must be divisible by 2**that."""
    levels = len(bc.network.args.get("blocks_down", (1, 2, 2, 4))) - 1
    f = 2 ** max(levels, 0)
    for what, size in (("ROI", tuple(bc.roi_size)), ("patch", patch)):
        if any(int(s) % f for s in size):
            raise InvalidInputError(f"the {what} size {'x'.join(map(str, size))} must be divisible by {f} for a "
                                    f"{bc.network.name} with {levels + 1} levels, e.g. "
                                    f"{'x'.join(str(-(-int(s) // f) * f) for s in size)}")


def _check_heads(network, loss: str) -> None:
    """A two-head network (outputs 2C channels) trains with a two-head loss, and only with one."""
    from acecal.losses.registry import TWO_HEAD_LOSSES

    if is_two_head(network) and loss not in TWO_HEAD_LOSSES:
        raise InvalidInputError(f"the {network.name} network has a segmentation and a calibration head: train it "
                                f"with a two-head loss ({', '.join(TWO_HEAD_LOSSES)}), not {loss!r}")
    if loss in TWO_HEAD_LOSSES and not is_two_head(network):
        raise InvalidInputError(f"the loss {loss!r} trains a two-head network: use --network SegResNetTwoHead "
                                f"(the {network.name} network has one head)")


def _model_space(cfg: TrainConfig, model_id: str, labels: dict[str, str], base: Optional[Bundle]) -> BundleConfig:
    loss = LossRecord(name=cfg.loss, params=dict(cfg.loss_params))
    if base is not None:
        b = base.config
        return BundleConfig(
            id=model_id, description=cfg.description or f"{b.id} fine-tuned", network=b.network, labels=b.labels,
            in_channels=b.in_channels, modality=b.modality, spacing=b.spacing, orientation=b.orientation,
            intensity=b.intensity, roi_size=b.roi_size, sw_overlap=b.sw_overlap, sw_mode=b.sw_mode,
            sw_batch_size=b.sw_batch_size, loss=loss, parent=b.id, uncertainty_threshold=b.uncertainty_threshold,
            tta=b.tta,
        )
    return BundleConfig(
        id=model_id, description=cfg.description, network=cfg.network, labels=labels, in_channels=cfg.in_channels,
        modality=cfg.modality, spacing=cfg.spacing, orientation=cfg.orientation, intensity=cfg.intensity,
        roi_size=cfg.roi_size, sw_overlap=cfg.sw_overlap, sw_batch_size=cfg.sw_batch_size, loss=loss, tta=cfg.tta,
    )


# ------------------------------------------------------------------------------------------------------------------


class Engine:
    """Train or fine-tune one model and publish it as a bundle.

    Args:
        config: the :class:`TrainConfig`.
        progress: called with each progress event (see :mod:`acecal.training.progress`); rank 0 only.
        cancel: a ``threading.Event`` or a callable; checked every iteration and every validation case. When it fires
            the run stops within one iteration, keeps the last finished epoch's checkpoint and publishes nothing.
        show_progress: tqdm bar (default: when stderr is a terminal).
        registry: where to look up ``config.base`` by id (default: shipped models + the data directory's models).
    """

    def __init__(self, config: TrainConfig, *, progress: Optional[ProgressCallback] = None, cancel: CancelToken = None,
                 show_progress: Optional[bool] = None, registry: Optional[ModelRegistry] = None):
        self.cfg = config
        self.progress = progress
        self.cancel = cancel
        self.show_progress = show_progress
        self.registry = registry

    # -- setup ------------------------------------------------------------------------------------------------------
    def _resolve_base(self) -> Optional[Bundle]:
        if not self.cfg.base:
            return None
        from acecal.bundles.registry import default_models_dir

        reg = self.registry or ModelRegistry([default_models_dir(), default_data_dir() / "models"])
        return resolve_bundle(self.cfg.base, reg)

    def _dataset(self, ctx: ddp.DistContext, base: Optional[Bundle]) -> tuple[DatasetInfo, dict[str, str]]:
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
            except BaseException as e:  # sent to the other ranks so every rank stops with the same message
                err = e
        payload, err = ctx.broadcast_object((payload, err))
        if err is not None:
            if isinstance(err, ValueError) and not isinstance(err, ACECalError):
                raise InvalidInputError(f"bad labels: {err}") from None
            raise err
        return payload

    # -- main -------------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        ctx = ddp.setup(self.cfg.device)
        try:
            return self._run(ctx)
        finally:
            ctx.close()

    def _run(self, ctx: ddp.DistContext) -> TrainResult:
        from monai.data import CacheDataset, DataLoader
        from monai.utils import set_determinism
        from torch.utils.data.distributed import DistributedSampler

        from acecal.data.transforms import model_space_transforms

        cfg = self.cfg
        t_start = time.time()
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        from acecal.losses.registry import LOSS_NAMES

        if cfg.loss not in LOSS_NAMES:  # before the (slower) dataset checks
            raise InvalidInputError(f"unknown loss {cfg.loss!r}; choose one of {', '.join(LOSS_NAMES)}")
        base = self._resolve_base()
        _check_heads(base.config.network if base is not None else cfg.network, cfg.loss)
        model_id = ctx.broadcast_object(cfg.resolved_id())
        work_dir = Path(cfg.work_dir) if cfg.work_dir else default_data_dir() / "runs" / model_id
        out_dir = Path(cfg.out_dir) if cfg.out_dir else default_data_dir() / "models"
        log_file = Path(cfg.log_file) if cfg.log_file else work_dir / "train.jsonl"
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
        _check_sizes(bc, tuple(cfg.patch_size or bc.roi_size))
        loss_fn = build_loss(cfg.loss, bc.num_classes, cfg.loss_params).to(ctx.device)
        # ACE after a Dice+CE warm-up: the first loss_warmup_epochs train with the baseline loss (two heads: the same
        # two-head loss without its ACE term)
        warmup_loss_fn = loss_fn
        if cfg.loss_warmup_epochs:
            warmup_loss_fn = (build_loss(cfg.loss, bc.num_classes, {**cfg.loss_params, "ace_weight": 0.0})
                              if is_two_head(bc) else build_loss("baseline_dice_ce", bc.num_classes, {})).to(ctx.device)
        split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
        train_cases, val_cases = split_cases(info.cases, val_fraction=cfg.val_fraction, seed=split_seed,
                                             val_cases=cfg.val_cases)

        # ---- checkpoint state to resume from
        state = None
        last_path = work_dir / LAST
        if cfg.resume and last_path.is_file():
            state = torch.load(last_path, map_location="cpu", weights_only=False)
            saved = state.get("config", {})
            now_cfg = cfg.result_affecting()
            diff = sorted(k for k in set(saved) | set(now_cfg) if saved.get(k) != now_cfg.get(k) and k != "model_id")
            if diff:
                raise ResumeError(f"cannot resume {work_dir}: these settings differ from the interrupted run: "
                                  f"{', '.join(diff)}")
        elif not cfg.resume and last_path.is_file():
            raise ResumeError(f"{work_dir} already holds a run ({LAST}); pass --resume to continue it, or another --id")
        if ctx.is_main:
            work_dir.mkdir(parents=True, exist_ok=True)
            (work_dir / CONFIG_SNAPSHOT).write_text(cfg.model_dump_json(indent=2))
        ctx.barrier()

        # ---- data
        device = ctx.device
        set_determinism(seed=cfg.seed)
        train_ds = CacheDataset([c.as_dict() for c in train_cases], train_transforms(bc, cfg),
                                cache_rate=cfg.cache_rate, num_workers=max(1, cfg.num_workers), progress=False)
        sampler = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=False)
        gen = torch.Generator()
        gen.manual_seed(cfg.seed)
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                            generator=gen, pin_memory=device.type == "cuda")
        my_val = val_cases[ctx.rank::ctx.world_size]
        val_ds = CacheDataset([c.as_dict() for c in my_val], model_space_transforms(bc), cache_rate=cfg.cache_rate,
                              num_workers=max(1, cfg.num_workers), progress=False) if my_val else []

        # ---- model, loss, optimiser
        set_determinism(seed=cfg.seed)
        try:
            net = build_network(bc)
        except (TypeError, ValueError) as e:  # network arguments the class refuses
            raise InvalidInputError(f"bad network settings for {bc.network.name}: {e}") from None
        if base is not None:
            net.load_state_dict(base.state_dict(), strict=True)
        frozen: list[torch.nn.Module] = []
        if cfg.freeze_encoder:
            frozen = encoder_modules(net)
            freeze(frozen)
        net = net.to(device)
        trainable = [p for p in net.parameters() if p.requires_grad]
        from monai.optimizers import WarmupCosineSchedule

        opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = WarmupCosineSchedule(opt, warmup_steps=cfg.warmup_epochs, t_total=cfg.epochs,
                                     warmup_multiplier=cfg.warmup_multiplier)
        use_amp = cfg.amp and device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        # bf16 needs no loss scaling; only where the CPU computes it natively, elsewhere it is slower than float32
        cpu_bf16 = cfg.cpu_bf16 and device.type == "cpu" and cpu_has_native_bf16()

        start_epoch, history, best = 0, [], {"dice": None, "epoch": None}
        if state is not None:
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if sched.t_total != cfg.epochs:
                # --epochs changed on resume: the cosine spans the new total from here, and the learning rate of
                # the next epoch is the new schedule's (not the old schedule's last value, 0 at its end)
                sched.t_total = cfg.epochs
                new_lrs = [max(sched.end_lr, base * fn(sched.last_epoch)) if sched.last_epoch >= sched.warmup_steps
                           else base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs)]
                for group, lr in zip(opt.param_groups, new_lrs):
                    group["lr"] = lr
                sched._last_lr = new_lrs
            if state.get("scaler") and use_amp:
                scaler.load_state_dict(state["scaler"])
            start_epoch, history, best = state["epoch"], state["history"], state["best"]
            set_rng_state(state["rng"])
        model: torch.nn.Module = net
        if ctx.distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None)

        reporter.event({"event": "start", "model_id": model_id, "epochs": cfg.epochs, "start_epoch": start_epoch,
                        "train_cases": len(train_cases), "val_cases": len(val_cases), "world_size": ctx.world_size,
                        "resumed": state is not None, "work_dir": str(work_dir)})
        steps = len(loader)
        reporter.open_bar(total=cfg.epochs * steps, initial=start_epoch * steps, desc=model_id)
        result = TrainResult("completed", model_id, work_dir, log_file if ctx.is_main else None, start_epoch,
                             cfg.epochs, history=history)
        sitting_epochs = 0
        from acecal.training.validation import Cancelled, reduce_pass, run_pass, summarise

        try:
            for epoch in range(start_epoch, cfg.epochs):
                t0 = time.time()
                es = epoch_seed(cfg.seed, epoch, ctx.rank)
                sampler.set_epoch(epoch)
                gen.manual_seed(es)
                train_ds.transform.set_random_state(seed=es)
                model.train()
                for m in frozen:
                    m.eval()
                loss_sum = torch.zeros(2, dtype=torch.float64)
                for step, batch in enumerate(loader):
                    if ctx.any_flag(is_cancelled(self.cancel)):
                        raise Cancelled()
                    # plain tensors: MONAI's MetaTensor bookkeeping on every op costs real time on the CPU
                    x = _plain(batch["image"]).to(device, non_blocking=True)
                    y = _plain(batch["label"]).to(device, non_blocking=True).long()
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(device_type=device.type, enabled=use_amp or cpu_bf16,
                                        dtype=torch.bfloat16 if cpu_bf16 else None):
                        out = model(x)
                    out = out.float() if not isinstance(out, (list, tuple)) else [o.float() for o in out]
                    loss = self._loss(warmup_loss_fn if epoch < cfg.loss_warmup_epochs else loss_fn, out, y)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    lv = float(loss.detach())
                    loss_sum += torch.tensor([lv * x.shape[0], x.shape[0]], dtype=torch.float64)
                    reporter.step(epoch + 1, step + 1, steps, lv)
                ctx.all_reduce_sum(loss_sum)
                lr = opt.param_groups[0]["lr"]
                sched.step()
                val = None
                if val_cases and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                    # under DDP a cancel is honoured at the next training step (all ranks agree there)
                    # without test-time augmentation (the final pass before publishing uses the bundle's)
                    vp = run_pass(ddp.unwrap(model), _items(val_ds), bc, tta="none",
                                  cancel=None if ctx.distributed else self.cancel)
                    vp = reduce_pass(vp, ctx)
                    val = summarise(vp)
                    # the best weights are chosen among epochs trained with the run's own loss (after any warm-up)
                    if (val["dice"] is not None and epoch + 1 > cfg.loss_warmup_epochs
                            and (best["dice"] is None or val["dice"] > best["dice"])):
                        best = {"dice": val["dice"], "epoch": epoch + 1, "metrics": val}
                        if ctx.is_main:
                            atomic_save({"model": ddp.unwrap(model).state_dict(), "epoch": epoch + 1, "metrics": val},
                                        work_dir / BEST)
                rec = {"event": "epoch", "epoch": epoch + 1, "epochs": cfg.epochs,
                       "train_loss": float(loss_sum[0] / max(loss_sum[1], 1)), "lr": lr,
                       "seconds": round(time.time() - t0, 3), "val": val,
                       "val_cases": len(vp.cases) if val is not None else 0, "best_dice": best["dice"],
                       "best_epoch": best["epoch"]}
                history.append({k: v for k, v in rec.items() if k != "event"})
                if ctx.is_main:
                    atomic_save({
                        "model": ddp.unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if use_amp else None,
                        "epoch": epoch + 1, "history": history, "best": best, "rng": rng_state(),
                        "config": cfg.result_affecting(), "split": {"train": [c.name for c in train_cases],
                                                                    "val": [c.name for c in val_cases]},
                    }, last_path)
                reporter.event(rec)
                result.epochs_done = epoch + 1
                sitting_epochs += 1
                ctx.barrier()
                if epoch + 1 < cfg.epochs and self._sitting_over(ctx, sitting_epochs, t_start):
                    result.status = "stopped"
                    reporter.event({"event": "stopped", "reason": "sitting_limit", "epoch": epoch + 1})
                    return result
        except Cancelled:
            result.status = "cancelled"
            reporter.event({"event": "stopped", "reason": "cancelled", "epoch": result.epochs_done})
            return result
        finally:
            reporter.close()

        # ---- publish (rank 0)
        result.seconds = time.time() - t_start
        if cfg.publish:
            bundle_path, metrics = None, {}
            err: Optional[BaseException] = None
            if ctx.is_main:
                from acecal.training.publish import publish

                def val_items():
                    ds = val_ds if not ctx.distributed else CacheDataset(  # rank 0 alone sees every case
                        [c.as_dict() for c in val_cases], model_space_transforms(bc), cache_rate=cfg.cache_rate,
                        progress=False)
                    return _items(ds)

                try:
                    bundle = publish(
                        cfg, bc, ddp.unwrap(model), work_dir=work_dir, out_dir=out_dir, info=info,
                        train_cases=train_cases, val_cases=val_cases, val_items=val_items if val_cases else None,
                        history=history, best=best, base=base, cancel=self.cancel,
                        world_size=ctx.world_size,
                    )
                    bundle_path, metrics = bundle.path, bundle.config.metrics
                    reporter.event({"event": "published", "model_id": model_id, "path": str(bundle_path),
                                    "metrics": metrics})
                except Cancelled:
                    err = Cancelled()
                except BaseException as e:
                    err = e
            bundle_path, metrics, err = ctx.broadcast_object((bundle_path, metrics, err))
            if isinstance(err, Cancelled):
                result.status = "cancelled"
                reporter.event({"event": "stopped", "reason": "cancelled", "epoch": result.epochs_done})
                return result
            if err is not None:
                raise err
            result.status, result.bundle_path, result.metrics = "published", bundle_path, metrics
        return result

    @staticmethod
    def _loss(loss_fn, out, y):
        if isinstance(out, (list, tuple)):
            from monai.losses import DeepSupervisionLoss

            return DeepSupervisionLoss(loss_fn, weight_mode="exp")(list(out), y.float())
        return loss_fn(out, y)

    def _sitting_over(self, ctx: ddp.DistContext, sitting_epochs: int, t_start: float) -> bool:
        cfg = self.cfg
        over = bool(cfg.stop_after_epochs and sitting_epochs >= cfg.stop_after_epochs)
        if cfg.time_limit_minutes and (time.time() - t_start) / 60.0 >= cfg.time_limit_minutes:
            over = True
        return ctx.any_flag(over)


def _plain(t):
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def _items(ds):
    """Validation items from a (Cache)Dataset: batch of one, case name attached."""
    for i in range(len(ds)):
        d = ds[i]
        yield {"image": d["image"][None], "label": d["label"][None], "case": d.get("case", str(i))}


def train(config: TrainConfig, **kwargs) -> TrainResult:
    """``Engine(config, **kwargs).run()``."""
    return Engine(config, **kwargs).run()
