"""`facecorpus model build | info | preview`: build, inspect and look at morphable models.

Heavy imports stay inside the handlers so ``facecorpus --help`` answers at once.
"""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("model", help="build, inspect and preview morphable models")
    cmds = p.add_subparsers(dest="model_cmd", metavar="CMD")

    b = cmds.add_parser("build", help="build a model into the cache (or --out)")
    b.add_argument("name", choices=["ict-facekit", "procedural", "file"],
                   help="ict-facekit: from the OBJ set; procedural: the test fixture; "
                        "file: convert a BFM/FLAME/3DDFA file given as --source")
    b.add_argument("--source", default=None,
                   help="ict-facekit: FaceXModel folder, .tar.xz archive or URL (default: "
                        "$FACECORPUS_ASSETS mirror, else the public repository); "
                        "file: the model file")
    b.add_argument("--region", default="face", choices=["face", "narrow", "head"])
    b.add_argument("--landmarks", default=None,
                   help="file: 68 landmark vertex indices for formats without them (.anl "
                        "1-based as BFMLandmarks ships them, or 0-based .npy/.txt)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--out", default=None, help="also write the .npz here")
    b.set_defaults(func=_build)

    i = cmds.add_parser("info", help="counts, modes, landmarks, regions, UV, symmetry, licence")
    i.add_argument("model", help="procedural | ict-facekit[:region] | path to a model file")
    i.add_argument("--uv-size", type=int, default=256)
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_info)

    v = cmds.add_parser("preview", help="write a PNG preview of a model")
    v.add_argument("model", help="procedural | ict-facekit[:region] | path to a model file")
    v.add_argument("--out", required=True, help="PNG path")
    v.set_defaults(func=_preview)
    p.set_defaults(func=lambda args: p.print_help() or 1)


def _build(args) -> int:
    import time

    from facecorpus.core.errors import InputError

    t0 = time.perf_counter()
    if args.name == "ict-facekit":
        from facecorpus.meshops.ict import build_ict_facekit, ict_cache_path

        model = build_ict_facekit(args.source, args.region, force=args.force)
        where = ict_cache_path(args.region)
    elif args.name == "procedural":
        from facecorpus.meshops.procedural import procedural_model

        model, where = procedural_model(), None
    else:
        if not args.source:
            raise InputError("model build file: --source PATH is required")
        from facecorpus.meshops.loaders import load_model_file

        kw = {}
        if args.landmarks:
            kw["landmarks"] = args.landmarks  # a file: read by meshops.loaders
        model, where = load_model_file(args.source, **kw), None
    if args.out:
        where = model.save(args.out)
    print(f"{model.name}: {model.n_vertices} vertices, {model.n_id} identity modes, "
          f"{model.n_exp} expression modes, {model.landmarks.size} landmarks "
          f"({time.perf_counter() - t0:.1f} s)" + (f" -> {where}" if where else ""))
    return 0


def _info(args) -> int:
    from facecorpus.meshops.catalog import describe, load_model

    d = describe(load_model(args.model), uv_size=args.uv_size)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    names = d.pop("expression_names")
    for k, val in d.items():
        print(f"{k:24s} {val}")
    if names:
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        print(f"{'expressions':24s} {shown}")
    return 0


def _preview(args) -> int:
    from facecorpus.flows.demo import write_model_preview
    from facecorpus.meshops.catalog import load_model

    path, how = write_model_preview(load_model(args.model), args.out)
    print(f"wrote {path} ({how})")
    return 0
