"""`facecorpus run synthesis`: argument parsing only; the flow is imported when it runs."""

from __future__ import annotations


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def add_cli(flows) -> None:
    p = flows.add_parser(
        "synthesis", help="DR shape augmentation + multi-pose image/PNCC rendering",
        description="Generate new faces from source subjects (DR-feature interpolation), render "
                    "each at every pose (image, PNCC, mask, depth) and write sharded, resumable "
                    "datasets OUT/views and OUT/faces, plus OUT/summary.json and a PNG sheet.")
    p.add_argument("--config", required=True, help="synthesis YAML (e.g. configs/srtc_690k.yaml)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--workers", type=int, default=None, help="override config `workers`")
    p.add_argument("--runner", choices=("threads", "dask"), default=None,
                   help="override config `task_runner`")
    p.add_argument("--max-shards", type=int, default=None,
                   help="run at most this many pending shards, then stop (resume later)")
    p.add_argument("--no-prefect", action="store_true",
                   help="run shards sequentially in this process, without Prefect")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set augment.n_faces=100")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import logging

    from facecorpus.core.errors import ConfigError
    from facecorpus.flows import synthesis

    for noisy in ("httpx", "distributed", "prefect.server"):  # per-request / per-worker chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)

    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        overrides[k.strip()] = _parse_value(v)
    if args.workers is not None:
        overrides["workers"] = args.workers
    if args.runner is not None:
        overrides["task_runner"] = args.runner
    cfg = synthesis.load_config(args.config, overrides)
    if args.no_prefect:
        summary = synthesis.run_shards(cfg, args.out, max_shards=args.max_shards)
    else:
        summary = synthesis.run_synthesis(cfg, args.out, max_shards=args.max_shards)
    print(synthesis.format_summary(summary))
    return 0
