"""Rotate-and-render views of pseudo-GT samples (seed method 000's large-pose trick).

A near-frontal pseudo-GT sample (``|yaw| < max_abs_yaw``) is rendered again at
``yaw + offset`` with its own fitted shape (``id_coeffs``, ``exp_coeffs``), pitch, roll,
camera (scale / focal, translation) and ``uv_pseudo_gt``, and composited over its photo:

- ``mask``: where the rotated face covers; there the pixel is the render.
- ``hole_mask``: where the original face was (its own render at the source pose, grown by
  ``hole_dilate_px``: the mesh outline misses the photo's face edge by a few pixels) and the
  rotated face is not. The photo there shows the *old* face, so it is not background:
  ``hole_fill="inpaint"`` takes those pixels from an OpenCV Telea inpainting of the whole
  grown original-face region from the photo around it (no old-face colour bleeds in; at
  1/``inpaint_downscale`` resolution); ``"keep"`` leaves the photo's pixels (a ghost face,
  for inspection). Either way they are not real background: a loss should ignore
  ``hole_mask``. The mesh's openings (eyes, mouth: holes of its silhouette) count as face:
  photo pixels in them are the old face's too, so a rotated opening over the old face is a
  hole. Two things keep the photo: pixels of the margin band (grown, outside the original
  face) within ``hole_dilate_px`` of the rotated face (the photo's face edge can show
  there, at most that many pixels wide), and pixels in an opening of both faces (the old
  mouth seen through the new mouth); so at offset 0 there is no hole at all.
- elsewhere: the photo unchanged. Hair, ears, neck and shoulders outside the fitted mesh do
  not rotate; they stay where the photo has them (the trick's known limit without a
  GAN-style refiner).

Shading: ``uv_pseudo_gt`` is the photo sampled into UV and completed, so it already carries
the photo's shading under the fitted light.

- ``lighting="baked"`` (default): rendered unlit exactly like the pseudo-GT re-render
  (:func:`facecorpus.tasks.pseudo_gt.rerender_metrics`: irradiance 1, one texture lookup);
  applying the fitted ``sh`` again would light the face twice. The baked shading turns with
  the face (the light moves with the head). At offset 0 a view is the pseudo-GT re-render
  bit for bit (``tests/test_rotate_render.py``).
- ``lighting="relit"``: the map is de-lit by the fitted light's irradiance at the source pose
  (:func:`facecorpus.tasks.occlusion.uv_irradiance`, floored at ``min_irradiance`` so texels
  facing away from the light, mostly prior-filled, do not blow up) and the rotated face is
  lit by the same camera-space ``sh``: the light stays with the camera. At offset 0 this is
  the baked view up to per-texel vs per-vertex irradiance (measured in the test, not exact).
  A sample without a fitted light (``sh`` all 0: stage 2 off) is rendered baked; the
  manifest's ``lighting`` column says which.

Every random draw of a sample comes from ``(seed, sample_id)`` only: views do not depend on
which shard, worker or run computes them. A view inherits its source's ``split`` and
``subject_id`` (rotations of a validation photo never land in train).

Shapes: N source samples, K views per sample, S image size (the source crop), T UV size.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np
from facecorpus.core import hashing
from facecorpus.core.errors import ConfigError, RejectedRow, SampleRejected
from facecorpus.tasks import isolation

CODE_VERSION = 1  # bump when the bytes these stages write change without a release
STAGE = "rotate"
ELIGIBILITY = "eligibility"
SOURCE_FIELDS = ("image", "uv_pseudo_gt", "id_coeffs", "exp_coeffs")  # + "sh" when stored
# the manifest columns a view is made from (and that key a shard)
SOURCE_COLUMNS = ("sample_id", "source_uri", "subject_id", "group", "split", "camera", "yaw",
                  "pitch", "roll", "scale", "focal", "tx", "ty", "tz")
SHEET_LABELS_HEAD = ["original", "re-render (offset 0)"]

# irradiance 1: the same plain texture lookup as the pseudo-GT re-render
UNLIT_SH = np.zeros(27, np.float32)
UNLIT_SH[0::9] = 2 / np.sqrt(np.pi)


# --------------------------------------------------------------------------- records
@dataclass
class SourceBatch:
    """N stored pseudo-GT samples: ``image`` (N, S, S, 3) uint8 photo crop,
    ``uv_pseudo_gt`` (N, T, T, 3) uint8, ``id_coeffs`` (N, K_id) and ``exp_coeffs`` (N, K_exp)
    float32, ``rows`` N manifest rows (at least :data:`SOURCE_COLUMNS`), ``sh`` (N, 27)
    fitted light (0 without stage 2) or None."""

    image: np.ndarray
    uv_pseudo_gt: np.ndarray
    id_coeffs: np.ndarray
    exp_coeffs: np.ndarray
    rows: list[dict]
    sh: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def uri(self, i: int) -> str:
        return f"{self.rows[i]['source_uri']}#{self.rows[i]['sample_id']}"


@dataclass
class Rotated:
    """Views of a batch: ``arrays`` image (M, S, S, 3) uint8, mask and hole_mask (M, S, S, 1)
    uint8 0/1; ``rows`` M manifest rows; ``rejected`` one row per refused source sample;
    ``accepted`` source indices with views (all K or none); ``sheet_rows`` per accepted
    sample: photo, re-render at the source pose, K views, view 1's holes in red."""

    arrays: dict
    rows: list[dict] = field(default_factory=list)
    rejected: list[RejectedRow] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    sheet_rows: list = field(default_factory=list)


