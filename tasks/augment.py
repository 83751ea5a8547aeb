"""Shape augmentation: many new faces from a few source subjects by interpolating their
deformation-representation (DR) features (the published recipe), as pure batch functions.

Pipeline (arrays in, arrays out; the flow adds Prefect/Dask around it):

1. Source subjects (:class:`SourceSubjects`): random model samples
   (:func:`random_subjects`), fitted coefficients of a pseudo-GT dataset
   (:func:`subjects_from_dataset`) or registered OBJ/PLY meshes (:func:`subjects_from_meshes`),
   each with a group label and a UV texture.
2. :func:`prepare_sources`: DR-encode every source against the mean of the sources
   (one :class:`facecorpus.meshops.dr.DRTopology`, factorised once).
3. :func:`assign_groups`: the group of every generated face, with exact quotas from the
   configured ratios.
4. :func:`sample_face`: for face index i, draw m subjects of its group, DR weights, decode,
   check; a rejected draw is recorded with its reason and the next attempt is drawn. The new
   face takes the texture of the closest source of its group.

Determinism: everything random about face i comes from
``face_rng(seed, STREAM_AUGMENT, i)``, a generator seeded by (seed, stream, i) only, never
by the worker, the shard or the order in which faces are processed.
"""

from __future__ import annotations

import csv
import glob
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from facecorpus.core.errors import InputError, RejectedRow
from facecorpus.meshops.model import MorphableModel

# Independent random streams per face: augmentation draws never shift render draws.
STREAM_AUGMENT = 1
STREAM_RENDER = 2
STREAM_SOURCES = 3
STREAM_GROUPS = 4
STREAM_SPLIT = 5


def face_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of one (stream, face index): a pure function of its arguments."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(stream, index)))


# --------------------------------------------------------------------------- records
@dataclass(frozen=True, eq=False)
class SourceSubjects:
    """N source subjects of one model topology.

    Attributes:
        subject_ids: (N,) unique names.
        groups: (N,) group label per subject.
        vertices: (N, V, 3) float32 mm.
        textures: (N, S, S, 3) uint8 UV textures (row r <-> v = 1 - (r + 0.5) / S).
        source_uris: (N,) where each subject came from.
        embeddings: (N, D) float32 or None: used instead of shape to pick textures.
        coefficients: (N, K) float32 identity coefficients or None.
    """

    subject_ids: tuple[str, ...]
    groups: tuple[str, ...]
    vertices: np.ndarray
    textures: np.ndarray
    source_uris: tuple[str, ...]
    embeddings: np.ndarray | None = None
    coefficients: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.subject_ids)
        if not (len(self.groups) == n == self.vertices.shape[0] == self.textures.shape[0]
                == len(self.source_uris)):
            raise ValueError("SourceSubjects: fields disagree on the number of subjects")

    def __len__(self) -> int:
        return len(self.subject_ids)

    def members(self) -> dict[str, np.ndarray]:
        """group -> sorted subject indices."""
        g = np.asarray(self.groups)
        return {name: np.flatnonzero(g == name) for name in sorted(set(self.groups))}


