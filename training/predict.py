"""Run a training checkpoint on a folder of images or on a dataset; write PNG predictions.

Outputs per input ``NAME``: ``NAME.<task>.png`` (uint8 targets as stored; float targets such as
``uv_position`` min-max scaled per map for viewing, plus ``NAME.<task>.npy`` float32 in stored
units). Unreadable inputs are listed in ``rejected.jsonl`` (name, reason) and skipped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from facecorpus.configs.train import TrainConfig
from facecorpus.core.errors import InputError
from facecorpus.training.data import FieldInfo, Normalizer, filter_expression
from facecorpus.training.models import TASKS, TaskNet, UVMirror
from facecorpus.training.trainer import load_checkpoint, resolve_device

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class Predictor:
    """A trained network with the normalisation it was trained with.

    ``predict(batch)``: stored-form inputs ``{field: (B, H, W, C) or (B, H, W)}`` (uint8 or
    float, as in the dataset) -> predictions (B, H', W', C) float32 in the target's stored units.
    """

    def __init__(self, checkpoint: str | Path, device: str = "auto"):
        ck = load_checkpoint(checkpoint)
        self.cfg = TrainConfig.model_validate(ck["config"])
        self.spec = TASKS[self.cfg.task]
        self.device = resolve_device(device)
        m = self.cfg.model
        mirror = UVMirror(ck["mirror_index"]) if ck.get("mirror_index") is not None else UVMirror()
        self.model = TaskNet(self.cfg.task, m.width, m.depth, m.max_width, mirror=mirror,
                             out_size=tuple(ck["target_shape"][:2]))
        self.model.load_state_dict(ck["model"])
        self.model.to(self.device).eval()
        self.norm = {
            k: Normalizer(FieldInfo(tuple(v["shape"]), v["dtype"]), v["offset"], v["scale"],
                          is_mask=v["is_mask"]).to(self.device)
            for k, v in ck["normalizers"].items()}
        self.input_shapes = {k: tuple(v) for k, v in ck["input_shapes"].items()}
        self.target_info = self.norm[self.spec.target].info
        self.step = ck["step"]

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor | np.ndarray]) -> np.ndarray:
        inputs = {k: self.norm[k].to_model(torch.as_tensor(np.array(batch[k], copy=True)).to(self.device))
                  for k in self.spec.inputs}
        pred = self.model(inputs)
        return self.norm[self.spec.target].to_data(pred.float()).cpu().numpy()


@dataclass
class PredictReport:
    written: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)


def _save_png(arr: np.ndarray, path: Path) -> None:
    from facecorpus.core import atomic
    from PIL import Image

    atomic.write_with(path, lambda fh: Image.fromarray(arr).save(fh, format="PNG"))


def _write_prediction(pred: np.ndarray, info: FieldInfo, stem: str, task: str, out: Path) -> str:
    """pred (H, W, C) in stored units -> NAME.<task>.png (+ .npy for float targets)."""
    png = out / f"{stem}.{task}.png"
    if info.dtype == "uint8":
        _save_png(np.clip(np.rint(pred), 0, 255).astype(np.uint8), png)
    else:
        lo = pred.reshape(-1, pred.shape[-1]).min(0)
        hi = pred.reshape(-1, pred.shape[-1]).max(0)
        vis = (pred - lo) / np.maximum(hi - lo, 1e-6)
        _save_png((vis * 255 + 0.5).astype(np.uint8), png)
        from facecorpus.core import atomic

        atomic.write_with(out / f"{stem}.{task}.npy",
                          lambda fh: np.save(fh, pred.astype(np.float32), allow_pickle=False))
    return str(png)


def load_image_input(path: Path, predictor: Predictor) -> dict[str, np.ndarray]:
    """One image file -> stored-form inputs of the predictor's task, resized to its input size.

    inpaint: an RGBA PNG whose alpha marks visible texels (alpha > 0); without alpha, texels
    that are exactly black count as holes.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            has_alpha = im.mode in ("RGBA", "LA") or "transparency" in im.info
            rgba = im.convert("RGBA")
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"{path}: unreadable image ({e})") from e
    name = predictor.spec.inputs[0]
    h, w = predictor.input_shapes[name][:2]
    if rgba.size != (w, h):
        rgba = rgba.resize((w, h), Image.BILINEAR)
    a = np.asarray(rgba)
    rgb = a[..., :3]
    if predictor.norm[name].info.dtype != "uint8":
        raise InputError(f"{path}: the checkpoint's {name} field is {predictor.norm[name].info.dtype};"
                         " image files can only feed uint8 inputs")
    if predictor.cfg.task == "inpaint":
        mask = (a[..., 3] > 0) if has_alpha else rgb.any(-1)
        return {"uv_visible": rgb[None], "uv_visible_mask": mask[None].astype(np.uint8)}
    return {"image": rgb[None]}


def predict_images(predictor: Predictor, images: str | Path, out: str | Path) -> PredictReport:
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise InputError(f"{images}: not a folder of images")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{images}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    out.mkdir(parents=True, exist_ok=True)
    rep = PredictReport()
    for p in files:
        try:
            inputs = load_image_input(p, predictor)
        except InputError as e:
            rep.rejected.append({"source_uri": str(p), "stage": "predict", "reason": str(e)})
            continue
        pred = predictor.predict(inputs)[0]
        rep.written.append(_write_prediction(pred, predictor.target_info, p.stem, predictor.cfg.task, out))
    _write_rejected(rep, out)
    return rep


def _dataset_batches(root: str, fields, filters, batch_size: int, limit: int
                     ) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
    from facecorpus.datasets.store import open_dataset

    ds = open_dataset(root)
    missing = [f for f in fields if f not in ds.schema.fields]
    if missing:
        raise InputError(f"{root}: dataset has no field(s) {missing}")
    table = ds.select(filter_expression(filters))
    ids = table.column("sample_id").to_pylist()
    idx = table.column("index").to_numpy()
    if limit:
        ids, idx = ids[:limit], idx[:limit]
    for i in range(0, len(idx), batch_size):
        sl = slice(i, i + batch_size)
        yield ids[sl], {f: ds.read(f, idx[sl]) for f in fields}


def predict_dataset(predictor: Predictor, root: str, out: str | Path, filters=(),
                    batch_size: int = 16, limit: int = 0) -> PredictReport:
    """Predict every selected sample of a dataset; files named by ``sample_id``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = PredictReport()
    for ids, batch in _dataset_batches(root, predictor.spec.inputs, filters, batch_size, limit):
        pred = predictor.predict(batch)
        for sid, p in zip(ids, pred, strict=True):
            stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in sid).lstrip(".") or "sample"
            rep.written.append(_write_prediction(p, predictor.target_info, stem, predictor.cfg.task, out))
    _write_rejected(rep, out)
    return rep


def _write_rejected(rep: PredictReport, out: Path) -> None:
    if rep.rejected:
        (out / "rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rep.rejected))
