"""Ingest: turn a folder, a glob or a Parquet list of URIs into decoded RGB images.

Every input ends either as an :class:`IngestedImage` or as a rejection row
``{"source_uri", "stage": "ingest", "reason", "error"}``; a bad file never raises out of
:func:`ingest_batch` (single-file functions raise
:class:`facecorpus.core.errors.SampleRejected`), so ``inputs = accepted + rejected`` always
holds. The options are the run config's section
(:class:`facecorpus.configs.pseudo_gt.IngestConfig`).

Decisions (documented because the issue lists these as *bad inputs*):

- **grayscale** (``L``, ``1``, ``LA``, ``I``...): rejected by default: a pseudo-GT UV
  texture must carry colour, and a converted gray photo would teach a colour model gray
  skin. ``IngestConfig.grayscale="convert"`` replicates the channel instead.
- **alpha** (``RGBA``, ``LA``, ``PA``, palette with transparency): an alpha channel that is
  fully opaque (every value 255: most PNG portraits in the wild) is dropped and the image
  read as RGB. A partially transparent one is rejected by default (transparent pixels have no
  photographed colour); ``alpha="flatten"`` composites it on black.
- **16-bit** (PNG bit depth 16, ``I;16``): rejected: silently truncating to 8 bits hides
  that the source is e.g. a depth or HDR map. Found from the PNG header, since PIL opens
  16-bit RGB PNGs as plain 8-bit ``RGB``.
- **too large**: rejected from the header size *before* any pixel is decoded
  (``width * height > max_megapixels * 1e6``); PIL's decompression-bomb guard is a second net.
- **duplicates**: same sha256 of the file bytes; the first occurrence (input order) wins.
- EXIF orientation is applied; CMYK / palette / YCbCr images are converted to RGB.
"""

from __future__ import annotations

import glob as globmod
import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
from facecorpus.configs.pseudo_gt import IngestConfig
from facecorpus.core.errors import SampleRejected
from facecorpus.core.hashing import file_sha256

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm")


@dataclass(frozen=True)
class InputRecord:
    """One input: a URI plus optional annotations given in a manifest.

    ``landmarks``: (68, 2) float32 pixel coordinates in the *original* image (Multi-PIE
    order), or None. ``mask_uri``: a face/occlusion mask image (non-zero = usable face).
    """

    source_uri: str
    landmarks: np.ndarray | None = None
    mask_uri: str | None = None
    subject_id: str = ""
    sha256: str = ""


@dataclass
class IngestedImage:
    """A decoded photo. ``image``: (H, W, 3) uint8 sRGB; ``mask``: (H, W) bool or None;
    ``focal_35mm``: EXIF ``FocalLengthIn35mmFilm`` (mm) or None (absent or implausible)."""

    record: InputRecord
    image: np.ndarray
    sha256: str
    mask: np.ndarray | None = None
    focal_35mm: float | None = None

    def focal_px(self) -> float | None:
        """The EXIF focal in this image's pixels: the 35 mm equivalent scales the frame
        diagonal (43.27 mm) to the image diagonal."""
        if self.focal_35mm is None:
            return None
        h, w = self.image.shape[:2]
        return float(self.focal_35mm * np.hypot(w, h) / 43.27)

    @property
    def source_uri(self) -> str:
        return self.record.source_uri


@dataclass
class IngestBatch:
    images: list[IngestedImage] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)


DEFAULT_INGEST = IngestConfig()


# ------------------------------------------------------------------ listing
def list_inputs(spec: str | os.PathLike) -> list[InputRecord]:
    """Inputs named by ``spec``: a folder (every regular, non-hidden file, sorted: non-images
    are listed too, so they are *rejected* rather than silently skipped), a glob pattern, a
    single file, or a ``.parquet`` table with a ``source_uri`` (or ``uri``) column and optional
    ``landmarks`` (136 floats, x0 y0 x1 y1 ...), ``mask_uri`` and ``subject_id`` columns.

    Raises InputError when the spec names nothing.
    """
    from facecorpus.core.errors import InputError

    s = os.fspath(spec)
    if s.endswith(".parquet"):
        return _list_parquet(s)
    if "://" not in s and os.path.isdir(s):
        names = sorted(n for n in os.listdir(s) if not n.startswith("."))
        paths = [os.path.join(s, n) for n in names if os.path.isfile(os.path.join(s, n))]
    elif any(c in s for c in "*?["):
        if "://" in s:
            import fsspec

            fs, _, paths = fsspec.get_fs_token_paths(s)
            proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            paths = sorted(p if proto == "file" else f"{proto}://{p}" for p in paths)
        else:
            paths = sorted(p for p in globmod.glob(s) if os.path.isfile(p))
    else:
        paths = [s]
        if "://" not in s and not os.path.exists(s):
            raise InputError(f"{s}: no such file, folder or pattern")
    if not paths:
        raise InputError(f"{s}: matches no files")
    return [InputRecord(source_uri=os.path.abspath(p) if "://" not in p else p) for p in paths]


