"""Read throughput of the dataset store through the torch readers, next to PNG files.

Writes N samples of 128x128 ``image`` (RGB), ``pncc`` (RGB) and ``mask`` (1 channel), all
uint8, once into a store and once as three PNG files per sample (the reference: PIL decode),
then times one epoch of each reader with 0 and 2 DataLoader workers after a warm-up epoch
(files in the page cache: this measures decode + framework cost, not the disk).

    .venv/bin/python benchmarks/bench_read.py [--n 4096] [--workers 0 2] [--chunk 8]
    .venv/bin/python benchmarks/bench_read.py --n 4096 --first-read --repeat 3   # #14 reader

Images are crops of the shared photos when $FACECORPUS_ASSETS (or ../shared) has them,
else smooth synthetic images; PNCC is a smooth per-sample colour field, the mask a disc.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def make_samples(n: int, size: int = 128, seed: int = 0):
    rng = np.random.default_rng(seed)
    photos = []
    for d in [os.environ.get("FACECORPUS_ASSETS"), str(Path(__file__).resolve().parents[2] / "shared")]:
        if d and Path(d, "images").is_dir():
            from PIL import Image

            for p in sorted(Path(d, "images").glob("*.jpg")):
                photos.append(np.asarray(Image.open(p).convert("RGB")))
            break
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n, size, size, 3), np.uint8)
    pncc = np.empty((n, size, size, 3), np.uint8)
    mask = np.empty((n, size, size, 1), np.uint8)
    from PIL import Image

    for i in range(n):
        if photos:
            ph = photos[i % len(photos)]
            c = int(rng.integers(size * 2, min(ph.shape[:2]) // 2))
            y, x = rng.integers(0, ph.shape[0] - c), rng.integers(0, ph.shape[1] - c)
            images[i] = np.asarray(Image.fromarray(ph[y:y + c, x:x + c]).resize((size, size), Image.BILINEAR))
        else:
            f = rng.uniform(1, 4, 3)
            images[i] = (127.5 + 127 * np.sin(f[None, None] * (xx + yy)[..., None] * 6 + i)).astype(np.uint8)
        cx, cy, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.25, 0.4)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        col = np.stack([xx, yy, 1 - (xx + yy) / 2], -1) * 255
        pncc[i] = np.where(disc[..., None], col, 0).astype(np.uint8)
        mask[i, ..., 0] = disc * 255
    return {"image": images, "pncc": pncc, "mask": mask}


def write_store(root: str, data: dict, sps: int, spc: int, compression: str, level: int,
                via_zarr: bool = False) -> float:
    """Write ``data`` as a store; samples per CPU-second (``via_zarr``: zarr's own writer)."""
    from facecorpus.datasets.store import DatasetSchema, DatasetWriter, FieldSpec

    schema = DatasetSchema(
        fields={k: FieldSpec(v.shape[1:], "uint8") for k, v in data.items()},
        samples_per_shard=sps, samples_per_chunk=spc, compression=compression,
        compression_level=level, producer="bench")
    w = DatasetWriter(root, schema)
    if via_zarr:
        w._encoders = dict.fromkeys(schema.fields, False)
    n = len(data["image"])
    t = time.process_time()
    for s in range((n + sps - 1) // sps):
        sl = slice(s * sps, min(n, (s + 1) * sps))
        w.write_shard(s, {k: v[sl] for k, v in data.items()},
                      [{"sample_id": f"s{i}"} for i in range(sl.start, sl.stop)])
    return n / (time.process_time() - t)


def write_pngs(folder: Path, data: dict) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(len(data["image"])):
        d = folder / f"{i:06d}"
        d.mkdir(exist_ok=True)
        for k, v in data.items():
            a = v[i] if v.shape[-1] != 1 else v[i, ..., 0]
            Image.fromarray(a).save(d / f"{k}.png", compress_level=6)
        out.append(d)
    return out


class PngDataset:
    """The reference: one sample = three PNGs decoded with PIL (what a folder dataset does)."""

    def __init__(self, dirs):
        self.dirs = dirs

    def __len__(self):
        return len(self.dirs)

    def __getitem__(self, i):
        import torch
        from PIL import Image

        d = self.dirs[i]
        out = {}
        for k in ("image", "pncc", "mask"):
            with Image.open(d / f"{k}.png") as im:
                a = np.asarray(im)
            out[k] = torch.from_numpy(np.array(a if a.ndim == 3 else a[..., None]))
        out["index"] = torch.tensor(i)
        return out


def _cpu_seconds(loader=None) -> float:
    """CPU seconds used so far by this process, its finished children, and the loader's
    live (persistent) worker processes, read from /proc."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + c.ru_utime + c.ru_stime
    it = getattr(loader, "_iterator", None)
    tick = os.sysconf("SC_CLK_TCK")
    for w in getattr(it, "_workers", []) or []:
        try:
            fields = Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def time_loader(make_loader, n_expected: int, epochs: int = 1) -> tuple[float, float]:
    """Best (samples per wall second, samples per CPU second) over ``epochs`` timed epochs.

    Workers are persistent (started in the untimed warm-up epoch); CPU time sums this
    process and the workers, so samples per CPU second is the per-core rate, which stays
    meaningful on a machine other jobs share, where wall-clock rates do not.
    """
    loader = make_loader()
    count = 0
    for b in loader:  # warm-up: worker start, page cache, first-touch allocations
        count += int(b["index"].numel())
    assert count == n_expected, (count, n_expected)
    best_wall = best_cpu = 0.0
    for _ in range(epochs):
        t, c = time.perf_counter(), _cpu_seconds(loader)
        count = 0
        for b in loader:
            count += int(b["index"].numel())
        dt, dc = time.perf_counter() - t, _cpu_seconds(loader) - c
        assert count == n_expected
        best_wall, best_cpu = max(best_wall, count / dt), max(best_cpu, count / dc)
    del loader
    return best_wall, best_cpu


def _no_pool(worker_id: int) -> None:
    from facecorpus.datasets.reader import _ShmPool

    _ShmPool.SLOTS = 0


def _buffered_take(worker_id: int) -> None:
    """The pooled hand-off as it was before 2026-12-06 evening: ``np.take(out=)`` with numpy's
    default ``mode='raise'``, which gathers into a temporary and then copies into ``out``."""
    from facecorpus.datasets.reader import _ShmPool

    _ShmPool.TAKE_MODE = "raise"


def _moto_server():
    """A moto S3 server in a child process on 127.0.0.1 (its CPU is not this process's), with
    fake credentials in the standard AWS variables of this process; returns (proc, url)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[k]
    url = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=url,
                      AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def first_read(root: str, n: int, batch: int, repeat: int, tmp: str) -> None:
    """One epoch of a *fresh* batched iterable reader (no shard seen before, 0 workers), with
    and without ``verify_checksums``, on the local store and on a copy in a moto S3 bucket;
    and the shard cache of the S3 copy: first epoch into an empty cache (misses), then a fresh
    reader over the filled cache (hits). Interleaved ``repeat`` times; median and range."""
    from facecorpus.datasets.reader import ShardIterableDataset

    proc, _ = _moto_server()
    try:
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        fs.put(root.rstrip("/") + "/", "bench/store/", recursive=True)
        remote = "s3://bench/store"

        def epoch(url, **kw):
            ds = ShardIterableDataset(url, shuffle=True, batch_size=batch, **kw)  # opened untimed
            t, c = time.perf_counter(), time.process_time()
            count = sum(int(b["index"].numel()) for b in ds)
            assert count == n, (count, n)
            cache = ds.store.cache
            return (n / (time.perf_counter() - t), n / (time.process_time() - c),
                    None if cache is None else (cache.hits, cache.misses))

        for url in (root, remote):  # untimed: imports, first connections, page cache
            epoch(url)
        res: dict[str, list] = {}
        for rep in range(repeat):
            cdir = Path(tmp) / f"cache-{rep}"
            for name, url, kw in [
                    ("local, verify_checksums off", root, {}),
                    ("local, verify_checksums on", root, {"verify_checksums": True}),
                    ("s3 (moto), verify_checksums off", remote, {}),
                    ("s3 (moto), verify_checksums on", remote, {"verify_checksums": True}),
                    ("s3 (moto), ShardCache empty (misses)", remote, {"cache_dir": cdir}),
                    ("s3 (moto), ShardCache filled (hits)", remote, {"cache_dir": cdir})]:
                wall, cpu, hm = epoch(url, **kw)
                res.setdefault(name, []).append((wall, cpu))
                print(f"  {name:40s} {wall:7.0f} samples/s wall, {cpu:7.0f} per CPU-second"
                      + (f" (cache hits {hm[0]}, misses {hm[1]})" if hm else "")
                      + f" (repeat {rep + 1})", flush=True)
        print("\nfirst-read epoch, median [min-max] over repeats (wall /s; per CPU-s of this "
              "process, the S3 server's CPU not included):")
        for name, v in res.items():
            w, c = np.array(v).T
            print(f"  {name:40s} {np.median(w):7.0f} [{w.min():.0f}-{w.max():.0f}]   "
                  f"{np.median(c):7.0f} [{c.min():.0f}-{c.max():.0f}]")
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--shard", type=int, default=256, help="samples per shard")
    ap.add_argument("--chunk", type=int, default=8, help="samples per chunk")
    ap.add_argument("--compression", default="zstd", choices=["zstd", "blosc-lz4"])
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs (best is reported)")
    ap.add_argument("--tmp", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                    help="time only the readers whose name contains one of these (the PNG "
                         "reference always runs)")
    ap.add_argument("--first-read", action="store_true",
                    help="only the first-read cost of verify_checksums (local and a moto S3 "
                         "bucket) and the ShardCache miss/hit rates (needs the s3 extra + moto)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time every reader this many times, interleaved (the machine is shared:"
                         " a spread is more honest than one number)")
    args = ap.parse_args()

    import torch
    from facecorpus.datasets.reader import ShardDataset, ShardIterableDataset
    from facecorpus.datasets.store import open_dataset
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, n={args.n}, shard={args.shard}, "
          f"chunk={args.chunk}, {args.compression}-{args.level}, batch={args.batch}")
    data = make_samples(args.n)
    raw = sum(v.nbytes for v in data.values())
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = f"{tmp}/store"
        zrate = write_store(f"{tmp}/zarr-written", data, args.shard, args.chunk, args.compression,
                            args.level, via_zarr=True)
        wrate = write_store(root, data, args.shard, args.chunk, args.compression, args.level)
        stored = sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())
        if args.first_read:
            print(f"store {stored / 2**20:.0f} MiB on disk ({raw / stored:.2f}x), page-cached")
            first_read(root, args.n, args.batch, args.repeat, tmp)
            return
        t = time.process_time()
        dirs = write_pngs(Path(tmp) / "png", data)
        prate = args.n / (time.process_time() - t)
        png_bytes = sum(f.stat().st_size for f in (Path(tmp) / "png").rglob("*.png"))
        print(f"write (samples per CPU-second): store {wrate:6.0f} ({raw / stored:.2f}x compression), "
              f"same store through zarr's writer {zrate:6.0f}, PNG {prate:6.0f} ({raw / png_bytes:.2f}x)")

        # bit-exact check before timing anything
        ds = open_dataset(root)
        for k, v in data.items():
            assert ds.read(k, ds.manifest["index"].to_numpy()).tobytes() == v.tobytes(), k
        t = time.process_time()
        for _ in range(2):
            for s in sorted(ds.shards):
                ds.read_shard(s)
        ours = 2 * args.n / (time.process_time() - t)
        sps = ds.schema.samples_per_shard
        t = time.process_time()
        for _ in range(2):
            for s, info in sorted(ds.shards.items()):
                for k in data:
                    ds.array(k)[s * sps: s * sps + info.n_samples]
        ref = 2 * args.n / (time.process_time() - t)
        print(f"raw decode (no torch), samples per CPU-second: ours {ours:8.0f}, "
              f"zarr's pipeline on the same store {ref:8.0f}")

        n = args.n
        rows = []
        for w in args.workers:
            kw = {"num_workers": w, "persistent_workers": w > 0}
            cases = {
                "store iterable, batched in dataset": lambda kw=kw: DataLoader(
                    ShardIterableDataset(root, shuffle=True, batch_size=args.batch), batch_size=None, **kw),
                "store iterable, batched, sha256 on 1st read": lambda kw=kw: DataLoader(
                    ShardIterableDataset(root, shuffle=True, batch_size=args.batch, verify_checksums=True),
                    batch_size=None, **kw),
                "store iterable, batched, 2 threads": lambda kw=kw: DataLoader(
                    ShardIterableDataset(root, shuffle=True, batch_size=args.batch, decode_threads=2),
                    batch_size=None, **kw),
                "store iterable, per-sample items": lambda kw=kw: DataLoader(
                    ShardIterableDataset(root, shuffle=True), batch_size=args.batch, **kw),
                "store map-style, shuffled batches": lambda kw=kw: DataLoader(
                    ShardDataset(root), batch_size=args.batch, shuffle=True, **kw),
                "PNG files + PIL (reference)": lambda kw=kw: DataLoader(
                    PngDataset(dirs), batch_size=args.batch, shuffle=True, **kw),
            }
            if w:
                # the hand-off before pooled buffers: fresh shared memory for every batch
                cases["store iterable, batched, fresh shm (before)"] = lambda kw=kw: DataLoader(
                    ShardIterableDataset(root, shuffle=True, batch_size=args.batch), batch_size=None,
                    worker_init_fn=_no_pool, **kw)
                cases["store iterable, batched, buffered take (before)"] = lambda kw=kw: DataLoader(
                    ShardIterableDataset(root, shuffle=True, batch_size=args.batch), batch_size=None,
                    worker_init_fn=_buffered_take, **kw)
            if args.only:
                cases = {k: v for k, v in cases.items()
                         if k.startswith("PNG") or any(o in k for o in args.only)}
            for rep in range(args.repeat):
                for name, make in cases.items():
                    wall, cpu = time_loader(make, n, args.epochs)
                    rows.append((name, w, wall, cpu))
                    print(f"  {name:48s} workers={w}: {wall:8.0f} samples/s wall, "
                          f"{cpu:8.0f} samples per CPU-second"
                          + (f" (repeat {rep + 1})" if args.repeat > 1 else ""), flush=True)
        png = {}
        for name, w, a, b in rows:
            if name.startswith("PNG"):
                png.setdefault(w, []).append((a, b))
        png = {w: (float(np.median([a for a, _ in v])), float(np.median([b for _, b in v])))
               for w, v in png.items()}
        print("\nspeed-up over PNG (same workers, PNG's median; wall, per CPU-second):")
        for name, w, wall, cpu in rows:
            if not name.startswith("PNG"):
                print(f"  {name:48s} workers={w}: {wall / png[w][0]:5.1f}x, {cpu / png[w][1]:5.1f}x")

if __name__ == "__main__":
    main()