def sheet_labels(k: int) -> list[str]:
    return [*SHEET_LABELS_HEAD, *(f"view {j + 1}" for j in range(k)), "view 1 holes (red)"]


# --------------------------------------------------------------------------- pure functions
def source_fit(row: dict, id_coeffs: np.ndarray, exp_coeffs: np.ndarray, image_size: int,
               yaw_offset: float = 0.0):
    """The stored fit of one sample as a one-row :class:`facecorpus.tasks.fit.FitResult`
    (so its ``vertices`` / ``camera_for`` are the pseudo-GT flow's own), yaw + offset."""
    from facecorpus.tasks.fit import FitResult

    ortho = row["camera"] == "orthographic"
    t = [row["tx"], row["ty"]] if ortho else [row["tx"], row["ty"], row["tz"]]
    one = lambda x: np.array([x], np.float64)
    return FitResult(camera=row["camera"], image_size=int(image_size),
                     yaw=one(row["yaw"] + yaw_offset), pitch=one(row["pitch"]),
                     roll=one(row["roll"]), translation=np.array([t], np.float64),
                     scale=one(row["scale"]), focal=one(row["focal"]),
                     alpha=np.asarray(id_coeffs, np.float32)[None],
                     beta=np.asarray(exp_coeffs, np.float32)[None],
                     landmark_rmse=one(np.nan), landmark_nme=one(np.nan),
                     iterations=np.zeros(1, np.int32), converged=np.ones(1, bool))


def render_view(model, vertices: np.ndarray, camera, uv_texture: np.ndarray,
                sh: np.ndarray = UNLIT_SH) -> tuple[np.ndarray, np.ndarray]:
    """The pseudo-GT re-render's pass: (V, 3) mesh, a camera and a (T, T, 3) float texture
    -> (image (S, S, 3) float32, mask (S, S) bool); with the default ``sh`` an unlit texture
    lookup, else the texture lit by the (27,) camera-space ``sh``."""
    from facecorpus.renderers.render import render

    r = render(vertices, model.triangles, camera, outputs=("image",), uv=model.uv,
               uv_triangles=model.uv_triangles, uv_texture=uv_texture, sh=sh)
    return r.image[0], r.mask[0]