@dataclass(frozen=True, eq=False)
class PreparedSources:
    """Sources plus what sampling needs: DR features against their mean, and the topology."""

    subjects: SourceSubjects
    topology: object  # facecorpus.meshops.dr.DRTopology
    features: np.ndarray  # (N, V, 9) float32
    triangles: np.ndarray  # (F, 3) int32
    # Texture matching compares shapes on an evenly strided subset of at most ~2048 vertices
    # (``probe``), centred: enough to rank shapes, and small for thousands of sources.
    probe: np.ndarray | None = None  # (P,) vertex indices
    centred: np.ndarray | None = None  # (N, P, 3) float32 probe vertices minus their centroid

    def __post_init__(self):
        if self.probe is None:
            V = self.subjects.vertices.shape[1]
            object.__setattr__(self, "probe", np.arange(0, V, max(1, V // 2048)))
        if self.centred is None:
            v = np.asarray(self.subjects.vertices[:, self.probe], np.float32)
            object.__setattr__(self, "centred", v - v.mean(1, keepdims=True))


@dataclass(frozen=True, eq=False)
class FaceSample:
    """One accepted new face.

    Attributes:
        index: face index (global, 0-based).
        group: its group.
        vertices: (V, 3) float32 mm, centred like the sources' mean.
        parents: (m,) source subject indices that were interpolated.
        weights: (m,) DR weights.
        texture_subject: index of the source whose texture it takes.
        attempt: which draw (0-based) was accepted.
    """

    index: int
    group: str
    vertices: np.ndarray
    parents: np.ndarray
    weights: np.ndarray
    texture_subject: int
    attempt: int


@dataclass
class SampleResult:
    face: FaceSample | None
    rejections: list[RejectedRow] = field(default_factory=list)


# --------------------------------------------------------------------------- textures
def _smooth_noise(rng: np.random.Generator, size: int, cells: int = 6) -> np.ndarray:
    """Low-frequency noise (S, S) in about [-1, 1]: bilinear upsampling of a coarse grid."""
    from PIL import Image

    coarse = rng.normal(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(img, dtype=np.float32) / 2.0, -1.0, 1.0)


# Skin tones of the synthetic groups, sRGB in [0, 1] (cycled when there are more groups).
_GROUP_TONES = np.array([[0.80, 0.62, 0.52], [0.55, 0.38, 0.28], [0.92, 0.76, 0.64],
                         [0.68, 0.50, 0.38]], dtype=np.float32)


def procedural_texture(model: MorphableModel, rng: np.random.Generator, size: int,
                       tone: np.ndarray, albedo_uv: np.ndarray | None = None) -> np.ndarray:
    """A plausible skin texture for a source subject that has none.

    Args:
        model: the model (its albedo, already baked to UV as ``albedo_uv``, gives structure).
        tone: (3,) base skin colour.
        albedo_uv: (S, S, 3) float32 model mean albedo in UV space, or None (flat skin).

    Returns:
        (S, S, 3) uint8.
    """
    base = np.broadcast_to(tone, (size, size, 3)).astype(np.float32)
    if albedo_uv is not None:
        # Keep the albedo's structure (lips, eye sockets) but move its mean to the tone.
        mean = albedo_uv.reshape(-1, 3).mean(0)
        base = np.clip(albedo_uv * (tone / np.maximum(mean, 1e-3)), 0.0, 1.0)
    shade = 1.0 + 0.08 * _smooth_noise(rng, size)[..., None]
    blotch = 0.04 * _smooth_noise(rng, size, cells=16)[..., None] * np.array([1.0, -0.5, -0.5])
    tex = np.clip(base * shade + blotch, 0.0, 1.0)
    return (tex * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- sources
def random_subjects(model: MorphableModel, n: int, *, coeff_std: float = 1.0,
                    n_groups: int = 2, seed: int = 0, texture_size: int = 256,
                    albedo_uv: np.ndarray | None = None) -> SourceSubjects:
    """``n`` random model samples spread round-robin over synthetic groups ``g0..g{G-1}``.

    Each group has its own mean in coefficient space (drawn once from the prior) so that
    groups differ in shape the way real demographic groups do; a subject is
    ``alpha = 0.6 * group_mean + 0.8 * noise`` with both terms ~ N(0, (coeff_std id_std)^2),
    which keeps the overall prior variance.

    Returns:
        :class:`SourceSubjects` with coefficients (n, K) and procedural textures.
    """
    if n < 1 or n_groups < 1:
        raise ValueError("random_subjects: need n >= 1 and n_groups >= 1")
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(STREAM_SOURCES,)))
    std = model.id_std.astype(np.float64) * coeff_std
    group_means = rng.normal(size=(n_groups, model.n_id)) * std
    ids, groups, verts, texs, coeffs = [], [], [], [], []
    for i in range(n):
        g = i % n_groups
        alpha = 0.6 * group_means[g] + 0.8 * rng.normal(size=model.n_id) * std
        coeffs.append(alpha.astype(np.float32))
        verts.append(model.shape(alpha))
        ids.append(f"random{i:05d}")
        groups.append(f"g{g}")
        tone = _GROUP_TONES[g % len(_GROUP_TONES)] * rng.uniform(0.93, 1.07, size=3)
        texs.append(procedural_texture(model, rng, texture_size, tone.astype(np.float32),
                                       albedo_uv))
    return SourceSubjects(tuple(ids), tuple(groups), np.stack(verts).astype(np.float32),
                          np.stack(texs), tuple(f"random:{model.name}:{s}" for s in ids),
                          coefficients=np.stack(coeffs))


def _load_mesh_vertices(path: Path, n_vertices: int) -> np.ndarray:
    """Vertices (V, 3) of an OBJ/PLY with exactly the model's vertex count (no re-ordering)."""
    import trimesh

    try:
        mesh = trimesh.load(path, process=False, maintain_order=True, force="mesh")
    except Exception as e:  # noqa: BLE001 - any parser failure is bad input: name it
        raise InputError(f"{path}: unreadable mesh ({e})") from None
    v = np.asarray(getattr(mesh, "vertices", np.zeros((0, 3))), dtype=np.float32)
    if v.shape != (n_vertices, 3):
        raise InputError(f"{path}: {v.shape[0]} vertices, the model's topology has "
                         f"{n_vertices}: not a registered mesh of this model")
    if not np.isfinite(v).all():
        raise InputError(f"{path}: vertices contain NaN or infinite values")
    return v


def subjects_from_meshes(model: MorphableModel, pattern: str, *, groups_csv: str | None = None,
                         texture_size: int = 256, seed: int = 0,
                         albedo_uv: np.ndarray | None = None) -> SourceSubjects:
    """Registered meshes (OBJ/PLY in the model's vertex order) as sources.

    Args:
        pattern: a folder (all ``*.obj``/``*.ply`` in it) or a glob.
        groups_csv: optional CSV with columns ``file,group`` (file = the mesh's name or stem);
            meshes not listed go to group ``all``.

    A PNG/JPG with the mesh's stem beside it is its texture (resized to ``texture_size``);
    otherwise a procedural one is made.
    """
    from PIL import Image

    p = Path(pattern)
    files = (sorted(q for q in p.iterdir() if q.suffix.lower() in (".obj", ".ply"))
             if p.is_dir() else sorted(Path(q) for q in glob.glob(pattern)))
    if not files:
        raise InputError(f"{pattern}: no OBJ/PLY meshes found")
    group_of: dict[str, str] = {}
    if groups_csv:
        try:
            with open(groups_csv, newline="") as fh:
                for row in csv.DictReader(fh):
                    group_of[Path(row["file"]).stem] = str(row["group"])
        except (OSError, KeyError) as e:
            raise InputError(f"{groups_csv}: cannot read columns file,group ({e})") from None
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(STREAM_SOURCES,)))
    verts, texs, groups = [], [], []
    for f in files:
        verts.append(_load_mesh_vertices(f, model.n_vertices))
        groups.append(group_of.get(f.stem, "all"))
        tex_path = next((f.with_suffix(s) for s in (".png", ".jpg", ".jpeg")
                         if f.with_suffix(s).is_file()), None)
        if tex_path is not None:
            try:
                with Image.open(tex_path) as im:
                    im = im.convert("RGB").resize((texture_size, texture_size), Image.BILINEAR)
                    texs.append(np.asarray(im, dtype=np.uint8))
            except Exception as e:  # noqa: BLE001 - any decoder failure is bad input
                raise InputError(f"{tex_path}: unreadable texture ({e})") from None
        else:
            texs.append(procedural_texture(model, rng, texture_size, _GROUP_TONES[0], albedo_uv))
    return SourceSubjects(tuple(f.stem for f in files), tuple(groups),
                          np.stack(verts), np.stack(texs), tuple(str(f) for f in files))