def _list_parquet(path: str) -> list[InputRecord]:
    """A Parquet listing's rows (read by :func:`facecorpus.tasks.inputs.parquet_rows`, the
    one reader of listings); here an unusable row is an error, the flows reject it instead."""
    from facecorpus.core.errors import InputError
    from facecorpus.tasks.inputs import parquet_rows

    out = []
    for r in parquet_rows(path):
        if r.listing_error:
            raise InputError(f"{path}: {r.listing_error}")
        out.append(InputRecord(
            source_uri=r.source_uri, mask_uri=r.mask_uri, subject_id=r.subject_id,
            landmarks=None if r.landmarks is None else np.asarray(r.landmarks, np.float32)))
    return out


def _resolve(uri: str, base: str) -> str:
    if "://" in uri or os.path.isabs(uri):
        return uri
    return os.path.join(base, uri)


def read_bytes(uri: str) -> bytes:
    import fsspec

    with fsspec.open(uri, "rb") as fh:
        return fh.read()


def deduplicate(records: list[InputRecord]) -> tuple[list[InputRecord], list[dict]]:
    """Hash every input's bytes; keep the first of each content, reject the others.

    Unreadable files are kept (their decode will reject them with the real reason).
    Returns (unique records with ``sha256`` filled, rejection rows).
    """
    seen: dict[str, str] = {}
    keep, rejected = [], []
    for r in records:
        try:
            digest = file_sha256(r.source_uri)
        except Exception:  # noqa: BLE001
            keep.append(r)
            continue
        if digest in seen:
            rejected.append(SampleRejected(
                r.source_uri, "ingest",
                f"duplicate of {seen[digest]} (sha256 {digest[:12]})").row())
            continue
        seen[digest] = r.source_uri
        keep.append(InputRecord(r.source_uri, r.landmarks, r.mask_uri, r.subject_id, digest))
    return keep, rejected


# ------------------------------------------------------------------ decoding
def _png_bit_depth(data: bytes) -> int | None:
    # IHDR is the first chunk: 8-byte signature, 4 length, 4 type, 4 w, 4 h, then bit depth.
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 24:
        return data[24]
    return None


def decode_image(data: bytes, source_uri: str,
                 opts: IngestConfig = DEFAULT_INGEST) -> np.ndarray:
    """Decode bytes into an (H, W, 3) uint8 RGB array or raise
    :class:`~facecorpus.core.errors.SampleRejected` (stage ``ingest``)."""
    return _decode(data, source_uri, opts)[0]


def _decode(data: bytes, source_uri: str, opts: IngestConfig) -> tuple[np.ndarray, float | None]:
    """:func:`decode_image` and :func:`exif_focal_35mm` from one decode: PIL reads a PNG's
    EXIF only by decoding the whole image (its eXIf chunk may follow the pixels), so asking
    a fresh image for it decoded every PNG twice (~20 ms per photo, #12)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    def reject(reason):
        return SampleRejected(source_uri, "ingest", reason)

    if not data:
        raise reject("empty file")
    max_px = int(opts.max_megapixels * 1e6)
    try:
        with warnings.catch_warnings():
            # our own pixel limit below gives the better message; PIL's 2x-limit error remains
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise reject("not an image (no decoder recognises the bytes)") from None
    except Image.DecompressionBombError as e:
        raise reject(f"too large (decompression-bomb guard: {e})") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a rejection
        raise reject(f"unreadable image header ({type(e).__name__}: {e})") from None
    w, h = im.size
    if w * h > max_px:  # checked on the header: no pixel has been decoded yet
        raise reject(f"too large: {w}x{h} = {w * h / 1e6:.1f} MP > {opts.max_megapixels:g} MP")
    if w < 16 or h < 16:
        raise reject(f"too small: {w}x{h}")
    depth = _png_bit_depth(data)
    if depth == 16 or im.mode.startswith("I;16") or im.mode in ("I", "F"):
        raise reject(f"16-bit or float image (mode {im.mode}, bit depth {depth or '?'}); "
                     "expected 8-bit sRGB")
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 - truncated JPEG/PNG, corrupt stream
        raise reject(f"corrupt or truncated image data ({type(e).__name__}: {e})") from None
    focal = _exif_focal_of(im)  # the decoded original, before any transposition
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001, S110 - a malformed EXIF block must not cost the photo
        pass
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        im.mode == "P" and "transparency" in im.info)
    if has_alpha and _alpha_is_opaque(im):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL: "convert P to RGBA" - done
            im = im.convert("RGB") if im.mode not in ("LA", "La") else im.convert("L")
        has_alpha = False
    if has_alpha:
        if opts.alpha == "reject":
            raise reject(f"has an alpha channel (mode {im.mode}); transparent pixels have no colour")
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, rgba)
    gray = im.mode in ("L", "1") or (im.mode == "P" and _palette_is_gray(im))
    if gray and opts.grayscale == "reject":
        raise reject(f"grayscale image (mode {im.mode}); a colour photo is needed for a UV texture")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy(), focal


def _alpha_is_opaque(im) -> bool:
    """True when every pixel's alpha is 255 (the channel carries nothing)."""
    if im.mode == "P":
        with warnings.catch_warnings():
            # PIL's advice to convert to RGBA is what happens here
            warnings.simplefilter("ignore", UserWarning)
            alpha = im.convert("RGBA").getchannel("A")
    else:
        alpha = im.getchannel(im.getbands()[-1])
    lo, _ = alpha.getextrema()
    # premultiplied modes (RGBa, La) are opaque on the same test
    return lo == 255


