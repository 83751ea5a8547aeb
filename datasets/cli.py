"""``facecorpus data inspect | verify``.

``inspect ROOT [--sheet PNG -n N] [--stats-samples K]`` prints counts (shards, samples,
rejected by stage and reason), the schema, per field: shape, dtype, units, raw and stored
bytes, and statistics (min, max, mean, std, fraction of non-zero values) over up to K samples;
numeric manifest columns get min/mean/max; ``--sheet`` writes a PNG contact sheet of N samples
(one row per sample, one column per image-like field).

``verify ROOT`` runs :func:`facecorpus.datasets.verify.verify_dataset`, prints every problem
and exits 1 if there is any.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="inspect or verify a dataset")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = sub.add_parser("inspect", help="counts, fields, bytes, statistics, contact sheet")
    q.add_argument("root", help="dataset root (path or fsspec URL)")
    q.add_argument("--sheet", metavar="PNG", help="write a contact sheet of samples here")
    q.add_argument("-n", type=int, default=8, help="samples on the contact sheet (default 8)")
    q.add_argument("--stats-samples", type=int, default=512,
                   help="samples used for field statistics (default 512; 0 = all)")
    q.add_argument("--seed", type=int, default=0, help="which samples the sheet/stats use")
    q.set_defaults(func=cmd_inspect)
    v = sub.add_parser("verify", help="check data, counts and checksums; report every problem")
    v.add_argument("root", help="dataset root (path or fsspec URL)")
    v.add_argument("--no-data", action="store_true", help="skip decoding and checksumming data")
    v.set_defaults(func=cmd_verify)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _stored_bytes(ds, name: str) -> int:
    fs = ds.root.fs
    try:
        return int(sum(fs.du(ds.root.join(name, "c"), total=False).values()))
    except FileNotFoundError:
        return 0


def _display(a, spec):
    """A sample as something contact_sheet shows: HW, HWC (C<=4) or None."""
    import numpy as np

    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] > 4) or min(a.shape[:2]) < 4:
        return None
    if a.dtype == np.uint8:
        return a
    x = a.astype(np.float32)
    fin = np.isfinite(x)
    if not fin.any():
        return np.zeros_like(x)
    lo, hi = float(x[fin].min()), float(x[fin].max())
    x = np.where(fin, x, lo)  # NaN/inf show as the minimum, not as a saturated cell
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def cmd_inspect(args: argparse.Namespace) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from facecorpus.datasets.store import open_dataset

    ds = open_dataset(args.root)
    s = ds.schema
    m = ds.manifest
    print(f"dataset   {ds.url}")
    print(f"producer  {s.producer or '-'}  config_hash {s.config_hash or '-'}  "
          f"format v{s.format_version}  facecorpus {s.package_version}")
    print(f"shards    {len(ds.shards)} committed, {s.samples_per_shard} samples/shard, "
          f"{s.samples_per_chunk} samples/chunk, {s.compression}")
    print(f"samples   {m.num_rows} accepted, {ds.rejected.num_rows} rejected")
    if m.num_rows and "split" in m.column_names:
        splits = pc.value_counts(m["split"]).to_pylist()
        print("splits    " + ", ".join(f"{d['values']}={d['counts']}" for d in splits))
    if ds.rejected.num_rows:
        r = ds.rejected
        keys = [f"{a}: {b}" for a, b in zip(r["stage"].to_pylist(), r["reason"].to_pylist(), strict=True)]
        counts: dict[str, int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        print("rejected  " + "; ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:10]))

    rng = np.random.default_rng(args.seed)
    idx_all = m["index"].to_numpy()
    k = idx_all.size if args.stats_samples <= 0 else min(args.stats_samples, idx_all.size)
    stat_idx = np.sort(rng.choice(idx_all, size=k, replace=False)) if k else idx_all[:0]
    print(f"\nfields (statistics over {k} samples)")
    print(f"  {'name':18s} {'shape':16s} {'dtype':8s} {'units':10s} {'raw':>10s} {'stored':>10s} "
          f"{'min':>10s} {'max':>10s} {'mean':>10s} {'std':>10s} {'nonzero':>7s}")
    for name, spec in s.fields.items():
        raw = m.num_rows * np.dtype(spec.dtype).itemsize * int(np.prod(spec.shape))
        stored = _stored_bytes(ds, name)
        if k:
            x = ds.read(name, stat_idx).astype(np.float64)
            fin = x[np.isfinite(x)]
            st = (fin.min(), fin.max(), fin.mean(), fin.std()) if fin.size else (np.nan,) * 4
            nz = float(np.count_nonzero(x)) / x.size
        else:
            st, nz = (np.nan,) * 4, np.nan
        print(f"  {name:18s} {'x'.join(map(str, spec.shape)):16s} {spec.dtype:8s} {spec.units or '-':10s} "
              f"{_human(raw):>10s} {_human(stored):>10s} "
              + " ".join(f"{v:10.4g}" for v in st) + f" {nz:7.3f}")
    num = [c for c in m.column_names if c not in ("shard", "row", "index")
           and (pa.types.is_floating(m.schema.field(c).type) or pa.types.is_integer(m.schema.field(c).type))]
    if num and m.num_rows:
        print("\nmanifest columns")
        for c in num:
            x = m[c].to_numpy(zero_copy_only=False).astype(np.float64)
            x = x[np.isfinite(x)]
            if x.size:
                print(f"  {c:18s} min {x.min():10.4g}  mean {x.mean():10.4g}  max {x.max():10.4g}")
            else:
                print(f"  {c:18s} (no finite values)")

    if args.sheet:
        from facecorpus.sheets import contact_sheet

        n = min(args.n, idx_all.size)
        if n == 0:
            print("no samples: no contact sheet written")
            return 0
        pick = np.sort(rng.choice(idx_all, size=n, replace=False))
        cols = [f for f in s.fields if _display(np.zeros(s.fields[f].shape, s.fields[f].dtype), s.fields[f]) is not None]
        data = {f: ds.read(f, pick) for f in cols}
        rows = [[_display(data[f][i], s.fields[f]) for f in cols] for i in range(n)]
        path = contact_sheet(rows, args.sheet, labels=cols)
        print(f"\ncontact sheet: {path} ({n} samples x {len(cols)} fields)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from facecorpus.datasets.verify import verify_dataset

    rep = verify_dataset(args.root, check_data=not args.no_data)
    for note in rep.notes:
        print(f"  note: {note}")
    for p in rep.problems:
        print(f"PROBLEM: {p}")
    status = "OK" if rep.ok else f"FAILED ({len(rep.problems)} problems)"
    print(f"{rep.root}: {rep.n_shards} shards, {rep.n_samples} samples, {rep.n_rejected} rejected: {status}")
    return 0 if rep.ok else 1
