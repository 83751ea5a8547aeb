"""DR shape augmentation as the synthesis flow uses it: sources, groups, sampling, textures."""

from __future__ import annotations

import numpy as np
import pytest
from facecorpus.core.errors import InputError
from facecorpus.meshops.procedural import procedural_model
from facecorpus.tasks import augment


@pytest.fixture(scope="module")
def model():
    return procedural_model(n=31, n_id=6, n_exp=2, n_albedo=0)


@pytest.fixture(scope="module")
def prepared(model):
    subj = augment.random_subjects(model, 18, n_groups=3, seed=1, texture_size=16)
    return augment.prepare_sources(subj, model.triangles)


def test_assign_groups_has_exact_quotas_and_is_seeded():
    g = augment.assign_groups(1000, {"a": 0.65, "b": 0.30, "c": 0.05}, seed=3)
    assert [(g == k).sum() for k in "abc"] == [650, 300, 50]
    g2 = augment.assign_groups(1000, {"a": 0.65, "b": 0.30, "c": 0.05}, seed=3)
    np.testing.assert_array_equal(g, g2)
    assert not np.array_equal(g, augment.assign_groups(1000, {"a": .65, "b": .3, "c": .05}, 4))
    h = augment.assign_groups(7, {"x": 1, "y": 1}, seed=0)
    assert sorted([(h == "x").sum(), (h == "y").sum()]) == [3, 4]
    assert set(augment.assign_groups(10, {"x": 1.0, "y": 0.0}, 0)) == {"x"}


def test_random_subjects_groups_and_shapes(model):
    s = augment.random_subjects(model, 9, n_groups=3, seed=0, texture_size=16)
    assert s.groups == ("g0", "g1", "g2") * 3
    assert s.vertices.shape == (9, model.n_vertices, 3)
    assert s.textures.shape == (9, 16, 16, 3) and s.textures.dtype == np.uint8
    np.testing.assert_allclose(s.vertices[4], model.shape(s.coefficients[4]), atol=1e-4)
    again = augment.random_subjects(model, 9, n_groups=3, seed=0, texture_size=16)
    np.testing.assert_array_equal(s.vertices, again.vertices)
    np.testing.assert_array_equal(s.textures, again.textures)


def test_every_sample_comes_from_its_group(prepared):
    groups = np.asarray(prepared.subjects.groups)
    n_acc = 0
    for i in range(24):
        g = f"g{i % 3}"
        res = augment.sample_face(i, g, prepared, seed=5, m=5)
        ids = list(prepared.subjects.subject_ids)
        for r in res.rejections:
            parents = [ids.index(p) for p in r.extra["parents"].split(",")]
            assert set(groups[parents]) == {g}
        if res.face is None:
            continue
        n_acc += 1
        f = res.face
        assert f.group == g
        assert set(groups[f.parents]) == {g}, "a parent from another group"
        assert groups[f.texture_subject] == g, "a texture from another group"
        assert len(set(f.parents.tolist())) == 5  # 6 members >= m: drawn without replacement
        # the published weights: non-negative, Euclidean norm r in [0.6, 1.3]
        assert np.all(f.weights >= -1e-6)
        assert 0.6 - 1e-5 <= np.linalg.norm(f.weights) <= 1.3 + 1e-5
        assert np.isfinite(f.vertices).all()
    assert n_acc >= 20


def test_sampling_is_a_function_of_seed_and_index_only(prepared):
    order1 = [augment.sample_face(i, "g1", prepared, seed=9).face for i in (3, 7, 11)]
    order2 = [augment.sample_face(i, "g1", prepared, seed=9).face for i in (11, 3, 7)]
    for a, b in zip(order1, [order2[1], order2[2], order2[0]], strict=True):
        np.testing.assert_array_equal(a.vertices, b.vertices)
        np.testing.assert_array_equal(a.parents, b.parents)
    other = augment.sample_face(3, "g1", prepared, seed=10).face
    assert not np.array_equal(other.weights, order1[0].weights)


def test_rejected_draws_are_recorded_with_reasons(prepared, monkeypatch):
    from facecorpus.meshops import dr

    calls = {"n": 0}
    real = dr.check_mesh

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] % 2:
            return dr.MeshCheck(False, "flipped triangles 0.1200 > 0.01")
        return real(*a, **k)

    monkeypatch.setattr(dr, "check_mesh", flaky)
    res = augment.sample_face(0, "g0", prepared, seed=0, max_attempts=3)
    assert res.face is not None and res.face.attempt == 1
    assert [r.reason for r in res.rejections] == ["flipped triangles 0.1200 > 0.01"]
    monkeypatch.setattr(dr, "check_mesh", lambda *a, **k: dr.MeshCheck(False, "NaN vertices"))
    res = augment.sample_face(1, "g0", prepared, seed=0, max_attempts=3)
    assert res.face is None and [r.source_uri.rsplit("/", 1)[1] for r in res.rejections] == ["0", "1", "2"]


