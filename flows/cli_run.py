"""`facecorpus run <flow>`: each flow module exposes ``add_cli(subparsers)``."""

from __future__ import annotations

import importlib

# Light modules (argument parsing only); they import their flow when run.
FLOW_MODULES = ("facecorpus.flows.cli_pseudo_gt", "facecorpus.flows.cli_synthesis")


def register(sub) -> None:
    p = sub.add_parser("run", help="run a flow (pseudo-gt, synthesis)")
    flows = p.add_subparsers(dest="flow", metavar="FLOW")
    for name in FLOW_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # flow not built yet
                continue
            raise
        mod.add_cli(flows)
