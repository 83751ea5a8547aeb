"""`facecorpus run pseudo-gt | synthesis | rotate-render`: argument parsing only; a flow is imported when it
runs. Both flows take the same runner options (one parser, one meaning)."""

from __future__ import annotations


def _runner_options(p) -> None:
    p.add_argument("--workers", type=int, default=None, help="override config `workers`")
    p.add_argument("--runner", choices=("threads", "dask"), default=None,
                   help="override config `task_runner`")
    p.add_argument("--dask-address", default=None,
                   help="run on this existing Dask scheduler (tcp://host:8786); OUT must be a "
                        "path every worker sees, or an fsspec URL; with Prefect its workers "
                        "need PREFECT_API_URL of a running Prefect server")
    p.add_argument("--max-shards", type=int, default=None,
                   help="run at most this many pending shards, then stop (resume later)")
    p.add_argument("--no-prefect", action="store_true",
                   help="run without Prefect (this process, its threads, or --dask-address)")
    p.add_argument("--serve-cron", default=None, metavar="CRON",
                   help="serve the flow as a Prefect deployment on this cron schedule "
                        "(e.g. '0 3 * * *'), with every other option of this command; blocks; "
                        "needs PREFECT_API_URL")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set fit.camera=perspective")


def register(sub) -> None:
    p = sub.add_parser("run", help="run a flow (pseudo-gt, synthesis, rotate-render)")
    flows = p.add_subparsers(dest="flow", metavar="FLOW")
    pg = flows.add_parser(
        "pseudo-gt", help="photos -> fitted 3DMM + UV maps + pseudo-GT UV textures",
        description="Detect landmarks, fit the morphable model, unwrap each photo into the "
                    "model's UV layout and complete it by two-pass Poisson blending; writes a "
                    "sharded, incremental dataset OUT/dataset, OUT/summary.json, sheets.")
    pg.add_argument("--input", required=True,
                    help="folder, glob, or .parquet list of URIs (source_uri [, landmarks, "
                         "mask_uri, subject_id])")
    pg.add_argument("--out", required=True, help="output folder or fsspec URL")
    pg.add_argument("--model", default=None,
                    help="procedural | ict | ict:<region> | path to a model .npz "
                         "(overrides config `model`)")
    pg.add_argument("--config", default=None,
                    help="pseudo-GT YAML (default: the shipped configs/pseudo_gt.yaml)")
    pg.add_argument("--rebuild-prior", action="store_true",
                    help="rebuild the stored texture prior from the whole corpus (every "
                         "shard is then finished again)")
    _runner_options(pg)
    pg.set_defaults(func=_run_pseudo_gt)
    sy = flows.add_parser(
        "synthesis", help="DR shape augmentation + multi-pose image/PNCC rendering",
        description="Generate new faces from source subjects (DR-feature interpolation), "
                    "render each at every pose (image, PNCC, mask, depth) and write sharded, "
                    "resumable datasets OUT/views and OUT/faces, OUT/summary.json, a sheet.")
    sy.add_argument("--config", required=True, help="synthesis YAML (e.g. configs/srtc_690k.yaml)")
    sy.add_argument("--out", required=True, help="output folder or fsspec URL")
    _runner_options(sy)
    sy.set_defaults(func=_run_synthesis)
    rr = flows.add_parser(
        "rotate-render", help="pseudo-GT samples re-rendered at large yaw over their photos",
        description="Re-render near-frontal pseudo-GT samples (|yaw| < max_abs_yaw) at yaw "
                    "offsets with their own fitted shape, camera and uv_pseudo_gt, composited "
                    "over the photo (holes inpainted, marked in hole_mask); writes OUT/views, "
                    "OUT/summary.json, sheets.")
    rr.add_argument("--source", required=True, help="pseudo-GT dataset (OUT of run pseudo-gt)")
    rr.add_argument("--out", required=True, help="output folder or fsspec URL")
    rr.add_argument("--config", default=None,
                    help="rotate-render YAML (default: the shipped configs/rotate_render.yaml)")
    _runner_options(rr)
    rr.set_defaults(func=_run_rotate_render)


def _overrides(args, **extra) -> dict:
    import logging

    from facecorpus.configs import parse_set

    for noisy in ("httpx", "distributed", "prefect.server"):  # per-request / per-worker chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    o = parse_set(args.set)
    for key, value in (("workers", args.workers), ("task_runner", args.runner),
                       ("dask_address", args.dask_address), *extra.items()):
        if value is not None:
            o[key] = value
    if args.dask_address:
        o["task_runner"] = "dask"
    return o


def _run_pseudo_gt(args) -> int:
    from facecorpus.flows import pseudo_gt, summary

    cfg = pseudo_gt.load_config(args.config, _overrides(args, model=args.model))
    if args.serve_cron:
        from prefect import serve

        serve(pseudo_gt.make_deployment(cfg, args.input, args.out, args.serve_cron,
                                        max_shards=args.max_shards))
        return 0
    if args.no_prefect:
        s = pseudo_gt.run_local(cfg, args.input, args.out, max_shards=args.max_shards,
                                rebuild_prior=args.rebuild_prior)
    else:
        s = pseudo_gt.run_pseudo_gt(cfg, args.input, args.out, max_shards=args.max_shards,
                                    rebuild_prior=args.rebuild_prior)
    print(summary.format_pseudo_gt(s))
    return 0


def _run_synthesis(args) -> int:
    from facecorpus.flows import summary, synthesis

    cfg = synthesis.load_config(args.config, _overrides(args))
    if args.serve_cron:
        from prefect import serve

        serve(synthesis.make_deployment(cfg, args.out, args.serve_cron,
                                        max_shards=args.max_shards))
        return 0
    if args.no_prefect:
        s = synthesis.run_shards(cfg, args.out, max_shards=args.max_shards)
    else:
        s = synthesis.run_synthesis(cfg, args.out, max_shards=args.max_shards)
    print(summary.format_synthesis(s))
    return 0


def _run_rotate_render(args) -> int:
    from facecorpus.flows import rotate_render, summary

    cfg = rotate_render.load_config(args.config, _overrides(args, source=args.source,
                                                            out=args.out))
    if args.serve_cron:
        from prefect import serve

        serve(rotate_render.make_deployment(cfg, args.out, args.serve_cron,
                                            max_shards=args.max_shards))
        return 0
    run = rotate_render.run_local if args.no_prefect else rotate_render.run_rotate_render
    print(summary.format_rotate_render(run(cfg, args.out, max_shards=args.max_shards)))
    return 0
