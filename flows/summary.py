"""Run summaries, rebuilt from what is on disk (datasets, per-shard stats), and their text.

``summary.json`` of a run never depends on which process ran which shard: counts come from
the committed manifest and rejected parts, timings from ``OUT/_stats``.
"""

from __future__ import annotations

import numpy as np
from facecorpus.flows import shards

PGT_METRICS = ("landmark_rmse", "landmark_nme", "photometric_error", "rerender_l1",
               "rerender_psnr", "rerender_ssim", "visible_fraction", "yaw")


def value_counts(table, col: str) -> dict:
    if not table.num_rows or col not in table.column_names:
        return {}
    out: dict[str, int] = {}
    for v in table.column(col).to_pylist():
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def rejections(table) -> tuple[dict, dict]:
    """(count by stage, count by reason, most frequent first) of a rejected table."""
    stages, reasons = value_counts(table, "stage"), value_counts(table, "reason")
    return stages, dict(sorted(reasons.items(), key=lambda kv: -kv[1]))


def histograms(table, columns) -> tuple[dict, dict]:
    hist, medians = {}, {}
    for m in columns:
        if table.num_rows and m in table.column_names:
            x = np.asarray(table.column(m).to_numpy(zero_copy_only=False), np.float64)
            x = x[np.isfinite(x)]
            if x.size:
                counts, edges = np.histogram(x, bins=10)
                hist[m] = {"edges": [round(float(e), 5) for e in edges],
                           "counts": counts.tolist()}
                medians[m] = round(float(np.median(x)), 5)
    return hist, medians


def run_stats(out: str, ran: list, phases: dict | None = None) -> dict:
    """Timing of the shards run now and of all shards on record."""
    allst = shards.read_stats(out)
    return {"phase_wall_seconds": dict(phases or {}),"seconds_in_shards": round(sum(s.seconds for s in ran), 3),
            "cpu_seconds_in_shards": round(sum(s.cpu_seconds for s in ran), 3),
            "cpu_seconds_all_shards": round(sum(d.get("cpu_seconds", 0.0)
                                                for d in allst.values()), 3),
            "shards_run_ids": sorted(s.shard for s in ran),
            "shards_run_why": {str(s.shard): s.why for s in ran}}


def write(out: str, summary: dict) -> dict:
    import json

    shards.put_bytes(shards.join(out, "summary.json"),
                     json.dumps(summary, indent=2, default=str).encode())
    return summary


def pseudo_gt_summary(job, specs, stats, *, skipped: int) -> dict:
    """``OUT/summary.json`` of a pseudo-GT run: inputs = accepted + rejected over the planned
    shards that are committed, reasons, landmark sources, metric histograms and medians."""
    from facecorpus.datasets.store import open_dataset

    out = job.out
    man, rej, committed = committed_tables(open_dataset(shards.join(out, "dataset")), specs)
    inputs = sum(len(s.items) for s in specs if s.id in committed)
    # several faces of one photo are several accepted rows of one input
    accepted_uris = set(man.column("source_uri").to_pylist()) if man.num_rows else set()
    accepted_inputs = len(accepted_uris)
    # ... and a photo with one face accepted and another rejected is an accepted input
    rejected_inputs = (len(set(rej.column("source_uri").to_pylist()) - accepted_uris)
                       if rej.num_rows else 0)
    st, reasons = rejections(rej)
    hist, medians = histograms(man, PGT_METRICS)
    conv = man.column("converged").to_pylist() if man.num_rows else []
    summary = {
        "out": str(out), "shards": len(specs), "shards_committed": len(committed),
        "shards_run": len(stats), "shards_skipped": skipped,
        "inputs": inputs, "accepted": man.num_rows, "rejected": rej.num_rows,
        "accepted_inputs": accepted_inputs, "rejected_inputs": rejected_inputs,
        "counts_add_up": inputs == accepted_inputs + rejected_inputs,
        "converged_fraction": round(float(np.mean(conv)), 4) if conv else None,
        "rejected_by_stage": st, "rejected_by_reason": reasons,
        "landmark_sources": value_counts(man, "landmark_source"),
        "prior_versions": value_counts(man, "prior_version"),
        "medians": medians, "histograms": hist,
        "sheets": sorted(shards.join(out, "sheets", f"shard-{s:05d}.png") for s in committed
                         if shards.exists(shards.join(out, "sheets", f"shard-{s:05d}.png"))),
        **run_stats(out, stats, job.phase_seconds),
    }
    return write(out, summary)


