"""Sharded dataset store: Zarr v3 arrays + a Parquet manifest, written a whole shard at a time.

- :mod:`facecorpus.datasets.store` — ``DatasetSchema``/``FieldSpec``, ``DatasetWriter``
  (atomic, idempotent ``write_shard``), ``open_dataset`` (manifest, rejected rows, reads).
- :mod:`facecorpus.datasets.reader` — ``ShardDataset`` (map-style) and
  ``ShardIterableDataset`` (shard streaming, exactly once per epoch across workers and ranks).
- :mod:`facecorpus.datasets.verify` — ``verify_dataset``: every problem of a dataset root.
- :mod:`facecorpus.datasets.cli` — ``facecorpus data inspect | verify``.

Import the submodules directly; this package imports nothing so the CLI stays fast.
"""