def draw_offsets(seed: int, sample_ids, k: int, lo: float, hi: float) -> np.ndarray:
    """(N, k) float64 yaw offsets: |offset| ~ U[lo, hi], sign random, from (seed, sample id)."""
    out = np.zeros((len(sample_ids), k), np.float64)
    for i, sid in enumerate(sample_ids):
        h = int.from_bytes(hashlib.sha256(str(sid).encode()).digest()[:8], "little")
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, h])
        out[i] = rng.uniform(lo, hi, k) * rng.choice([-1.0, 1.0], k)
    return out


def eligible(batch: SourceBatch, max_abs_yaw: float) -> tuple[list[int], list[RejectedRow]]:
    """Samples with finite ``|yaw| < max_abs_yaw``; the others are rejected rows of stage
    ``eligibility`` (not failures: the reason says the pose is out of range), so
    ``inputs = accepted + rejected`` holds with the same counting as every other stage."""
    keep, rej = [], []
    for i, r in enumerate(batch.rows):
        y = float(r["yaw"])
        if np.isfinite(y) and abs(y) < max_abs_yaw:
            keep.append(i)
        else:
            rej.append(RejectedRow(batch.uri(i), ELIGIBILITY,
                                   f"|yaw| {abs(y):.1f} >= max_abs_yaw {max_abs_yaw:g}",
                                   extra={"source_sample_id": str(r["sample_id"])}))
    return keep, rej


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    if px <= 0:
        return mask
    import cv2

    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return cv2.dilate(mask.astype(np.uint8), k) > 0