def committed_tables(ds, specs) -> tuple:
    """(manifest, rejected, committed ids) of a dataset, limited to the planned shards that
    are committed (a shard dropped from the plan no longer counts)."""
    committed = set(ds.shards) & {s.id for s in specs}
    keep = sorted(committed)
    man, rej = (t.filter(np.isin(t.column("shard").to_numpy(), keep)) if t.num_rows else t
                for t in (ds.manifest, ds.rejected))
    return man, rej, committed


def format_run(title: str, s: dict, body: list[str], *, shards_key: str = "shards",
               n_reasons: int = 10) -> str:
    """The text of any run's summary: title, shard counts, the flow's ``body`` lines, top
    rejection reasons, medians, sheets and what ran now."""
    lines = [title, (f"  shards: {s['shards_committed']}/{s[shards_key]} committed "
                     f"({s['shards_run']} run now, {s['shards_skipped']} already done)"), *body]
    lines += [f"    {c:6d}  {r}" for r, c in list(s["rejected_by_reason"].items())[:n_reasons]]
    if s.get("medians"):
        lines.append("  medians: " + ", ".join(f"{k} {v:g}" for k, v in s["medians"].items()))
    sheets = s.get("sheets") or ([s["sheet"]] if s.get("sheet") else [])
    if sheets:
        more = f" (+{len(sheets) - 1})" if len(sheets) > 1 else ""
        lines.append(f"  sheets: {sheets[0]}{more}")
    if s.get("shards_run"):
        why = ", ".join(f"{k}: {v}" for k, v in list(s["shards_run_why"].items())[:8])
        lines.append(f"  ran shards {s['shards_run_ids'][:16]} ({why}); "
                     f"{s['cpu_seconds_in_shards']:.1f} CPU-s in shards")
    return "\n".join(lines)


def _balance(s: dict, what: str = "inputs") -> str:
    ok = "ok" if s["counts_add_up"] else "MISMATCH"
    return f"  {what} {s['inputs']} = accepted {s['accepted']} + rejected {s['rejected']} ({ok})"


def format_pseudo_gt(s: dict) -> str:
    return format_run(f"pseudo-gt -> {s['out']}", s, [
        _balance(s), f"  landmarks: {s['landmark_sources']}  converged: {s['converged_fraction']}"])


def synthesis_summary(job, stats, *, skipped: int) -> dict:
    """``OUT/summary.json`` and ``summary_sheet.png`` of a synthesis run."""
    from facecorpus.datasets.store import open_dataset
    cfg, out = job.cfg, job.out
    views = open_dataset(shards.join(out, "views"))
    faces = open_dataset(shards.join(out, "faces"))
    rej = faces.rejected
    st, reasons = rejections(rej)
    summary = {
        "out": str(out), "n_shards": cfg.n_shards(),
        "shards_committed": len(views.shards), "shards_run": len(stats),
        "shards_skipped": skipped,
        "faces_requested": cfg.augment.n_faces, "faces": faces.manifest.num_rows,
        "pairs": views.manifest.num_rows, "poses_per_face": len(cfg.poses.yaws()),
        "rejected_draws": int(rej.num_rows), "rejected_by_stage": st,
        "rejected_by_reason": reasons,
        "faces_by_group": dict(sorted(value_counts(faces.manifest, "group").items())),
        "pairs_this_run": int(sum(s.extra.get("pairs", 0) for s in stats)),
        **run_stats(out, stats, job.phase_seconds),
    }
    if views.manifest.num_rows:
        P = summary["poses_per_face"]
        first = views.manifest.column("index").to_numpy()[:P]
        img, pn, mk = (views.read(k, first) for k in ("image", "pncc", "mask"))
        sheet = shards.write_sheet(shards.join(out, "summary_sheet.png"),
                                   [list(img), list(pn), [m * 255 for m in mk]], cell=96,
                                   labels=[f"{y:+.0f}" for y in cfg.poses.yaws()])
        summary["sheet"] = str(sheet)
    return write(out, summary)


def format_synthesis(s: dict) -> str:
    return format_run(f"synthesis -> {s['out']}", s, [
        (f"  faces: {s['faces']}/{s['faces_requested']}  pairs: {s['pairs']} "
         f"({s['poses_per_face']} poses/face)  groups: {s['faces_by_group']}"),
        f"  rejected draws: {s['rejected_draws']} {s['rejected_by_stage']}"],
        shards_key="n_shards", n_reasons=8)


def format_rotate_render(s: dict) -> str:
    return format_run(f"rotate-render {s['source']} -> {s['out']}", s, [
        _balance(s, "source samples") + f"; views {s['views']} ({s['views_this_run']} this run)",
        f"  rejected by stage {s['rejected_by_stage']}"], n_reasons=8)
