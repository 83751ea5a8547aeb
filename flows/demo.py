"""`facecorpus demo`: the main job on built-in defaults, as a list of steps.

Each step is ``(name, function(ctx) -> None)`` in :data:`STEPS`; a step reads what earlier
steps left in the :class:`DemoContext` and records its outputs there. Later stages append
their steps (fit photos, unwrap, pseudo-GT, synthesis, dataset, training) to the list.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from facecorpus.core import atomic

log = logging.getLogger("facecorpus.demo")


@dataclass
class DemoContext:
    out: Path
    input: Path | None = None
    model: object | None = None  # MorphableModel once the model step ran
    model_note: str = ""
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path, for the summary
    facts: dict[str, object] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def say(self, msg: str) -> None:
        print(f"[demo] {msg}", flush=True)


def step_model(ctx: DemoContext) -> None:
    """The default model: ICT-FaceKit (face) from the mirror/cache/public repository; if no
    source is reachable, say so plainly and use the procedural test model."""
    from facecorpus.core.errors import AssetUnavailableError
    from facecorpus.meshops.ict import build_ict_facekit
    from facecorpus.meshops.procedural import procedural_model

    try:
        ctx.model = build_ict_facekit(None, "face")
        ctx.model_note = f"ICT-FaceKit face model from {ctx.model.provenance.source}"
    except AssetUnavailableError as e:
        ctx.say(f"ICT-FaceKit is not reachable ({e}).")
        ctx.say("Continuing with the procedural test model (a geometric fixture, not a face "
                "model): set FACECORPUS_ASSETS to a folder holding "
                "models/ict-facekit/ICT-FaceKit-FaceXModel.tar.xz to use ICT-FaceKit.")
        ctx.model = procedural_model()
        ctx.model_note = "procedural test model (ICT-FaceKit unreachable)"
    m = ctx.model
    ctx.say(f"model: {ctx.model_note}: {m.n_vertices} vertices, {m.n_id} identity modes, "
            f"{m.n_exp} expression modes, {m.landmarks.size} landmarks")
    ctx.facts["model"] = {"name": m.name, "vertices": m.n_vertices, "identity_modes": m.n_id,
                          "expression_modes": m.n_exp, "landmarks": int(m.landmarks.size),
                          "source": m.provenance.source, "note": ctx.model_note}


def step_preview(ctx: DemoContext) -> None:
    path, how = write_model_preview(ctx.model, ctx.out / "model_preview.png")
    ctx.artifacts["model_preview"] = str(path)
    ctx.say(f"preview: {path} ({how})")


def step_pseudo_gt(ctx: DemoContext) -> None:
    """Photos -> pseudo-GT UV maps (flows/pseudo_gt.py, Prefect on threads) with the demo's
    model on scikit-image's astronaut, or on every photo of ``--input``."""
    from facecorpus.flows import pseudo_gt, summary

    out = ctx.out / "pseudo_gt"
    if ctx.input is not None:
        inputs = str(ctx.input)
    else:
        from PIL import Image
        from skimage.data import astronaut

        folder = ctx.out / "inputs"
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / "astronaut.png"
        if not p.is_file():
            Image.fromarray(astronaut()).save(p)
        inputs = str(folder)
    # the demo's model step falls back to the procedural fixture when ICT is unreachable
    model = "ict" if ctx.model is not None and ctx.model.name.startswith("ict") else "procedural"
    cfg = pseudo_gt.load_config(None, {"model": model, "task_runner": "threads"})
    ctx.say(f"pseudo-GT flow on {inputs} with the {model} model ...")
    s = pseudo_gt.run_pseudo_gt(cfg, inputs, out)
    ctx.artifacts["pseudo_gt_dataset"] = str(out / pseudo_gt.DATASET)
    ctx.artifacts["pseudo_gt_summary"] = str(out / "summary.json")
    if s["sheets"]:
        ctx.artifacts["pseudo_gt_sheet"] = s["sheets"][0]
    ctx.facts["pseudo_gt"] = {k: s[k] for k in ("inputs", "accepted", "rejected",
                                                "counts_add_up", "landmark_sources",
                                                "converged_fraction", "medians",
                                                "rejected_by_reason")}
    for line in summary.format_pseudo_gt(s).splitlines():
        ctx.say(line)


