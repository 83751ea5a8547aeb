"""`facecorpus config validate FILE`: check a run config and report every error."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("config", help="validate run configs")
    cmds = p.add_subparsers(dest="config_cmd", metavar="CMD")
    v = cmds.add_parser("validate", help="validate a YAML config (every error, with its key path)")
    v.add_argument("file", help="YAML config with a top-level 'kind:' key")
    v.add_argument("--kind", default=None, help="expected kind (default: the file's 'kind:')")
    v.set_defaults(func=_validate)
    p.set_defaults(func=lambda args: p.print_help() or 1)


def _validate(args) -> int:
    from facecorpus.configs import load_config

    cfg = load_config(args.file, kind=args.kind)
    print(f"{args.file}: valid {type(cfg).__name__}")
    return 0