def subjects_from_dataset(model: MorphableModel, root: str, *, group_column: str | None = "group",
                          embedding_column: str | None = None, texture_size: int = 256,
                          texture_field: str = "uv_pseudo_gt") -> SourceSubjects:
    """Sources from a pseudo-GT dataset: fitted identity coefficients and pseudo-GT UV maps.

    Coefficients are read from the array field ``alpha`` / ``coefficients`` when the dataset
    has one, else from the manifest column of that name (a list of floats per row).
    """
    from facecorpus.datasets.store import open_dataset

    try:
        ds = open_dataset(root)
    except FileNotFoundError as e:
        raise InputError(f"{root}: not a dataset ({e})") from None
    table = ds.manifest
    n = table.num_rows
    if n == 0:
        raise InputError(f"{root}: the dataset has no committed samples")
    fields = set(ds.schema.fields)
    cols = set(table.column_names)
    idx = np.arange(n)
    coeff = None
    for name in ("id_coeffs", "alpha", "coefficients", "id_coefficients"):
        if name in fields:
            coeff = np.asarray(ds.read(name, idx), dtype=np.float32)
            break
        if name in cols:
            coeff = np.asarray(table.column(name).to_pylist(), dtype=np.float32)
            break
    if coeff is None:
        raise InputError(f"{root}: no identity coefficients (field or manifest column "
                         "'id_coeffs' / 'alpha' / 'coefficients') in the pseudo-GT dataset")
    if coeff.ndim != 2:
        raise InputError(f"{root}: coefficients have shape {coeff.shape}, expected (N, K)")
    if coeff.shape[1] < model.n_id:  # fitted with fewer modes: the rest are 0
        coeff = np.pad(coeff, ((0, 0), (0, model.n_id - coeff.shape[1])))
    coeff = coeff[:, : model.n_id]
    if texture_field not in fields:
        raise InputError(f"{root}: no '{texture_field}' field to use as textures")
    tex = np.asarray(ds.read(texture_field, idx))
    if tex.dtype != np.uint8:
        tex = (np.clip(tex.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if tex.shape[1] != texture_size:
        from PIL import Image

        tex = np.stack([np.asarray(Image.fromarray(t[..., :3]).resize(
            (texture_size, texture_size), Image.BILINEAR)) for t in tex])
    if group_column and group_column in cols:
        groups = tuple(str(g) if g not in (None, "") else "all"
                       for g in table.column(group_column).to_pylist())
    else:
        groups = ("all",) * n
    emb = None
    if embedding_column:
        if embedding_column not in cols:
            raise InputError(f"{root}: no manifest column '{embedding_column}' for embeddings")
        emb = np.asarray(table.column(embedding_column).to_pylist(), dtype=np.float32)
    sid = (table.column("sample_id").to_pylist() if "sample_id" in cols
           else [f"s{i}" for i in range(n)])
    uris = (table.column("source_uri").to_pylist() if "source_uri" in cols
            else [f"{root}#{s}" for s in sid])
    verts = np.stack([model.shape(a) for a in coeff])
    return SourceSubjects(tuple(str(s) for s in sid), groups, verts.astype(np.float32),
                          tex[..., :3].astype(np.uint8), tuple(str(u) for u in uris),
                          embeddings=emb, coefficients=coeff)


# --------------------------------------------------------------------------- sampling
def prepare_sources(subjects: SourceSubjects, triangles: np.ndarray) -> PreparedSources:
    """DR-encode every source against the mean of the sources (the DR reference mesh)."""
    from facecorpus.meshops import dr

    reference = subjects.vertices.astype(np.float64).mean(0)
    topo = dr.DRTopology(reference, triangles)
    feats = np.asarray(dr.encode(topo, subjects.vertices), np.float32)
    return PreparedSources(subjects, topo, feats, np.asarray(triangles, np.int32))


_ARRAYS = ("vertices", "textures", "features", "coefficients", "embeddings", "reference")


def save_prepared(prepared: PreparedSources, folder: str | Path) -> Path:
    """Write prepared sources as plain ``.npy`` files + ``meta.json`` (no pickle), each
    atomically, ``done.json`` last; :func:`load_prepared` memory-maps them, so worker
    processes share one copy through the page cache and nobody re-encodes."""
    import json

    from facecorpus.core import atomic

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    subj = prepared.subjects
    arrays = {"vertices": subj.vertices, "textures": subj.textures,
              "features": prepared.features, "coefficients": subj.coefficients,
              "embeddings": subj.embeddings, "reference": prepared.topology.reference}
    for name, a in arrays.items():
        if a is None:
            continue
        atomic.write_with(d / f"{name}.npy",
                          lambda fh, a=a: np.save(fh, np.ascontiguousarray(a), allow_pickle=False))
    meta = {"subject_ids": list(subj.subject_ids), "groups": list(subj.groups),
            "source_uris": list(subj.source_uris)}
    for name, text in (("meta.json", json.dumps(meta)), ("done.json", json.dumps({"n": len(subj)}))):
        atomic.write_text(d / name, text)
    return d


def load_prepared(folder: str | Path, triangles: np.ndarray) -> PreparedSources:
    """Memory-map sources written by :func:`save_prepared` and rebuild the DR topology."""
    import json

    from facecorpus.meshops import dr

    d = Path(folder)
    if not (d / "done.json").is_file():
        raise InputError(f"{d}: no complete prepared-sources cache (done.json missing)")
    meta = json.loads((d / "meta.json").read_text())
    a = {n: (np.load(d / f"{n}.npy", mmap_mode="r", allow_pickle=False)
             if (d / f"{n}.npy").is_file() else None) for n in _ARRAYS}
    subj = SourceSubjects(tuple(meta["subject_ids"]), tuple(meta["groups"]), a["vertices"],
                          a["textures"], tuple(meta["source_uris"]),
                          embeddings=a["embeddings"], coefficients=a["coefficients"])
    topo = dr.DRTopology(np.asarray(a["reference"]), triangles)
    return PreparedSources(subj, topo, a["features"], np.asarray(triangles, np.int32))


def assign_groups(n_faces: int, ratios: dict[str, float], seed: int) -> np.ndarray:
    """The group of every generated face: exact quotas (largest remainder) in a random order.

    Args:
        ratios: group -> share (normalised here); groups with share 0 get no faces.

    Returns:
        (n_faces,) array of group names; the count of group g is round(share_g n_faces)
        up to one face of rounding.
    """
    names = sorted(ratios)
    w = np.array([ratios[k] for k in names], dtype=np.float64)
    w = w / w.sum()
    raw = w * n_faces
    counts = np.floor(raw).astype(np.int64)
    short = n_faces - int(counts.sum())
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:short]] += 1
    labels = np.repeat(np.array(names, dtype=object), counts)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(STREAM_GROUPS,)))
    return labels[rng.permutation(n_faces)].astype(str)


