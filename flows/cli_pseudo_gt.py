"""`facecorpus run pseudo-gt`: argument parsing only; the flow is imported when it runs."""

from __future__ import annotations


def add_cli(flows) -> None:
    p = flows.add_parser(
        "pseudo-gt", help="photos -> fitted 3DMM + UV maps + pseudo-GT UV textures",
        description="Detect landmarks, fit the morphable model, unwrap each photo into the "
                    "model's UV layout and complete it by two-pass Poisson blending; writes a "
                    "sharded, resumable dataset OUT/dataset, OUT/summary.json, contact sheets.")
    p.add_argument("--input", required=True,
                   help="folder, glob, or .parquet list of URIs (source_uri [, landmarks, "
                        "mask_uri, subject_id])")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=None,
                   help="procedural | ict | ict:<region> | path to a model .npz "
                        "(overrides config `model`)")
    p.add_argument("--config", default=None,
                   help="pseudo-GT YAML (default: the shipped configs/pseudo_gt.yaml)")
    p.add_argument("--workers", type=int, default=None, help="override config `workers`")
    p.add_argument("--runner", choices=("threads", "dask"), default=None,
                   help="override config `task_runner`")
    p.add_argument("--dask-address", default=None,
                   help="join this Dask scheduler (tcp://host:8786) instead of a LocalCluster; "
                        "its workers should see PREFECT_API_URL of a running Prefect server")
    p.add_argument("--max-shards", type=int, default=None,
                   help="finish at most this many pending shards, then stop (resume later)")
    p.add_argument("--no-prefect", action="store_true",
                   help="run in this process, without Prefect")
    p.add_argument("--serve-cron", default=None, metavar="CRON",
                   help="serve the flow as a Prefect deployment on this cron schedule "
                        "(e.g. '0 3 * * *'; blocks; needs PREFECT_API_URL)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set fit.camera=perspective")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import yaml
    from facecorpus.core.errors import ConfigError
    from facecorpus.flows import pseudo_gt

    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        overrides[k.strip()] = yaml.safe_load(v)
    for key, value in (("model", args.model), ("workers", args.workers),
                       ("task_runner", args.runner), ("dask_address", args.dask_address)):
        if value is not None:
            overrides[key] = value
    if args.dask_address:
        overrides["task_runner"] = "dask"
    cfg = pseudo_gt.load_config(args.config, overrides)
    if args.serve_cron:
        pseudo_gt.serve_pseudo_gt(cfg, args.input, args.out, args.serve_cron)
        return 0
    if args.no_prefect:
        summary = pseudo_gt.run_local(cfg, args.input, args.out, max_shards=args.max_shards)
    else:
        summary = pseudo_gt.run_pseudo_gt(cfg, args.input, args.out,
                                          max_shards=args.max_shards)
    print(pseudo_gt.format_summary(summary))
    return 0
