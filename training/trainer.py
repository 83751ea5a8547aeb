"""One trainer for the three tasks (pncc, inpaint, position).

CPU or CUDA (``device: auto``), bf16/fp16 autocast and channels-last on CUDA only, DDP when
launched by torchrun (``init_process_group`` from the environment; gloo on CPU, nccl on CUDA),
seeded and deterministic, checkpoints with exact resume, a JSON-lines metrics log and PNG
sample sheets. Reads data only through ``facecorpus.datasets`` (or an in-memory
:class:`~facecorpus.training.data.TensorSource`).

Output folder::

    config.json           the resolved TrainConfig
    metrics.jsonl         one record per log/validation event ({"split": "train"|"val", "step", ...})
    checkpoints/step_NNNNNNN.pt, last.pt
    samples/step_NNNNNNN.png   rows: input | prediction | target | |error| x4
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from facecorpus.configs.train import TrainConfig
from facecorpus.core.errors import ConfigError, InputError
from facecorpus.training import losses as L
from facecorpus.training.data import (
    FieldInfo,
    Normalizer,
    Split,
    StepBatchSampler,
    collate_batch,
    open_split,
)
from facecorpus.training.models import TASKS, TaskNet, UVMirror
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "facecorpus.train/1"
MASK_FIELDS = ("uv_visible_mask", "mask")


# ---------------------------------------------------------------- environment


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device: cuda requested but torch.cuda.is_available() is False")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op when not launched
    by torchrun, i.e. WORLD_SIZE unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. Mixed precision is a CUDA-only feature here."""
    if device.type != "cuda":
        if precision not in ("auto", "fp32"):
            log.warning("precision %s ignored on %s: training in fp32", precision, device)
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch RNG states in a form torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x