def _to_u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(x, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def delit_texture(model, vertices: np.ndarray, rotation: np.ndarray, sh: np.ndarray,
                  uv_texture: np.ndarray, min_irradiance: float = 0.25) -> np.ndarray:
    """(T, T, 3) float32 albedo: ``uv_texture`` / the irradiance of ``sh`` (27,) on the mesh
    seen with ``rotation`` (3, 3), floored at ``min_irradiance`` (off-layout texels kept)."""
    from facecorpus.tasks.occlusion import uv_irradiance

    irr = uv_irradiance(model, vertices, rotation, sh, uv_texture.shape[0])
    on = (irr != 0).any(-1, keepdims=True)
    return np.where(on, uv_texture / np.maximum(irr, np.float32(min_irradiance)),
                    uv_texture).astype(np.float32)


def inpaint(image: np.ndarray, region: np.ndarray, radius: float = 5.0, downscale: int = 2
            ) -> np.ndarray:
    """(S, S, 3) uint8 ``image`` with the (S, S) bool ``region`` filled by OpenCV Telea from
    the pixels around it, at 1/``downscale`` resolution and resized back (Telea's cost grows
    with the region's pixels; the fill is a smooth guess at any scale; docs/benchmarks.md
    gives both); pixels outside ``region`` are the image's own."""
    import cv2

    img = np.ascontiguousarray(image)
    if downscale <= 1:
        return cv2.inpaint(img, region.astype(np.uint8), float(radius), cv2.INPAINT_TELEA)
    H, W = region.shape
    h, w = max(H // downscale, 1), max(W // downscale, 1)
    small = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    # a low-res pixel touched by the region is filled (no region colour leaks into the fill)
    m = cv2.resize(region.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) > 0
    fill = cv2.resize(cv2.inpaint(small, m.astype(np.uint8), max(radius / downscale, 1.0),
                                  cv2.INPAINT_TELEA), (W, H), interpolation=cv2.INTER_LINEAR)
    return np.where(region[..., None], fill, img)


def rotate_sample(model, batch: SourceBatch, i: int, offsets, *, hole_fill: str = "inpaint",
                  hole_dilate_px: int = 3, inpaint_radius: float = 5.0, inpaint_downscale: int = 2,
                  min_mask_px: int = 64, lighting: str = "baked",
                  min_irradiance: float = 0.25) -> dict:
    """All views of source sample ``i`` at yaw + ``offsets`` (K,) degrees.

    Returns ``image`` (K, S, S, 3) uint8, ``mask`` / ``hole_mask`` (K, S, S) bool, the float
    renders ``render`` (K, S, S, 3), ``render0`` / ``mask0`` (the baked re-render at the
    source pose) and ``lighting`` (what was used: "relit" needs a fitted, non-zero sh).
    Raises :class:`SampleRejected` (with the reason) when a view cannot be used."""
    row, photo = batch.rows[i], batch.image[i]
    S, uri = photo.shape[0], batch.uri(i)
    fit0 = source_fit(row, batch.id_coeffs[i], batch.exp_coeffs[i], S)
    v = fit0.vertices(model, 0)
    if not np.isfinite(v).all():
        raise SampleRejected(uri, STAGE, "non-finite fitted shape")
    tex = batch.uv_pseudo_gt[i].astype(np.float32) / np.float32(255.0)
    img0, m0 = render_view(model, v, fit0.camera_for(0), tex)
    if m0.sum() < min_mask_px:
        raise SampleRejected(uri, STAGE, f"the face covers {int(m0.sum())} px at its own pose "
                                         f"(< min_mask_px {min_mask_px})")
    from scipy.ndimage import binary_fill_holes

    # the mesh's openings (eyes, mouth) belong to the face: their photo pixels are the old
    # face's too
    m0f = binary_fill_holes(m0)
    grown = _dilate(m0f, hole_dilate_px)
    ring, open0 = grown & ~m0f, m0f & ~m0
    sh = None if batch.sh is None else np.asarray(batch.sh[i], np.float32)
    lit = lighting == "relit" and sh is not None and np.isfinite(sh).all() and bool(sh.any())
    if lit:
        tex_k, sh_k = delit_texture(model, v, fit0.camera_for(0).rotation, sh, tex,
                                    min_irradiance), sh
    else:
        tex_k, sh_k = tex, UNLIT_SH
    background = (inpaint(photo, grown, inpaint_radius, inpaint_downscale)
                  if hole_fill == "inpaint" else photo)
    out = {k: [] for k in ("image", "mask", "hole_mask", "render")}
    for k, off in enumerate(np.asarray(offsets, np.float64)):
        fk = source_fit(row, batch.id_coeffs[i], batch.exp_coeffs[i], S, float(off))
        img, m = render_view(model, v, fk.camera_for(0), tex_k, sh_k)
        if not np.isfinite(img).all():
            raise SampleRejected(uri, STAGE, f"view {k}: non-finite render")
        if m.sum() < min_mask_px:
            raise SampleRejected(uri, STAGE, f"view {k} (yaw {row['yaw'] + off:+.1f}): the "
                                             f"rotated face covers {int(m.sum())} px (< "
                                             f"min_mask_px {min_mask_px})")
        # the original face's margin band keeps the photo where it also borders the rotated
        # face, and an opening of both faces at one pixel keeps it too (so offset 0 leaves
        # no hole at all); the old face itself never stays
        opened = binary_fill_holes(m) & ~m
        hole = grown & ~m & ~(ring & _dilate(m, hole_dilate_px)) & ~(open0 & opened)
        out["image"].append(np.where(m[..., None], _to_u8(img),
                                     np.where(hole[..., None], background, photo)))
        out["mask"].append(m)
        out["hole_mask"].append(hole)
        out["render"].append(img)
    res = {k: np.stack(x) for k, x in out.items()}
    res["render0"], res["mask0"] = img0, m0
    res["lighting"] = "relit" if lit else "baked"
    return res


def rotate_batch(model, batch: SourceBatch, offsets: np.ndarray, *, max_abs_yaw: float = 30.0,
                 hole_fill: str = "inpaint", hole_dilate_px: int = 3,
                 inpaint_radius: float = 5.0, inpaint_downscale: int = 2, min_mask_px: int = 64,
                 lighting: str = "baked", min_irradiance: float = 0.25,
                 sheets: bool = True) -> Rotated:
    """Eligibility, then every view of every eligible sample (``offsets`` (N, K) degrees),
    each sample isolated: an exception or a failed view rejects that sample (stage
    ``rotate``) and the others go on. See the module docstring for the compositing."""
    S = batch.image.shape[1] if len(batch) else 1
    K = offsets.shape[1] if offsets.ndim == 2 else 0
    keep, rejected = eligible(batch, max_abs_yaw)
    kw = {"hole_fill": hole_fill, "hole_dilate_px": hole_dilate_px,
          "inpaint_radius": inpaint_radius, "inpaint_downscale": inpaint_downscale,
          "min_mask_px": min_mask_px,
          "lighting": lighting, "min_irradiance": min_irradiance}
    kept, made, rej = isolation.each(
        STAGE, [batch.uri(i) for i in keep],
        lambda i: rotate_sample(model, batch, i, offsets[i], **kw), keep)
    rejected += [dataclasses.replace(r, extra={"source_sample_id": str(
        batch.rows[keep[j]]["sample_id"])}) for j, r in zip(
        sorted(set(range(len(keep))) - set(kept)), rej, strict=True)]
    res = Rotated({}, rejected=rejected, accepted=[keep[j] for j in kept])
    cols = {"image": [], "mask": [], "hole_mask": []}
    for i, m in zip(res.accepted, made, strict=True):
        cols["image"].append(m["image"])
        cols["mask"].append(m["mask"][..., None].astype(np.uint8))
        cols["hole_mask"].append(m["hole_mask"][..., None].astype(np.uint8))
        src = batch.rows[i]
        for k in range(K):
            n_face = int(m["mask"][k].sum())
            res.rows.append({
                "sample_id": f"{src['sample_id']}-r{k}", "source_uri": src["source_uri"],
                "source_sample_id": str(src["sample_id"]), "subject_id": src["subject_id"],
                "group": src.get("group") or "", "split": src.get("split") or "train",
                "view_index": k, "yaw": float(src["yaw"] + offsets[i, k]),
                "pitch": float(src["pitch"]), "roll": float(src["roll"]),
                "source_yaw": float(src["yaw"]), "yaw_offset": float(offsets[i, k]),
                "camera": src["camera"], "scale": float(src["scale"]),
                "focal": float(src["focal"]), "tx": float(src["tx"]), "ty": float(src["ty"]),
                "tz": float(src["tz"]), "mask_px": n_face, "lighting": m["lighting"],
                "hole_px": int(m["hole_mask"][k].sum())})
        if sheets:
            photo = batch.image[i]
            holes = np.where(m["hole_mask"][0][..., None], np.array([255, 0, 0], np.uint8),
                             m["image"][0])
            r0 = np.where(m["mask0"][..., None], m["render0"], photo / 255.0 * 0.3)
            res.sheet_rows.append([photo, r0, *m["image"], holes])
    z = lambda shape: np.zeros((0, *shape), np.uint8)
    res.arrays = {"image": np.concatenate(cols["image"]) if made else z((S, S, 3)),
                  "mask": np.concatenate(cols["mask"]) if made else z((S, S, 1)),
                  "hole_mask": np.concatenate(cols["hole_mask"]) if made else z((S, S, 1))}
    return res


# --------------------------------------------------------------------------- the source
def open_source(path: str):
    """(root, :class:`~facecorpus.datasets.store.StoredDataset`) of a pseudo-GT dataset;
    ConfigError naming the path when it is not one (before any work)."""
    import fsspec
    from facecorpus.datasets.store import StoreError, open_dataset

    root = str(path).rstrip("/")
    fs, p = fsspec.core.url_to_fs(root)
    if not fs.exists(f"{p}/schema.json") and fs.exists(f"{p}/dataset/schema.json"):
        root = f"{root}/dataset"
    try:
        ds = open_dataset(root)
    except (FileNotFoundError, OSError, StoreError) as e:
        raise ConfigError(f"{path}: not a dataset ({e})") from None
    missing = [f for f in SOURCE_FIELDS if f not in ds.schema.fields]
    if ds.schema.producer != "pseudo_gt" or missing:
        raise ConfigError(f"{root}: not a pseudo-GT dataset (producer "
                          f"{ds.schema.producer!r}, missing fields {missing})")
    return root, ds


def load_model(ds, spec: str | None):
    """The model the source was made with (``spec`` or the source's config), checked
    against the source's ``model_hash``."""
    from facecorpus.meshops.catalog import load_model as catalog_load

    attrs = ds.schema.attrs
    spec = spec or (attrs.get("config") or {}).get("model") or attrs.get("model")
    model = catalog_load(spec)
    want = attrs.get("model_hash")
    if want and model.content_hash() != want:
        raise ConfigError(f"{ds.url} was made with another model (model_hash {want[:12]} != "
                          f"{model.content_hash()[:12]} of '{spec}')")
    return model


def source_rows(ds, indices) -> list[dict]:
    """Manifest rows (:data:`SOURCE_COLUMNS` present) of the given global indices, in order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    man = ds.manifest
    cols = [c for c in ("index", *SOURCE_COLUMNS) if c in man.column_names]
    sub = man.filter(pc.is_in(man.column("index"), pa.array(list(indices), pa.int64())))
    by = {r["index"]: r for r in sub.select(cols).to_pylist()}
    return [{"tz": 0.0, "group": "", "split": "train", **by[int(i)]} for i in indices]


def read_sources(ds, indices) -> SourceBatch:
    """The :class:`SourceBatch` of the given global indices."""
    idx = np.asarray(list(indices), np.int64)
    a = {f: ds.read(f, idx) for f in SOURCE_FIELDS}
    sh = ds.read("sh", idx) if "sh" in ds.schema.fields else None
    return SourceBatch(a["image"], a["uv_pseudo_gt"], a["id_coeffs"], a["exp_coeffs"],
                       source_rows(ds, idx), sh)


def shard_content(ds, lo: int, hi: int) -> tuple[list[int], str]:
    """(global indices of the committed source samples in [lo, hi), a digest of their
    content: the commit records of the source shards they are in and their manifest rows)."""
    man = ds.manifest
    index = man.column("index").to_numpy()
    sel = np.flatnonzero((index >= lo) & (index < hi))
    idx = [int(index[j]) for j in sel]
    sps = ds.schema.samples_per_shard
    recs = sorted({i // sps for i in idx})
    cols = [c for c in SOURCE_COLUMNS if c in man.column_names]
    rows = man.take(sel).select(cols).to_pydict() if len(sel) else {}
    infos = [(s, ds.shards[s].key, ds.shards[s].checksums) for s in recs]
    return idx, hashing.digest(infos, rows, idx, n=32)


def schema(S: int, k: int, samples_per_shard: int, attrs: dict, compression_level: int = 3):
    """The rotated views' dataset: ``samples_per_shard`` source samples x ``k`` views."""
    from facecorpus.datasets.store import DatasetSchema, FieldSpec

    f = {"image": FieldSpec((S, S, 3), "uint8", "srgb", "the rotated face (unlit "
                            "uv_pseudo_gt lookup) over the photo, holes filled"),
         "mask": FieldSpec((S, S, 1), "uint8", "0/1", "1 where the rotated face covers"),
         "hole_mask": FieldSpec((S, S, 1), "uint8", "0/1", "where the original face was and "
                                "the rotated one is not: filled, not real background")}
    return DatasetSchema(f, samples_per_shard=samples_per_shard * k, samples_per_chunk=k,
                         producer="rotate_render", attrs=attrs, compression_level=compression_level,
                         config_hash=hashing.digest(S, k, samples_per_shard, n=32))
