"""The texture prior as a versioned artefact of a pseudo-GT run.

Built once (from the first run's analyses, or from the model's albedo / a user texture),
stored as ``OUT/prior/prior-<version>.npz`` with ``OUT/prior/current.json`` naming the active
version and the recipe it was built with. Later runs reuse it, so a new photo never changes
the prior and never invalidates finished shards; it is rebuilt only on request
(``--rebuild-prior``), when its recipe (prior config, model, UV size, a user texture's bytes)
changed, or when the corpus has grown past ``prior.rebuild_growth`` times the images it was
built from. Every shard's key and manifest rows carry the version they were finished with.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
from facecorpus.core import hashing
from facecorpus.flows import shards
from facecorpus.tasks import albedo as albedo_mod

log = logging.getLogger("facecorpus.prior")

PRIOR_DIR = "prior"


@dataclass
class StoredPrior:
    prior: object  # tasks.prior.TexturePrior
    version: str
    meta: dict


def recipe(cfg, model_hash: str) -> dict:
    """What a prior is built from besides the images: changing any of it rebuilds it."""
    pc = cfg.prior
    return {"prior": pc.model_dump(mode="json", exclude={"rebuild_growth"}),
            "texture_sha256": hashing.file_sha256(pc.texture) if pc.texture else None,
            "model": model_hash, "uv_size": cfg.unwrap.uv_size,
            # only for this kind: the other recipes keep their bytes (and stored priors)
            **({"dataset": albedo_mod.dataset_content(pc.dataset)}
               if pc.kind == "albedo_dataset" else {}),
            # a corpus prior is built from the texels the occlusion cues leave
            **({"occlusion": cfg.occlusion.model_dump(mode="json")}
               if pc.kind in ("corpus", "auto") else {})}


def needs_corpus(cfg, model) -> bool:
    k = cfg.prior.kind
    return k == "corpus" or (k == "auto" and not model.has_albedo)


def _version(prior) -> str:
    parts = [prior.source, prior.mean]
    if prior.basis is not None:
        parts += [prior.basis, prior.std]
    return hashing.digest(*parts, n=16)


def load_current(out: str, want_recipe: dict) -> StoredPrior | None:
    """The stored prior when its recipe matches, else None."""
    from facecorpus.tasks.prior import TexturePrior

    p = shards.join(out, PRIOR_DIR, "current.json")
    data = shards.get_bytes(p)
    if data is None:
        return None
    meta = json.loads(data)
    if meta.get("recipe") != json.loads(hashing.stable_json(want_recipe)):
        log.info("texture prior %s was built with another recipe: rebuilding", meta["version"])
        return None
    z = np.load(io.BytesIO(shards.get_bytes(shards.join(out, PRIOR_DIR, meta["file"]))),
                allow_pickle=False)
    prior = TexturePrior(z["mean"], z.get("basis"), z.get("std"), str(z["source"]))
    return StoredPrior(prior, meta["version"], meta)


def save(out: str, prior, want_recipe: dict, n_images: int, layout: np.ndarray) -> StoredPrior:
    """Store a newly built prior and make it the current one; ``OUT/prior.png`` shows it."""
    from PIL import Image

    prior.mean = np.where(layout[..., None], prior.mean, 0).astype(np.float32)
    version = _version(prior)
    arrays = {"mean": prior.mean, "source": np.array(prior.source)}
    if prior.basis is not None:
        arrays.update(basis=prior.basis, std=prior.std)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    name = f"prior-{version}.npz"
    shards.put_bytes(shards.join(out, PRIOR_DIR, name), buf.getvalue())
    meta = {"version": version, "file": name, "source": prior.source, "n_images": n_images,
            "recipe": json.loads(hashing.stable_json(want_recipe)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    png = io.BytesIO()
    Image.fromarray((np.clip(prior.mean, 0, 1) * 255 + 0.5).astype(np.uint8)).save(png, "PNG")
    shards.put_bytes(shards.join(out, "prior.png"), png.getvalue())
    # current.json last: a run killed before it keeps using the previous prior
    shards.put_bytes(shards.join(out, PRIOR_DIR, "current.json"),
                     json.dumps(meta, indent=1).encode())
    return StoredPrior(prior, version, meta)


def grown_past(stored: StoredPrior | None, n_inputs: int, growth: float | None) -> bool:
    if stored is None or growth is None or stored.meta.get("source") not in (
            "corpus", "corpus+pca"):
        return False
    return n_inputs > growth * max(int(stored.meta.get("n_images", 0)), 1)


def _npz(path: str):
    return np.load(io.BytesIO(shards.get_bytes(path)), allow_pickle=False)


def build(cfg, state, analysis_paths: list[str]) -> tuple[object, int]:
    """The prior from analysed shards (an even subsample of at most ``prior.max_images``
    images over the corpus, read shard by shard: only the selected maps are ever decoded)."""
    from facecorpus.tasks.masks import trim_edge
    from facecorpus.tasks.prior import build_prior

    pc, T = cfg.prior, cfg.unwrap.uv_size
    if pc.kind == "albedo_dataset":  # de-lit maps of another run: no corpus needed
        return albedo_mod.albedo_prior_from_dataset(
            pc.dataset, uv_size=T, mirror_map=state.mirror_map, max_images=pc.max_images,
            pca_rank=pc.pca_rank, pca_min_images=pc.pca_min_images), 0
    counts = []
    for p in analysis_paths:
        with _npz(p) as z:
            counts.append(len(z["sample_uri"]))
    total = sum(counts)
    vis, msk = [np.zeros((0, T, T, 3), np.float32)], [np.zeros((0, T, T), bool)]
    if total:
        sel = np.unique(np.linspace(0, total - 1, min(total, pc.max_images)).round()
                        .astype(int))
        start = 0
        for p, n in zip(analysis_paths, counts, strict=True):
            local = sel[(sel >= start) & (sel < start + n)] - start
            start += n
            if local.size:
                with _npz(p) as z:
                    vis.append(z["uv_visible"][local].astype(np.float32))
                    m = z["uv_visible_mask"][local]
                    if "uv_occlusion_mask" in z.files:  # occluded texels: not face colour
                        m = m & ~z["uv_occlusion_mask"][local]
                    msk.append(m)
    vis, msk = np.concatenate(vis), trim_edge(np.concatenate(msk), pc.edge_trim)
    if needs_corpus(cfg, state.model) and not len(vis):
        from facecorpus.core.errors import InputError

        raise InputError("no image was analysed successfully: a corpus texture prior cannot "
                         "be built (see the rejected rows)")
    prior = build_prior(vis, msk, model=state.model, mirror_map=state.mirror_map, kind=pc.kind,
                        texture_path=pc.texture, pca_rank=pc.pca_rank,
                        pca_min_images=pc.pca_min_images, min_support=pc.min_support)
    return prior, len(vis)


def reusable(out: str, cfg, state, n_inputs: int) -> StoredPrior | None:
    """The stored prior a run may use as is; None when one must be built from the corpus
    (none stored, another recipe, or the corpus grew past ``prior.rebuild_growth``). A prior
    that needs no corpus (model albedo, user texture) is built and stored here."""
    rec = recipe(cfg, state.model.content_hash())
    stored = load_current(out, rec)
    if grown_past(stored, n_inputs, cfg.prior.rebuild_growth):
        log.info("corpus has grown past %sx the prior's %s images: rebuilding it",
                 cfg.prior.rebuild_growth, stored.meta["n_images"])
        return None
    if stored is None and not needs_corpus(cfg, state.model):
        stored = build_and_save(out, cfg, state, [])
    return stored


def build_and_save(out: str, cfg, state, analysis_paths: list[str]) -> StoredPrior:
    """:func:`build` from these analyses, stored under ``out`` as the current prior."""
    prior, n = build(cfg, state, analysis_paths)
    stored = save(out, prior, recipe(cfg, state.model.content_hash()), n, state.layout)
    log.info("texture prior %s built (%s, %d images)", stored.version, prior.source, n)
    return stored