def atomic_torch_save(obj, path: Path) -> None:
    from facecorpus.core import atomic

    atomic.write_with(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without executing code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupted, truncated or not a torch file
        raise InputError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a facecorpus training checkpoint (format "
                         f"{ck.get('format') if isinstance(ck, dict) else type(ck).__name__!r})")
    return ck


def build_hooks(cfg: TrainConfig, out_channels: int) -> list[L.LossHook]:
    hooks: list[L.LossHook] = []
    if cfg.loss.adversarial > 0:
        hooks.append(L.AdversarialLoss(cfg.loss.adversarial, out_channels, lr=cfg.loss.discriminator_lr))
    if cfg.loss.perceptual > 0:
        hooks.append(L.PerceptualLoss(cfg.loss.perceptual, in_channels=out_channels))
    return hooks


# ---------------------------------------------------------------- trainer


class Trainer:
    """Trains one task on a dataset root (or a TensorSource).

    Args:
        cfg: the run config.
        data: dataset root URL/path, or an in-memory ``TensorSource``.
        out_dir: output folder (see module docstring); only rank 0 writes.
        hooks: extra :class:`~facecorpus.training.losses.LossHook` terms, added to those the
            config switches on.
    """

    def __init__(self, cfg: TrainConfig, data, out_dir: str | Path, *,
                 hooks: list[L.LossHook] | None = None):
        self.cfg = cfg
        self.spec = TASKS[cfg.task]
        self.out = Path(out_dir)
        self.device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.dist = init_distributed(self.device)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.channels_last = cfg.channels_last and self.device.type == "cuda"
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        seed_everything(cfg.seed)

        fields = (*self.spec.inputs, self.spec.target)
        self.train_split: Split = open_split(data, fields, cfg.train_filter, cfg.join)
        self.val_split: Split = open_split(data, fields, cfg.val_filter, cfg.join)
        if len(self.train_split) == 0:
            raise InputError(f"{self.train_split.source}: train filter selects no samples")
        self._check_fields(self.train_split.fields)
        self.norm = self._fit_normalizers()

        mirror = UVMirror.from_file(cfg.uv_mirror) if cfg.uv_mirror else UVMirror()
        tgt = self.train_split.fields[self.spec.target]
        self.model = TaskNet(cfg.task, cfg.model.width, cfg.model.depth, cfg.model.max_width,
                             mirror=mirror, out_size=tgt.shape[:2]).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = self.model
        if self.dist.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.hooks = torch.nn.ModuleList(build_hooks(cfg, self.spec.out_channels) + list(hooks or []))
        self.hooks.to(self.device)
        names = [h.name for h in self.hooks]
        if len(set(names)) != len(names):
            raise ConfigError(f"loss hooks need distinct names, got {names}")
        self.step = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------ setup helpers

    def _check_fields(self, fields: dict[str, FieldInfo]) -> None:
        src = self.train_split.source
        for name, info in fields.items():
            if name in MASK_FIELDS:
                if not (len(info.shape) == 2 or (len(info.shape) == 3 and info.shape[2] == 1)):
                    raise InputError(f"{src}: field {name} must be (H,W) or (H,W,1), got {info.shape}")
            elif len(info.shape) != 3 or info.shape[2] != 3:
                raise InputError(f"{src}: field {name} must be (H,W,3), got {info.shape}")

    def _fit_normalizers(self) -> dict[str, Normalizer]:
        norm = {}
        ds = self.train_split.dataset
        first: dict | None = None
        for name, info in self.train_split.fields.items():
            if info.dtype in ("uint8", "bool") or name in MASK_FIELDS:
                norm[name] = Normalizer(info, is_mask=name in MASK_FIELDS)
            else:  # float field: statistics of (at most) the first 256 training samples
                if first is None:
                    first = collate_batch(ds.__getitems__(list(range(min(len(ds), 256)))))
                norm[name] = Normalizer.fit(info, torch.as_tensor(np.asarray(first[name])))
        return {k: v.to(self.device) for k, v in norm.items()}

    def normalizer_state(self) -> dict:
        return {k: {"offset": v.offset.flatten().cpu(), "scale": v.scale.flatten().cpu(),
                    "is_mask": v.is_mask, "shape": list(v.info.shape), "dtype": v.info.dtype}
                for k, v in self.norm.items()}

    # ------------------------------------------------------------ one step

    def to_device(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Stored-form batch -> (normalised NCHW inputs, normalised NCHW target) on device."""
        nb = self.device.type == "cuda"
        mf = torch.channels_last if self.channels_last else torch.contiguous_format
        out = {}
        for name in (*self.spec.inputs, self.spec.target):
            x = self.norm[name].to_model(torch.as_tensor(batch[name]).to(self.device, non_blocking=nb))
            out[name] = x.contiguous(memory_format=mf)
        return {k: out[k] for k in self.spec.inputs}, out[self.spec.target]

    def loss_terms(self, pred: torch.Tensor, target: torch.Tensor, inputs: dict,
                   with_hooks: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total and the unweighted terms; pred/target (B, C, H, W) float32."""
        lc = self.cfg.loss
        terms = {"l1": (lc.l1, L.l1(pred, target))}
        if self.cfg.task == "inpaint":
            if lc.symmetry > 0:
                terms["symmetry"] = (lc.symmetry, L.symmetry(pred, self.model.mirror))
            if lc.tv > 0:
                terms["tv"] = (lc.tv, L.total_variation(pred))
        if with_hooks:
            for h in self.hooks:
                terms[h.name] = (h.weight, h(pred, target, inputs))
        total = sum(w * t for w, t in terms.values())
        return total, {k: t for k, (_, t) in terms.items()}

    def lr_at(self, step: int) -> float:
        c = self.cfg
        if c.warmup_steps and step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if not c.cosine:
            return c.lr
        t = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step)
        inputs, target = self.to_device(batch)
        self.net.train()
        with self._autocast():
            pred = self.net(inputs)
        pred = pred.float()
        total, terms = self.loss_terms(pred, target, inputs)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        out = {"loss": total.detach(), **{f"loss_{k}": v.detach() for k, v in terms.items()}}
        for h in self.hooks:
            for k, v in h.step(pred, target, inputs).items():
                out[k] = torch.as_tensor(v)
        self.step += 1
        return out

    # ------------------------------------------------------------ loaders

    def _loader(self, split: Split, batch_sampler, workers: int, persistent: bool) -> DataLoader:
        kw = {}
        if workers > 0:
            # forkserver, not fork: the process that trains has often started threads (zarr's
            # IO loop, Prefect's event loops), and a forked child inherits their locks but not
            # the threads. Forked workers of such a process exited with code 1 at shutdown.
            kw = {"prefetch_factor": self.cfg.prefetch_factor, "persistent_workers": persistent,
                  "multiprocessing_context": "forkserver"}
        return DataLoader(split.dataset, batch_sampler=batch_sampler, num_workers=workers,
                          collate_fn=collate_batch, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.cfg.seed), **kw)

    def _val_batches(self) -> list[list[int]]:
        n, bs = len(self.val_split), self.cfg.batch_size
        idx = list(range(self.dist.rank, n, self.dist.world))
        batches = [idx[i:i + bs] for i in range(0, len(idx), bs)]
        if self.cfg.val_max_batches:
            batches = batches[: self.cfg.val_max_batches]
        return batches

    # ------------------------------------------------------------ validation, samples

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss terms (without hooks) over the validation split, across all ranks."""
        self.net.eval()
        if self._val_loader is None:
            self._val_loader = self._loader(self.val_split, self._val_batches(),
                                            min(self.cfg.num_workers, 1), persistent=True)
        # the same keys on every rank, even one with no validation batch (all_reduce below)
        keys = ["loss", "loss_l1"]
        if self.cfg.task == "inpaint":
            keys += [f"loss_{k}" for k in ("symmetry", "tv") if getattr(self.cfg.loss, k) > 0]
        sums = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in keys}
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in self._val_loader:
            inputs, target = self.to_device(batch)
            with self._autocast():
                pred = self.model(inputs)
            total, terms = self.loss_terms(pred.float(), target, inputs, with_hooks=False)
            n = target.shape[0]
            for k, v in {"loss": total, **{f"loss_{k}": t for k, t in terms.items()}}.items():
                sums[k] += v.double() * n
            count += n
        vec = torch.stack([sums[k] for k in keys] + [count])
        if self.dist.world > 1:
            dist.all_reduce(vec)
        self.net.train()
        if float(vec[-1]) == 0:
            return {}
        return {k: float(vec[i] / vec[-1]) for i, k in enumerate(keys)}

    @torch.no_grad()
    def predict_batch(self, batch: dict) -> torch.Tensor:
        """Stored-form batch -> predictions in stored units, (B, H, W, C) float32 on CPU."""
        self.model.eval()
        inputs, _ = self.to_device(batch)
        with self._autocast():
            pred = self.model(inputs)
        self.model.train()
        return self.norm[self.spec.target].to_data(pred.float()).cpu()

    def write_samples(self, path: Path) -> Path:
        from facecorpus.sheets import contact_sheet

        split = self.val_split if len(self.val_split) else self.train_split
        k = min(self.cfg.n_samples, len(split))
        batch = collate_batch([split.dataset[i] for i in range(k)])
        pred = self.predict_batch(batch).numpy()
        rows = sample_rows(self.cfg.task, {n: np.asarray(batch[n]) for n in batch if n != "index"}, pred,
                           self.train_split.fields[self.spec.target].dtype)
        return contact_sheet(rows, path, cell=96, labels=["input", "prediction", "target", "|error| x4"])

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        rngs = [rng_state()]
        if self.dist.world > 1:
            rngs = [None] * self.dist.world
            dist.all_gather_object(rngs, rng_state())
        sampler_n = len(self.train_split)
        bpe = sampler_n // (self.cfg.batch_size * self.dist.world)
        epoch, b = divmod(self.step, bpe)
        return {
            "format": CHECKPOINT_FORMAT,
            "task": self.cfg.task,
            "config": self.cfg.model_dump(mode="json"),
            "step": self.step, "epoch": epoch, "batch_in_epoch": b, "batches_per_epoch": bpe,
            "n_train": sampler_n, "world_size": self.dist.world,
            "model": self.model.state_dict(),
            "mirror_index": self.model.mirror.index.cpu() if self.model.mirror.index is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "hooks": {h.name: h.hook_state() for h in self.hooks},
            "normalizers": self.normalizer_state(),
            "target_shape": list(self.train_split.fields[self.spec.target].shape),
            "input_shapes": {k: list(self.train_split.fields[k].shape) for k in self.spec.inputs},
            "rng": rngs,
        }

    def save_checkpoint(self) -> Path | None:
        state = self.state_dict()  # collective under DDP: every rank calls it
        if not self.dist.main:
            return None
        path = self.out / "checkpoints" / f"step_{self.step:07d}.pt"
        atomic_torch_save(state, path)
        atomic_torch_save(state, self.out / "checkpoints" / "last.pt")
        return path

    def load_state(self, ck: dict, source: str = "<checkpoint>") -> None:
        if ck["task"] != self.cfg.task:
            raise ConfigError(f"{source}: checkpoint is for task {ck['task']!r}, not {self.cfg.task!r}")
        if ck["config"]["model"] != self.cfg.model.model_dump(mode="json"):
            raise ConfigError(f"{source}: model config {ck['config']['model']} differs from "
                              f"{self.cfg.model.model_dump(mode='json')}")
        bpe = len(self.train_split) // (self.cfg.batch_size * self.dist.world)
        if (ck["n_train"], ck["batches_per_epoch"], ck["world_size"]) != (len(self.train_split), bpe, self.dist.world):
            log.warning("%s: data or world size changed (n_train %d->%d, world %d->%d): "
                        "resume continues but is not exact", source, ck["n_train"],
                        len(self.train_split), ck["world_size"], self.dist.world)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        for h in self.hooks:
            if h.name in ck["hooks"]:
                h.load_hook_state(ck["hooks"][h.name])
        for name, st in ck["normalizers"].items():
            if name in self.norm:  # statistics of the original run, so outputs keep their meaning
                self.norm[name].offset.copy_(st["offset"].view_as(self.norm[name].offset))
                self.norm[name].scale.copy_(st["scale"].view_as(self.norm[name].scale))
        self.step = int(ck["step"])
        rngs = ck["rng"]
        set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])

    # ------------------------------------------------------------ the loop

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.dist.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_log(self, step: int) -> None:
        """On resume, drop records written after the checkpoint by the interrupted run."""
        p = self.out / "metrics.jsonl"
        if not (self.dist.main and p.exists()):
            return
        keep = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        from facecorpus.core import atomic

        atomic.write_text(p, "".join(ln + "\n" for ln in keep))

    def fit(self, resume: str | Path | None = None) -> list[dict]:
        """Train to ``cfg.steps`` (from a checkpoint if given); returns the metrics records."""
        cfg = self.cfg
        prev_det = torch.are_deterministic_algorithms_enabled()
        prev_bench = torch.backends.cudnn.benchmark
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        self._val_loader = None
        try:
            return self._fit(resume)
        finally:
            torch.use_deterministic_algorithms(prev_det)
            torch.backends.cudnn.benchmark = prev_bench
            self._val_loader = None

    def _fit(self, resume) -> list[dict]:
        cfg = self.cfg
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        if resume is not None:
            self.load_state(load_checkpoint(resume), str(resume))
            self._truncate_log(self.step)
            log.info("resumed from %s at step %d", resume, self.step)
        elif len(self.val_split):
            self._log({"split": "val", "step": 0, **self.validate()})
        sampler = StepBatchSampler(len(self.train_split), cfg.batch_size, cfg.seed,
                                   start_step=self.step, rank=self.dist.rank, world=self.dist.world)
        loader = self._loader(self.train_split, sampler, cfg.num_workers, persistent=False)
        it = iter(loader)
        acc: dict[str, torch.Tensor] = {}
        n_acc, wait, busy = 0, 0.0, 0.0
        t_start = time.perf_counter()
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            out = self.train_step(batch)
            for k, v in out.items():
                acc[k] = acc.get(k, 0) + v.double()
            n_acc += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t2 = time.perf_counter()
                wait += t1 - t0
                busy += t2 - t0
                epoch, b = sampler.position(self.step)
                rec = {"split": "train", "step": self.step, "epoch": epoch, "batch": b,
                       "lr": self.lr_at(self.step - 1),
                       **{k: float(v) / n_acc for k, v in acc.items()},
                       "samples_per_s": n_acc * cfg.batch_size * self.dist.world / max(busy, 1e-9),
                       "data_wait_frac": wait / max(busy, 1e-9),
                       "elapsed_s": t2 - t_start}
                self._log(rec)
                acc, n_acc, wait, busy = {}, 0, 0.0, 0.0
            else:
                t2 = time.perf_counter()
                wait += t1 - t0
                busy += t2 - t0
            last = self.step == cfg.steps
            if len(self.val_split) and ((cfg.val_every and self.step % cfg.val_every == 0) or last):
                self._log({"split": "val", "step": self.step, **self.validate()})
            if self.dist.main and ((cfg.sample_every and self.step % cfg.sample_every == 0) or last):
                self.write_samples(self.out / "samples" / f"step_{self.step:07d}.png")
            if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last:
                self.save_checkpoint()
        del it, loader
        return self.history


# ---------------------------------------------------------------- sample sheets


def to_display(x: np.ndarray, dtype: str, ref: np.ndarray | None = None) -> np.ndarray:
    """A stored-unit map (H, W, C) -> float [0, 1] for a PNG: uint8 fields /255; float fields
    min-max scaled by the reference (target) map's range so prediction and target compare."""
    x = x.astype(np.float32)
    if dtype == "uint8":
        return np.clip(x / 255.0, 0, 1)
    r = (ref if ref is not None else x).astype(np.float32)
    lo = r.reshape(-1, r.shape[-1]).min(0)
    hi = r.reshape(-1, r.shape[-1]).max(0)
    return np.clip((x - lo) / np.maximum(hi - lo, 1e-6), 0, 1)


def sample_rows(task: str, batch: dict[str, np.ndarray], pred: np.ndarray, target_dtype: str) -> list:
    """Rows [input, prediction, target, |error| x4] for a contact sheet."""
    spec = TASKS[task]
    rows = []
    for i in range(len(pred)):
        if task == "inpaint":
            m = batch["uv_visible_mask"][i]
            m = (m.reshape(m.shape[0], m.shape[1], 1) > 0)
            inp = to_display(batch["uv_visible"][i], str(batch["uv_visible"].dtype)) * m
        else:
            inp = to_display(batch["image"][i], str(batch["image"].dtype))
        tgt = batch[spec.target][i]
        t = to_display(tgt, target_dtype)
        p = to_display(pred[i], target_dtype, ref=tgt)
        err = np.clip(np.abs(p - t).mean(-1) * 4, 0, 1)
        rows.append([inp, p, t, err])
    return rows
