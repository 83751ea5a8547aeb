"""Compare two facecorpus dataset roots: array bytes, manifest and rejected tables.

    python scripts/dataset_diff.py A B [--ignore-columns error,prior_version]

Per field: are the stored shard files byte-identical; per shard: are the manifest tables
equal row for row (the commit record in the Parquet metadata carries the shard's content
key, which by design changes when the key covers more, so metadata is not compared), and
the rejected tables (source_uri, stage). Exit 0 when everything compared is identical.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path


def _digests(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and len(rel.parts) >= 3 and rel.parts[1] == "c":
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _same(tx, ty) -> bool:
    """Row-for-row equality with NaN equal to NaN (unset yaw of a faces manifest)."""
    def norm(v):
        return "nan" if isinstance(v, float) and v != v else v

    return tx.column_names == ty.column_names and all(
        [norm(v) for v in tx.column(c).to_pylist()] == [norm(v) for v in ty.column(c).to_pylist()]
        for c in tx.column_names)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--ignore-columns", default="error,prior_version")
    args = ap.parse_args(argv)
    import pyarrow.parquet as pq

    a, b = Path(args.a), Path(args.b)
    ignore = set(filter(None, args.ignore_columns.split(",")))
    problems = []
    da, db = _digests(a), _digests(b)
    if da != db:
        diff = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
        problems.append(f"array shard files differ: {diff[:10]}")
    print(f"array shard files: {len(da)} in A, {len(db)} in B, "
          f"{sum(da.get(k) == v for k, v in db.items())} identical")
    for sub, cols in (("manifest", None), ("rejected", ("source_uri", "stage"))):
        pa_, pb_ = sorted((a / sub).glob("*.parquet")), sorted((b / sub).glob("*.parquet"))
        if [p.name for p in pa_] != [p.name for p in pb_]:
            problems.append(f"{sub}: parts differ {[p.name for p in pa_]} vs "
                            f"{[p.name for p in pb_]}")
            continue
        same = 0
        for x, y in zip(pa_, pb_, strict=True):
            tx, ty = pq.read_table(x), pq.read_table(y)
            keep = cols or [c for c in tx.column_names if c not in ignore]
            keep_y = cols or [c for c in ty.column_names if c not in ignore]
            if keep != keep_y or not _same(tx.select(keep), ty.select(keep)):
                problems.append(f"{sub}/{x.name}: tables differ")
            else:
                same += 1
        print(f"{sub}: {same}/{len(pa_)} parts equal"
              + (f" (columns {list(cols)})" if cols else f" (ignoring {sorted(ignore)})"))
    for p in problems:
        print("DIFF:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