def test_closest_subject_by_shape_and_by_embedding(prepared):
    subj = prepared.subjects
    members = subj.members()["g2"]
    k = int(members[3])
    noisy = subj.vertices[k] + np.random.default_rng(0).normal(0, 0.01, subj.vertices[k].shape)
    assert augment.closest_subject(members, prepared, noisy + 5.0) == k  # translation-free
    emb = np.eye(len(subj), dtype=np.float32)
    with_emb = augment.PreparedSources(
        augment.SourceSubjects(subj.subject_ids, subj.groups, subj.vertices, subj.textures,
                               subj.source_uris, embeddings=emb),
        prepared.topology, prepared.features, prepared.triangles)
    j = int(members[1])
    assert augment.closest_subject(members, with_emb, noisy, emb[j] * 0.9) == j


def test_subjects_from_meshes(model, tmp_path):
    from facecorpus.meshops.geometry import export_mesh

    for i in range(3):
        v = model.shape(np.eye(model.n_id)[i] * 2.0)
        export_mesh(tmp_path / f"s{i}.obj", v, model.triangles)
    (tmp_path / "groups.csv").write_text("file,group\ns0.obj,a\ns1,b\n")
    s = augment.subjects_from_meshes(model, str(tmp_path), groups_csv=str(tmp_path / "groups.csv"),
                                     texture_size=8)
    assert s.subject_ids == ("s0", "s1", "s2") and s.groups == ("a", "b", "all")
    np.testing.assert_allclose(s.vertices[1], model.shape(np.eye(model.n_id)[1] * 2.0), atol=1e-4)
    # a mesh of another topology is refused with its name
    export_mesh(tmp_path / "bad.obj", model.vertices[:100], model.triangles[:10])
    with pytest.raises(InputError, match="bad.obj"):
        augment.subjects_from_meshes(model, str(tmp_path))


def test_group_ratios_must_name_present_groups(prepared):
    with pytest.raises(InputError, match="nosuch"):
        augment.group_ratios_for(prepared.subjects, {"g0": 0.5, "nosuch": 0.5})
    assert augment.group_ratios_for(prepared.subjects, None) == {"g0": 1.0, "g1": 1.0, "g2": 1.0}


def test_subjects_from_a_pseudo_gt_dataset(model, tmp_path):
    """Fitted coefficients + uv_pseudo_gt textures + a group column, as the pseudo-GT flow
    writes them (fewer fitted modes than the model: the rest are 0)."""
    from facecorpus.datasets.store import DatasetSchema, DatasetWriter, FieldSpec

    rng = np.random.default_rng(0)
    n, k = 4, model.n_id - 2
    schema = DatasetSchema({"id_coeffs": FieldSpec((k,), "float32"),
                            "uv_pseudo_gt": FieldSpec((16, 16, 3), "uint8")},
                           samples_per_shard=4, samples_per_chunk=1, producer="pseudo_gt")
    coeffs = rng.normal(size=(n, k)).astype(np.float32)
    tex = rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)
    rows = [{"sample_id": f"p{i}", "source_uri": f"photos/p{i}.jpg",
             "group": ["f", "m", "", "m"][i], "emb": [float(i), 1.0]} for i in range(n)]
    DatasetWriter(str(tmp_path / "pgt"), schema).write_shard(
        0, {"id_coeffs": coeffs, "uv_pseudo_gt": tex}, rows)
    s = augment.subjects_from_dataset(model, str(tmp_path / "pgt"), embedding_column="emb",
                                      texture_size=8)
    assert s.groups == ("f", "m", "all", "m")
    assert s.source_uris[1] == "photos/p1.jpg"
    full = np.zeros(model.n_id, np.float32)
    full[:k] = coeffs[2]
    np.testing.assert_allclose(s.vertices[2], model.shape(full), atol=1e-4)
    assert s.textures.shape == (n, 8, 8, 3) and s.embeddings.shape == (n, 2)
    same = augment.subjects_from_dataset(model, str(tmp_path / "pgt"), texture_size=16)
    np.testing.assert_array_equal(same.textures, tex)
    with pytest.raises(InputError, match="nosuch"):
        augment.subjects_from_dataset(model, str(tmp_path / "pgt"), embedding_column="nosuch")


def test_prepared_sources_cache_round_trip(prepared, model, tmp_path):
    """Sources saved once and memory-mapped by workers sample exactly the same faces."""
    augment.save_prepared(prepared, tmp_path / "src")
    loaded = augment.load_prepared(tmp_path / "src", model.triangles)
    assert isinstance(loaded.features, np.memmap)
    assert loaded.subjects.groups == prepared.subjects.groups
    for i in (0, 5):
        a = augment.sample_face(i, "g2", prepared, seed=1).face
        b = augment.sample_face(i, "g2", loaded, seed=1).face
        np.testing.assert_array_equal(a.vertices, b.vertices)
        assert a.texture_subject == b.texture_subject
    with pytest.raises(InputError, match="done.json"):
        augment.load_prepared(tmp_path / "nothing", model.triangles)
