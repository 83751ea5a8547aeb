"""DR feature encode/decode throughput vs naive references, measured in the same run.

    .venv/bin/python benchmarks/bench_dr.py [--batch 8]

Meshes: the procedural test model at 97^2 = 9,409 and 195^2 = 38,025 vertices (always
available) and, when $FACECORPUS_ASSETS holds the ICT-FaceKit archive, the ICT face mesh
(9,409 vertices) and its midpoint subdivision (37,6xx vertices). Deformed meshes are random
identity + expression samples of each model.

Ours: ``DRTopology`` (built once: weights + two sparse factorisations, timed separately),
``encode`` / ``decode`` per mesh, single and batched.
References, same meshes, same run:
- encode: a per-vertex Python loop (one-ring least squares + SVD polar, no exactness
  correction, i.e. less work than ours) timed on 500 vertices and scaled to V;
- decode: ``scipy.sparse.linalg.spsolve`` on the anchored Laplacian, re-factorised per mesh.
Also printed: the round-trip error of ours and of plain least-squares DR (no correction).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import scipy.sparse.linalg as spl


def timed(f, repeats=3):
    best, out = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best * 1e3, out


def naive_encode_ms(topo, p, n_sub=500):
    """Per-vertex Python loop: LS gradient of the one-ring + polar; ms scaled to all V."""
    from scipy.spatial.transform import Rotation

    V = topo.n_vertices
    ref = topo.reference
    nbrs = [[] for _ in range(V)]
    for i, j, w in zip(topo.edge_i, topo.edge_j, topo.edge_w):
        nbrs[i].append((j, w))
        nbrs[j].append((i, w))
    idx = np.linspace(0, V - 1, n_sub).astype(int)
    t = time.perf_counter()
    for i in idx:
        A = np.zeros((3, 3))
        M = np.zeros((3, 3))
        for j, w in nbrs[i]:
            e = ref[j] - ref[i]
            e2 = p[j] - p[i]
            A += w * np.outer(e2, e)
            M += w * np.outer(e, e)
        T = A @ np.linalg.pinv(M)
        U, s, Vt = np.linalg.svd(T)
        R = U @ Vt
        if np.linalg.det(R) < 0:
            U[:, 2] *= -1
            s[2] *= -1
            R = U @ Vt
        S = Vt.T @ np.diag(s) @ Vt
        np.concatenate([Rotation.from_matrix(R).as_rotvec(), (S - np.eye(3))[np.triu_indices(3)]])
    return (time.perf_counter() - t) * 1e3 * V / n_sub


def naive_decode_ms(topo, feats):
    """Same system, solved with spsolve (factorised inside, every call)."""
    from facecorpus.meshops import dr

    T = dr._features_to_T(feats[None])
    h = topo._h(T)[0]
    L = topo.laplacian.tocsr()
    a = topo.anchors
    free = np.setdiff1d(np.arange(topo.n_vertices), a)
    Lff = L[free][:, free].tocsc()
    Lfa = L[free][:, a]

    def run():
        x = np.empty_like(h)
        x[a] = topo.reference[a]
        x[free] = spl.spsolve(Lff, h[free] - Lfa @ x[a])
        return x

    return timed(run, 2)


def bench(name, model, batch, rng):
    from facecorpus.meshops import dr

    V = model.n_vertices
    P = np.stack([model.shape(rng.standard_normal(model.n_id) * model.id_std,
                              rng.uniform(0, 1, model.n_exp) * (rng.random(model.n_exp) < 0.3))
                  for _ in range(batch)]).astype(np.float64)
    def build():
        t = dr.DRTopology(model.vertices, model.triangles)
        t._Ksolver  # noqa: B018 - the encode factorisation is lazy: include it in the timing
        return t

    t_topo, topo = timed(build, 1)
    t_enc1, F1 = timed(lambda: dr.encode(topo, P[0]))
    t_encb, FB = timed(lambda: dr.encode(topo, P), 2)
    t_dec1, _ = timed(lambda: dr.decode(topo, F1, anchor_position=P[0][topo.anchors]))
    t_decb, QB = timed(lambda: dr.decode(topo, FB, anchor_position=P[:, topo.anchors]), 2)
    ext = np.ptp(P[0], 0).max()
    err = max(np.abs(QB[k] - P[k]).max() for k in range(batch)) / ext
    T = topo._lsq_gradients(P[:1])
    Qp = dr.decode(topo, dr._polar_features(T)[0], anchor_position=P[0][topo.anchors])
    err_plain = np.abs(Qp - P[0]).max() / ext
    _, corr = dr.encode(topo, P[0], return_correction=True)
    t_nenc = naive_encode_ms(topo, P[0])
    t_ndec, _ = naive_decode_ms(topo, F1)
    print(f"\n{name}: V={V}, F={len(model.triangles)}; DRTopology (weights + 2 factorisations) "
          f"{t_topo:.0f} ms")
    print(f"  round trip max|err|/extent: ours {err:.1e}, plain least-squares DR {err_plain:.1e};"
          f" exactness correction |dT|/|T-I| = {corr:.2f}")
    print(f"  {'':22}{'ours 1':>9}{f'ours x{batch}':>10}{'naive':>10}{'speedup':>9}")
    print(f"  {'encode ms/mesh':22}{t_enc1:9.1f}{t_encb / batch:10.1f}{t_nenc:10.0f}"
          f"{t_nenc / (t_encb / batch):8.0f}x")
    print(f"  {'decode ms/mesh':22}{t_dec1:9.1f}{t_decb / batch:10.1f}{t_ndec:10.0f}"
          f"{t_ndec / (t_decb / batch):8.0f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    from facecorpus.meshops.procedural import procedural_model

    print(f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}")
    rng = np.random.default_rng(0)
    for n in (97, 195):
        bench(f"procedural n={n}", procedural_model(n=n, n_albedo=0), args.batch, rng)
    if os.environ.get("FACECORPUS_ASSETS"):
        try:
            import dataclasses

            import trimesh
            from facecorpus.meshops.ict import load_ict_facekit

            m = load_ict_facekit("face")
        except Exception as e:  # noqa: BLE001 - optional part of the benchmark
            print(f"\nICT-FaceKit skipped: {e}")
            return
        bench("ICT-FaceKit face", m, args.batch, rng)
        # midpoint subdivision; bases (first 20 id, 10 exp) subdivided the same way
        v, f = trimesh.remesh.subdivide(m.vertices, m.triangles)

        def lift(basis):
            return np.stack([trimesh.remesh.subdivide(b, m.triangles)[0] for b in basis]
                            ).astype(np.float32)

        m4 = dataclasses.replace(m, vertices=v.astype(np.float32), triangles=f.astype(np.int32),
                                 id_basis=lift(m.id_basis[:20]), id_std=m.id_std[:20],
                                 exp_basis=lift(m.exp_basis[:10]), exp_std=m.exp_std[:10])
        bench("ICT-FaceKit face, midpoint-subdivided", m4, args.batch, rng)


if __name__ == "__main__":
    main()