def closest_subject(candidates: np.ndarray, prepared: PreparedSources, vertices: np.ndarray,
                    embedding: np.ndarray | None = None) -> int:
    """Index (into the sources) of the candidate closest to a new face.

    By embedding (Euclidean) when ``embedding`` is given, else by RMS vertex distance after
    removing each mesh's centroid.
    """
    subj = prepared.subjects
    if embedding is not None and subj.embeddings is not None:
        d = np.linalg.norm(subj.embeddings[candidates] - embedding, axis=1)
    else:
        v = np.asarray(vertices, np.float32)[prepared.probe]
        v = v - v.mean(0)
        s = prepared.centred[candidates]
        d = np.sqrt(((s - v) ** 2).sum(-1).mean(-1))
    return int(candidates[int(np.argmin(d))])


def sample_face(index: int, group: str, prepared: PreparedSources, *, seed: int, m: int = 5,
                r_range: tuple[float, float] = (0.6, 1.3), theta_max: float = np.pi / 2,
                max_flip_ratio: float = 0.01, self_intersection: bool = False,
                max_attempts: int = 4, uri: str = "") -> SampleResult:
    """Draw new face ``index`` of ``group``: up to ``max_attempts`` draws; each rejected draw
    is a :class:`RejectedRow` (``{uri}/attempt/{k}``, stage ``augment``) whose ``parents``
    column names the drawn subjects.

    Only subjects of ``group`` are ever drawn (with replacement only when the group has
    fewer than m members).
    """
    from facecorpus.meshops import dr

    members = prepared.subjects.members().get(group)
    if members is None or members.size == 0:
        raise InputError(f"group {group!r} has no source subjects")
    rng = face_rng(seed, STREAM_AUGMENT, index)
    out = SampleResult(None)
    for attempt in range(max_attempts):
        parents = rng.choice(members, size=m, replace=members.size < m)
        weights = np.asarray(dr.sample_weights(rng, m, r_range=r_range, theta_max=theta_max),
                             dtype=np.float64)
        try:
            feats = dr.interpolate(prepared.features[parents], weights)
            verts = dr.decode(prepared.topology, feats)
            check = dr.check_mesh(verts, prepared.triangles,
                                  reference=prepared.topology.reference,
                                  max_flip_ratio=max_flip_ratio,
                                  self_intersection=self_intersection)
            reason = "" if check.ok else (check.reason or "rejected by check_mesh")
        except (np.linalg.LinAlgError, FloatingPointError, ValueError) as e:
            reason = f"decode failed: {e}"
        if reason:
            ids = ",".join(str(prepared.subjects.subject_ids[p]) for p in parents)
            out.rejections.append(RejectedRow(f"{uri}/attempt/{attempt}", "augment", str(reason),
                                              "check", {"face_index": index, "group": group,
                                                        "parents": ids}))
            continue
        emb = None
        if prepared.subjects.embeddings is not None:
            # The new face's embedding is the same mix of its parents' embeddings.
            emb = (weights[:, None] * prepared.subjects.embeddings[parents]).sum(0) \
                / max(weights.sum(), 1e-12)
        tex = closest_subject(members, prepared, verts, emb)
        out.face = FaceSample(index, group, np.asarray(verts, np.float32), parents.astype(np.int32),
                              weights.astype(np.float32), tex, attempt)
        return out
    return out


def group_ratios_for(subjects: SourceSubjects, ratios: dict[str, float] | None) -> dict[str, float]:
    """The configured ratios checked against the sources' groups (equal shares when None)."""
    members = subjects.members()
    if ratios is None:
        return {g: 1.0 for g in members}
    missing = [g for g, w in ratios.items() if w > 0 and g not in members]
    if missing:
        raise InputError(f"group_ratios name groups with no source subjects: {missing}; "
                         f"groups present: {sorted(members)}")
    return dict(ratios)

