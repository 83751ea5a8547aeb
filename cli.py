"""The `facecorpus` command.

Each command group lives beside the code it drives and exposes ``register(subparsers)``;
modules listed here must stay cheap to import (heavy imports go inside the handlers), so
that ``facecorpus --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# group name -> module that registers it
COMMAND_MODULES = (
    "facecorpus.flows.cli_model",  # model build | info | preview
    "facecorpus.configs.cli",  # config validate
    "facecorpus.datasets.cli",  # data inspect | verify
    "facecorpus.flows.cli_run",  # run pseudo-gt | synthesis
    "facecorpus.flows.demo",  # demo
    "facecorpus.training.cli",  # train | predict
)


class CLIError(Exception):
    """An error the user can act on: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from facecorpus import __version__

    parser = argparse.ArgumentParser(prog="facecorpus", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"facecorpus {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:  # group not built yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from facecorpus.core.errors import FacecorpusError

    try:
        rc = args.func(args)
    except (CLIError, FacecorpusError) as e:
        print(f"facecorpus: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