def _palette_is_gray(im) -> bool:
    pal = im.getpalette()
    if not pal:
        return False
    p = np.asarray(pal, dtype=np.int32).reshape(-1, 3)
    return bool((p[:, 0] == p[:, 1]).all() and (p[:, 1] == p[:, 2]).all())


def decode_mask(uri: str, shape: tuple[int, int]) -> np.ndarray:
    """A mask image as (H, W) bool (non-zero = face); raises SampleRejected on mismatch."""
    from PIL import Image

    try:
        m = np.asarray(Image.open(io.BytesIO(read_bytes(uri))).convert("L")) > 0
    except Exception as e:  # noqa: BLE001 - any decoder failure is a rejection
        raise SampleRejected(uri, "ingest", f"unreadable mask ({e})") from None
    if m.shape != tuple(shape):
        raise SampleRejected(uri, "ingest", f"mask shape {m.shape} != image shape {tuple(shape)}")
    return m


def exif_focal_35mm(data: bytes) -> float | None:
    """EXIF ``FocalLengthIn35mmFilm`` (tag 0xA405 in the Exif IFD) in mm, or None when
    absent, unreadable or outside [8, 800] mm (no phone or camera lens; a bad tag must not
    steer the fit)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _exif_focal_of(im)
    except Exception:  # noqa: BLE001 - a malformed EXIF block costs only the focal
        return None


def _exif_focal_of(im) -> float | None:
    """:func:`exif_focal_35mm` of an opened PIL image."""
    try:
        f = float(im.getexif().get_ifd(0x8769).get(0xA405))
    except Exception:  # noqa: BLE001 - a malformed EXIF block costs only the focal
        return None
    return f if 8.0 <= f <= 800.0 else None


def ingest_one(record: InputRecord,
               opts: IngestConfig = DEFAULT_INGEST) -> IngestedImage:
    """Read and decode one input; raises :class:`SampleRejected` with the reason."""
    try:
        data = read_bytes(record.source_uri)
    except FileNotFoundError:
        raise SampleRejected(record.source_uri, "ingest", "file not found") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a rejection
        raise SampleRejected(record.source_uri, "ingest", f"unreadable ({e})") from None
    image, focal = _decode(data, record.source_uri, opts)
    digest = record.sha256 or hashlib.sha256(data).hexdigest()
    mask = decode_mask(record.mask_uri, image.shape[:2]) if record.mask_uri else None
    return IngestedImage(record=record, image=image, sha256=digest, mask=mask,
                         focal_35mm=focal)


def ingest_batch(records: list[InputRecord],
                 opts: IngestConfig = DEFAULT_INGEST) -> IngestBatch:
    """Decode a batch; bad inputs become rejection rows, duplicates (by content) too."""
    out = IngestBatch()
    seen: dict[str, str] = {}
    for r in records:
        try:
            img = ingest_one(r, opts)
        except SampleRejected as e:
            out.rejected.append(e.row())
            continue
        if img.sha256 in seen:
            out.rejected.append(SampleRejected(r.source_uri, "ingest",
                                               f"duplicate of {seen[img.sha256]}").row())
            continue
        seen[img.sha256] = r.source_uri
        out.images.append(img)
    return out
