"""Photos of one subject fitted together: on synthetic subjects with 3 views each (known
identity, per-view expression and pose, noisy landmarks), the joint identity is closer to
the truth than the per-photo identities on average; subjects do not mix; a subject's photos
stay in one shard when asked."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from facecorpus.configs.fit import FitConfig
from facecorpus.tasks.fit import fit_landmarks, synthetic_batch
from facecorpus.tasks.inputs import assign_shards
from facecorpus.tasks.joint_fit import fit_joint

S = 256
CFG = FitConfig(rounds=2, iters_per_round=60)


def subjects_scene(model, n_subjects=3, views=3, noise_px=2.0, seed=0):
    """(landmarks (N, 68, 2), subject ids (N,), true alpha (N, K)): the poses and
    expressions of ``synthetic_batch``, one identity per subject, Gaussian pixel noise."""
    n = n_subjects * views
    sb = synthetic_batch(model, n, S, seed=seed, yaw_max=40)
    rng = np.random.default_rng(seed + 1)
    alpha = np.repeat(rng.normal(size=(n_subjects, model.n_id)) * model.id_std, views, 0)
    truth = dataclasses.replace(sb.truth, alpha=alpha.astype(np.float32))
    lm = np.stack([truth.camera_for(i).project(truth.vertices(model, i)[model.landmarks])[:, :2]
                   for i in range(n)])
    lm = lm + rng.normal(0, noise_px, lm.shape)
    subjects = np.repeat([f"s{k}" for k in range(n_subjects)], views)
    return lm.astype(np.float32), subjects, alpha


def identity_error(model, alpha, truth) -> np.ndarray:
    """(N,) RMS vertex distance (mm) of the neutral identity shapes."""
    K = alpha.shape[1]
    return np.array([np.sqrt(((model.shape(np.pad(a, (0, model.n_id - K)))
                               - model.shape(t)) ** 2).sum(-1).mean())
                     for a, t in zip(alpha, truth, strict=True)])


@pytest.fixture(scope="module")
def model():
    from facecorpus.meshops.procedural import procedural_model

    return procedural_model()


def test_joint_identity_beats_the_per_photo_average(model):
    lm, subjects, alpha = subjects_scene(model)
    per = fit_landmarks(model, lm, S, CFG)
    joint = fit_joint(model, per, lm, subjects, CFG)
    e_per, e_joint = identity_error(model, per.alpha, alpha), identity_error(model, joint.alpha,
                                                                             alpha)
    for s in set(subjects):
        m = subjects == s
        assert np.ptp(joint.alpha[m], 0).max() == 0  # one identity per subject
        assert e_joint[m][0] < e_per[m].mean(), (s, e_joint[m][0], e_per[m])
    assert e_joint.mean() < 0.9 * e_per.mean(), (e_joint.mean(), e_per.mean())
    # each photo still fits its own landmarks (pose and expression stay per photo)
    assert (joint.landmark_nme < 0.05).all() and np.isfinite(joint.yaw).all()
    assert (joint.landmark_rmse < per.landmark_rmse + 1.5).all()


def test_subjects_do_not_mix_and_singletons_keep_their_fit(model):
    lm, _, _ = subjects_scene(model, n_subjects=2, views=2, seed=3)
    per = fit_landmarks(model, lm, S, CFG)
    subjects = np.array(["a", "a", "", "b"])  # no id, and a subject with one photo
    joint = fit_joint(model, per, lm, subjects, CFG)
    for i in (2, 3):
        np.testing.assert_array_equal(joint.alpha[i], per.alpha[i])
        assert joint.yaw[i] == per.yaw[i]
    np.testing.assert_array_equal(joint.alpha[0], joint.alpha[1])
    # a photo whose per-photo fit failed is left out of its subject's joint fit
    bad = dataclasses.replace(per, failure=np.array([None, "x", None, None], object))
    j2 = fit_joint(model, bad, lm, np.array(["a", "a", "a", "a"]), CFG)
    np.testing.assert_array_equal(j2.alpha[1], per.alpha[1])
    assert (j2.alpha[0] == j2.alpha[2]).all() and (j2.alpha[0] == j2.alpha[3]).all()


def test_assign_shards_keeps_a_subject_together():
    uris = [f"u{i}" for i in range(7)]
    subj = {"u0": "a", "u1": "b", "u2": "a", "u3": "c", "u4": "b", "u5": "a", "u6": ""}
    plain = assign_shards(uris, {}, 3)
    assert plain == {u: i // 3 for i, u in enumerate(uris)}  # unchanged without subjects
    grouped = assign_shards(uris, {}, 3, subjects=subj)
    for s in "abc":
        assert len({grouped[u] for u in uris if subj[u] == s}) == 1, (s, grouped)
    # stable: a known subject's new photo joins its subject's shard, even a full one
    known = dict(grouped)
    again = assign_shards(uris + ["u7"], known, 3, subjects={**subj, "u7": "a"})
    assert again["u7"] == known["u0"] and all(again[u] == known[u] for u in uris)
