"""Shard keys: what a shard's bytes depend on (:class:`StageKey`), per-part digests and
the reason a shard runs again (:func:`why_runs`), and the ``made_by`` record of commits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from facecorpus.core import hashing

if TYPE_CHECKING:
    from facecorpus.flows.shards import ShardSpec


@dataclass(frozen=True)
class StageKey:
    """What one stage's output for one shard depends on, in one readable record.

    ``parts`` maps a name (``config``, ``model``, ``inputs``, ``landmark_backend``,
    ``prior``, ``code`` ...) to a JSON-able value or a digest of it; the key is the digest
    of all of them. Changing any part changes the key; nothing else does.
    """

    stage: str
    parts: dict

    @property
    def key(self) -> str:
        return hashing.digest(self.stage, self.parts, n=40)

    def changed(self, old_parts: dict | None) -> list[str]:
        """Names of the parts that differ from an older record (all when unknown)."""
        if not old_parts:
            return ["new"]
        names = sorted(set(self.parts) | set(old_parts))
        return [n for n in names if hashing.stable_json(self.parts.get(n))
                != hashing.stable_json(old_parts.get(n))] or ["none"]


def stage_key(stage: str, code_version: int, **parts) -> StageKey:
    """A :class:`StageKey` that always covers the code: the package version, the stage's own
    code version and a digest of the source of every package that makes the bytes (so an
    edited stage never reuses shards made by the old code)."""
    return StageKey(stage, {"code": {"package": hashing.package_version(),
                                     "stage": int(code_version),
                                     "source": hashing.source_digest()}, **parts})


def part_digests(parts: dict) -> dict:
    """A short digest per key part (``inputs`` may be a dict of per-input digests)."""
    out = {}
    for k, v in parts.items():
        out[k] = ({u: hashing.digest(d, n=12) for u, d in v.items()} if isinstance(v, dict)
                  and k == "inputs" else hashing.digest(v, n=12))
    return out


def why_runs(spec: ShardSpec, committed_key: str | None, old_stats: dict | None) -> str:
    """Why a shard must run: "new", "" (it need not), or which key parts changed since the
    commit (inputs: how many were added, removed, changed), from the stats of that commit."""
    if committed_key is None:
        return "new"
    if committed_key == spec.key:
        return ""
    old = ((old_stats or {}).get("extra") or {}).get("key_parts")
    if not old:
        return "key changed"
    out = []
    for k in sorted(set(spec.explain) | set(old)):
        a, b = old.get(k), spec.explain.get(k)
        if a == b:
            continue
        if k == "inputs" and isinstance(a, dict) and isinstance(b, dict):
            add = len(set(b) - set(a))
            rem = len(set(a) - set(b))
            chg = sum(a[u] != b[u] for u in set(a) & set(b))
            out.append(f"inputs (+{add} -{rem} ~{chg})")
        else:
            out.append(k)
    return "changed: " + ", ".join(out) if out else "key changed"


def made_by(model_hash: str) -> dict:
    """Provenance of a commit (``verify`` reports datasets whose shards disagree on it)."""
    return {"package": hashing.package_version(), "model": model_hash[:16],
            "code": hashing.source_digest()}