def step_synthesis(ctx: DemoContext) -> None:
    """``configs/synthesis_demo.yaml`` on the demo's model, with the demo's pseudo-GT dataset
    as sources when an earlier step made one (else random model samples). Shards run in this
    process (no Prefect server start for 8 faces)."""
    from facecorpus.configs import default_config_path
    from facecorpus.flows import synthesis

    out = Path(ctx.out) / "synthesis"
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.npz"
    if not model_path.is_file():
        ctx.model.save(model_path)
    overrides: dict = {"model": str(model_path)}
    pgt = next((p for k, p in sorted(ctx.artifacts.items())
                if "pseudo_gt" in k and (Path(p) / "schema.json").is_file()), None)
    if pgt:
        overrides.update({"subjects.source": "pseudo_gt", "subjects.dataset": str(pgt),
                          "augment.group_ratios": None})
    cfg = synthesis.load_config(default_config_path("synthesis_demo.yaml"), overrides)
    s = synthesis.run_shards(cfg, out)
    ctx.artifacts["synthesis_views"] = str(out / synthesis.VIEWS)
    ctx.artifacts["synthesis_faces"] = str(out / synthesis.FACES)
    if s.get("sheet"):
        ctx.artifacts["synthesis_sheet"] = s["sheet"]
    ctx.facts["synthesis"] = {k: s[k] for k in ("faces", "pairs", "poses_per_face",
                                                "rejected_draws", "faces_by_group")}
    ctx.facts["synthesis"]["sources"] = f"pseudo-GT dataset {pgt}" if pgt else "random samples"
    ctx.say(f"synthesis: {s['faces']} faces x {s['poses_per_face']} poses = {s['pairs']} "
            f"image/PNCC pairs from {ctx.facts['synthesis']['sources']}; sheet {s.get('sheet')}")


STEPS: list[tuple[str, Callable[[DemoContext], None]]] = [
    ("model", step_model),
    ("preview", step_preview),
    ("pseudo_gt", step_pseudo_gt),
    ("synthesis", step_synthesis),  # keep last: it uses the pseudo-GT step's dataset if any
]


def write_model_preview(model, path: str | os.PathLike) -> tuple[Path, str]:
    """The renderers' preview if present, else a contact sheet of orthographic sketches:
    shaded front, shaded yaw 45, NCC colours, and the UV layout coloured by NCC."""
    path = Path(path)
    try:
        from facecorpus.renderers.preview import write_preview
    except ModuleNotFoundError as e:
        if e.name != "facecorpus.renderers.preview":
            raise
    else:
        out = write_preview(model, path)
        return Path(out) if out else path, "renderers.preview"
    import numpy as np
    from facecorpus.meshops.geometry import ncc
    from facecorpus.meshops.sketch import sketch
    from facecorpus.meshops.uv import rasterize_uv
    from facecorpus.sheets import contact_sheet

    code = ncc(model.vertices)
    raster = rasterize_uv(model.uv, model.uv_triangles, 256)
    uv_img = np.zeros((256, 256, 3), np.float32)
    hit = raster.mask
    tri = model.triangles[raster.texel_face[hit]]
    uv_img[hit] = np.einsum("mi,mij->mj", raster.texel_bary[hit], code[tri])
    lm = sketch(model.vertices, model.triangles, size=256)
    rows = [[lm, sketch(model.vertices, model.triangles, size=256, yaw=45),
             sketch(model.vertices, model.triangles, code, size=256, shade=False), uv_img]]
    contact_sheet(rows, path, cell=256, labels=["front", "yaw 45", "NCC", "UV (NCC)"])
    return path, "meshops.sketch contact sheet"


def run_demo(out: str | os.PathLike = "out/demo", input: str | os.PathLike | None = None,
             steps: list[str] | None = None) -> DemoContext:
    ctx = DemoContext(out=Path(out), input=Path(input) if input else None)
    ctx.out.mkdir(parents=True, exist_ok=True)
    for name, fn in STEPS:
        if steps is not None and name not in steps:
            continue
        t0 = time.perf_counter()
        fn(ctx)
        ctx.timings[name] = round(time.perf_counter() - t0, 2)
    summary = {"steps": ctx.timings, "artifacts": ctx.artifacts, "facts": ctx.facts}
    atomic.write_json(ctx.out / "demo_summary.json", summary, default=str)
    ctx.say(f"done in {sum(ctx.timings.values()):.1f} s: {ctx.out / 'demo_summary.json'}")
    return ctx


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on built-in defaults")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--input", default=None, help="folder of photos (default: built-in images)")
    p.add_argument("--steps", default=None,
                   help=f"comma-separated subset of: {', '.join(n for n, _ in STEPS)}")
    p.set_defaults(func=lambda a: run_demo(a.out, a.input,
                                           a.steps.split(",") if a.steps else None) and 0)
