"""One epoch of the torch reader over a written dataset: samples/s (wall) and per CPU-second.

    python scripts/read_epoch.py /tmp/s690k/views --fields image pncc --workers 2
"""

from __future__ import annotations

import argparse
import os
import resource
import time


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--fields", nargs="+", default=["image", "pncc"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    import torch
    from facecorpus.datasets.reader import ShardIterableDataset

    ds = ShardIterableDataset(args.root, fields=args.fields, batch_size=args.batch, shuffle=True)
    kw = {"multiprocessing_context": "forkserver", "persistent_workers": False} \
        if args.workers else {}
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers, **kw)
    t, c, n, nbytes = time.perf_counter(), _cpu(), 0, 0
    for b in loader:
        n += int(b["index"].numel())
        nbytes += sum(int(b[f].numel() * b[f].element_size()) for f in args.fields)
    dt, dc = time.perf_counter() - t, _cpu() - c
    # DataLoader workers are not reaped before the print, so their CPU time is not in
    # RUSAGE_CHILDREN: only the main process's CPU is reported; time the run with
    # /usr/bin/time for the total.
    print(f"{args.root}: {n} samples in {dt:.1f} s wall = {n / dt:,.0f} samples/s "
          f"({args.workers} workers, fields {args.fields}, {nbytes / dt / 2**20:,.0f} MiB/s "
          f"decoded; main process {dc:.1f} CPU-s); pid {os.getpid()}")


if __name__ == "__main__":
    main()
