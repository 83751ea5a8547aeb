"""A written dataset opens with the ecosystem's own tools and gives the same values.

zarr-python and xarray read the field arrays; duckdb and polars query the Parquet manifest
parts directly (the README's one-liners, run here as written there).
"""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.datasets.store import DatasetSchema, DatasetWriter, FieldSpec, open_dataset

SPS, SPC = 16, 4
SHARDS = {0: 16, 2: 16, 3: 7}  # a gap and a short last shard


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("interop") / "ds")
    schema = DatasetSchema(fields={"image": FieldSpec((5, 5, 3), "uint8", "srgb"),
                                   "depth": FieldSpec((5, 5), "float32", "mm")},
                           samples_per_shard=SPS, samples_per_chunk=SPC, max_shards=64)
    w = DatasetWriter(root, schema)
    rng = np.random.default_rng(0)
    for s, n in SHARDS.items():
        idx = s * SPS + np.arange(n)
        w.write_shard(s, {"image": rng.integers(0, 256, (n, 5, 5, 3), dtype=np.uint8),
                          "depth": rng.normal(size=(n, 5, 5)).astype(np.float32)},
                      [{"sample_id": f"x{i}", "yaw": float(rng.uniform(-90, 90)),
                        "split": ["train", "val", "test"][i % 3]} for i in idx])
    return root


def expected_counts(root) -> dict[str, int]:
    m = open_dataset(root).manifest
    yaw, split = m["yaw"].to_numpy(), np.asarray(m["split"].to_pylist())
    return {sp: int(((np.abs(yaw) <= 30) & (split == sp)).sum()) for sp in np.unique(split)}


def test_zarr_python_reads_the_same_arrays(root):
    import zarr

    ds = open_dataset(root)
    idx = ds.manifest["index"].to_numpy()
    g = zarr.open_group(root, mode="r")
    for name in ("image", "depth"):
        a = g[name]
        assert a.dtype == np.dtype(ds.schema.fields[name].dtype)
        assert np.array_equal(a.oindex[idx], ds.read(name, idx))
        assert np.array_equal(a[2 * SPS: 2 * SPS + 16], ds.read_shard(2)[name])


# zarr warns once per non-Zarr entry of the root (manifest/, rejected/, schema.json): expected
@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")
def test_xarray_open_zarr_reads_the_same_arrays(root):
    xr = pytest.importorskip("xarray")
    ds = open_dataset(root)
    idx = ds.manifest["index"].to_numpy()
    x = xr.open_zarr(root, chunks=None, consolidated=False)
    assert set(x.data_vars) == {"image", "depth"}
    assert x["image"].dims == ("sample", "image_1", "image_2", "image_3")
    assert x.sizes["sample"] == 64 * SPS
    for name in ("image", "depth"):
        assert np.array_equal(x[name].isel(sample=idx).values, ds.read(name, idx))


def test_duckdb_counts_frontal_samples_per_split(root):
    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(f"SELECT split, count(*) AS n FROM read_parquet('{root}/manifest/*.parquet') "
                     "WHERE abs(yaw) <= 30 GROUP BY split ORDER BY split").fetchall()
    want = expected_counts(root)
    assert dict(got) == {k: v for k, v in want.items() if v}
    total = duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/manifest/*.parquet')").fetchall()[0][0]
    assert total == sum(SHARDS.values())


def test_polars_counts_frontal_samples_per_split(root):
    pl = pytest.importorskip("polars")
    got = (pl.scan_parquet(f"{root}/manifest/*.parquet").filter(pl.col("yaw").abs() <= 30)
           .group_by("split").len().collect())
    want = expected_counts(root)
    assert dict(zip(got["split"].to_list(), got["len"].to_list(), strict=True)) == \
        {k: v for k, v in want.items() if v}


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")
def test_readme_interop_block_runs_as_written(root, capsys):
    import re
    from pathlib import Path

    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    section = text.split("## Object stores and interop", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'root = "runs/pseudo_gt/dataset"' in block
    env: dict = {}
    exec(block.replace('root = "runs/pseudo_gt/dataset"', f"root = {root!r}"), env)  # noqa: S102
    ds = open_dataset(root)
    idx = ds.manifest["index"].to_numpy()
    assert sorted(env["index"].to_series().to_list()) == sorted(idx.tolist())
    order = env["index"].to_series().to_numpy()
    assert np.array_equal(env["images"], ds.read("image", order))
    out = capsys.readouterr().out
    for split, n in expected_counts(root).items():
        if n:
            assert f"('{split}', {n})" in out
