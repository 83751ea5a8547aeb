"""Ingest: every bad input is rejected with its reason; good ones decode to RGB uint8."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from facecorpus.configs.pseudo_gt import IngestConfig
from facecorpus.core.errors import SampleRejected
from facecorpus.tasks.ingest import (
    decode_image,
    deduplicate,
    ingest_batch,
    list_inputs,
)
from PIL import Image


def _png(arr_or_img) -> bytes:
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)


def write_bad_inputs(folder, rgb):
    """The issue's bad inputs plus two good images; returns {name: expected reason word}."""
    (folder / "good.png").write_bytes(_png(rgb))
    (folder / "good2.jpg").write_bytes(_jpeg(rgb[::-1].copy()))
    (folder / "zdup.png").write_bytes(_png(rgb))
    (folder / "notes.txt").write_bytes(b"not an image at all")
    (folder / "trunc.jpg").write_bytes(_jpeg(rgb)[: len(_jpeg(rgb)) // 2])
    (folder / "gray.png").write_bytes(_png(rgb[..., 0]))
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 128, np.uint8)], -1)
    (folder / "rgba.png").write_bytes(_png(rgba))
    (folder / "deep16.png").write_bytes(_png(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)))
    # 10000 x 10000 (1-bit, so the test file stays small): must be refused from its header
    (folder / "huge.png").write_bytes(_png(Image.new("1", (10000, 10000))))
    return {"zdup.png": "duplicate", "notes.txt": "not an image", "trunc.jpg": "truncated",
            "gray.png": "grayscale", "rgba.png": "alpha", "deep16.png": "16-bit",
            "huge.png": "too large"}


def test_bad_inputs_rejected_with_reasons(tmp_path, rgb):
    expected = write_bad_inputs(tmp_path, rgb)
    records = list_inputs(tmp_path)
    assert len(records) == 9
    unique, dup_rows = deduplicate(records)
    batch = ingest_batch(unique, IngestConfig(max_megapixels=40))
    rejected = dup_rows + batch.rejected
    assert len(batch.images) + len(rejected) == len(records)
    got = {r["source_uri"].rsplit("/", 1)[-1]: r["reason"] for r in rejected}
    assert set(got) == set(expected), got
    for name, word in expected.items():
        assert word in got[name], (name, got[name])
    good = {im.source_uri.rsplit("/", 1)[-1]: im for im in batch.images}
    assert set(good) == {"good.png", "good2.jpg"}
    np.testing.assert_array_equal(good["good.png"].image, rgb)
    assert good["good2.jpg"].image.dtype == np.uint8 and good["good2.jpg"].image.shape == rgb.shape


def test_ingest_batch_catches_duplicates_itself(tmp_path, rgb):
    (tmp_path / "a.png").write_bytes(_png(rgb))
    (tmp_path / "b.png").write_bytes(_png(rgb))
    batch = ingest_batch(list_inputs(tmp_path))
    assert len(batch.images) == 1 and "duplicate" in batch.rejected[0]["reason"]


def test_huge_image_rejected_before_decoding():
    data = _png(Image.new("1", (10000, 10000)))
    with pytest.raises(Exception, match="too large") as ei:
        decode_image(data, "mem://huge.png")
    assert ei.value.stage == "ingest"


def test_grayscale_and_alpha_options(rgb):
    gray = decode_image(_png(rgb[..., 1]), "g.png", IngestConfig(grayscale="convert"))
    np.testing.assert_array_equal(gray, np.repeat(rgb[..., 1:2], 3, -1))
    rgba = np.concatenate([rgb, np.zeros(rgb.shape[:2] + (1,), np.uint8)], -1)
    flat = decode_image(_png(rgba), "a.png", IngestConfig(alpha="flatten"))
    assert flat.max() == 0  # fully transparent over black


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_opaque_alpha_is_read_as_colour(rgb, mode):
    # most PNG portraits carry an alpha channel that is 255 everywhere: it says nothing
    if mode == "RGBA":
        im = Image.fromarray(np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)],
                                            -1))
        want = rgb
    elif mode == "LA":
        im = Image.fromarray(np.stack([rgb[..., 0], np.full(rgb.shape[:2], 255, np.uint8)], -1),
                             "LA")
        want = np.repeat(rgb[..., :1], 3, -1)
    else:  # palette with a transparent index that no pixel uses
        im = Image.fromarray(rgb).quantize(64)
        im.info["transparency"] = 200
        want = np.asarray(im.convert("RGB"))
    data = _png(im)
    assert Image.open(io.BytesIO(data)).mode in ("RGBA", "LA", "P")
    cfg = IngestConfig(grayscale="convert" if mode == "LA" else "reject")
    np.testing.assert_array_equal(decode_image(data, f"o.{mode}.png", cfg), want)


def test_partial_alpha_keeps_the_configured_rule(rgb):
    a = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
    a[0, 0] = 254  # one pixel not opaque is enough
    data = _png(np.concatenate([rgb, a], -1))
    with pytest.raises(SampleRejected, match="alpha") as ei:
        decode_image(data, "p.png", IngestConfig())
    assert ei.value.stage == "ingest" and ei.value.source_uri == "p.png"
    flat = decode_image(data, "p.png", IngestConfig(alpha="flatten"))
    np.testing.assert_array_equal(flat[1:], rgb[1:])
    assert (np.abs(flat[0, 0].astype(int) - rgb[0, 0].astype(int) * 254 // 255) <= 1).all()


def test_config_section_is_the_options(tmp_path, rgb):
    (tmp_path / "g.png").write_bytes(_png(rgb[..., 1]))
    batch = ingest_batch(list_inputs(tmp_path), IngestConfig(grayscale="convert"))
    assert len(batch.images) == 1 and not batch.rejected
    batch = ingest_batch(list_inputs(tmp_path), IngestConfig())
    row = batch.rejected[0]
    assert row["stage"] == "ingest" and "grayscale" in row["reason"] and row["error"] == "check"


def test_parquet_list_with_landmarks(tmp_path, rgb):
    (tmp_path / "img.png").write_bytes(_png(rgb))
    lm = np.arange(136, dtype=np.float32)
    pq.write_table(pa.table({"source_uri": ["img.png", "missing.png"],
                             "landmarks": [lm.tolist(), None]}), tmp_path / "list.parquet")
    recs = list_inputs(tmp_path / "list.parquet")
    assert recs[0].source_uri == str(tmp_path / "img.png")
    np.testing.assert_array_equal(recs[0].landmarks, lm.reshape(68, 2))
    assert recs[1].landmarks is None
    batch = ingest_batch(recs)
    assert len(batch.images) == 1 and batch.rejected[0]["reason"] == "file not found"


def test_glob_and_missing(tmp_path, rgb):
    from facecorpus.core.errors import InputError

    (tmp_path / "x.png").write_bytes(_png(rgb))
    (tmp_path / "y.txt").write_bytes(b"x")
    assert [r.source_uri for r in list_inputs(str(tmp_path / "*.png"))] == [str(tmp_path / "x.png")]
    with pytest.raises(InputError, match="no such"):
        list_inputs(tmp_path / "nope")


def test_given_mask_is_decoded_and_checked(tmp_path, rgb):
    (tmp_path / "img.png").write_bytes(_png(rgb))
    m = np.zeros(rgb.shape[:2], np.uint8)
    m[10:30, 5:20] = 255
    (tmp_path / "mask.png").write_bytes(_png(m))
    (tmp_path / "small.png").write_bytes(_png(m[:10]))
    pq.write_table(pa.table({"source_uri": ["img.png", "img.png"],
                             "mask_uri": ["mask.png", "small.png"]}), tmp_path / "l.parquet")
    recs = list_inputs(tmp_path / "l.parquet")
    from facecorpus.tasks.ingest import ingest_one

    got = ingest_one(recs[0])
    np.testing.assert_array_equal(got.mask, m > 0)
    with pytest.raises(SampleRejected, match="mask shape"):
        ingest_one(recs[1])
