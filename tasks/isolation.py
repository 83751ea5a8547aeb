"""Per-sample fault isolation: a stage failing for one sample rejects that sample only.

Every stage of a shard goes through one of these, so any exception or non-finite result of
one sample becomes a :class:`facecorpus.core.errors.RejectedRow` with the stage, the error type
and its message, and the other samples go on. Infrastructure failures (storage, a lost
scheduler) happen outside the stages and still fail the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from facecorpus.core.errors import RejectedRow

log = logging.getLogger("facecorpus.isolation")


def each(stage: str, uris: Sequence[str], fn: Callable, *args: Sequence
         ) -> tuple[list[int], list, list[RejectedRow]]:
    """``fn(*args[k][i])`` for every sample i; (indices kept, their results, rejected)."""
    kept, results, rejected = [], [], []
    for i, uri in enumerate(uris):
        try:
            r = fn(*(a[i] for a in args))
        except Exception as e:  # a stage failing for one sample rejects it
            log.debug("%s rejected at %s", uri, stage, exc_info=True)
            rejected.append(RejectedRow.from_exception(uri, stage, e))
            continue
        kept.append(i)
        results.append(r)
    return kept, results, rejected


def one(stage: str, uri: str, fn: Callable) -> tuple[object, list[RejectedRow]]:
    """``fn()`` for one sample: (result, []) or (None, [its rejected row])."""
    _, res, rej = each(stage, [uri], lambda _: fn(), [None])
    return (res[0] if res else None), rej


def batched(stage: str, uris: Sequence[str], fn: Callable, n: int
            ) -> tuple[list[int], list, list[RejectedRow]]:
    """``fn(indices) -> per-sample results`` on the whole batch; if the batch raises, each
    sample alone, so the one that breaks it is found and rejected and the others keep the
    result they would have had (stages are per-image independent)."""
    if n == 0:
        return [], [], []
    try:
        return list(range(n)), list(fn(list(range(n)))), []
    except Exception as e:  # noqa: BLE001
        if n == 1:
            return [], [], [RejectedRow.from_exception(uris[0], stage, e)]
        log.info("%s: batch of %d failed (%s: %s); retrying one by one", stage, n,
                 type(e).__name__, e)
    kept, results, rejected = [], [], []
    for i in range(n):
        try:
            (r,) = fn([i])
        except Exception as e:  # noqa: BLE001
            rejected.append(RejectedRow.from_exception(uris[i], stage, e))
            continue
        kept.append(i)
        results.append(r)
    return kept, results, rejected


def finite_rows(*arrays: np.ndarray | None) -> np.ndarray:
    """(N,) bool: every value of sample i is finite in every given array."""
    ok = None
    for a in arrays:
        if a is None:
            continue
        a = np.asarray(a)
        if a.dtype.kind not in "fc":
            continue
        r = np.isfinite(a.reshape(len(a), -1)).all(1)
        ok = r if ok is None else ok & r
    if ok is None:
        raise ValueError("finite_rows needs at least one array")
    return ok


def check_finite(stage: str, uris: Sequence[str], what: str, *arrays
                 ) -> tuple[np.ndarray, list[RejectedRow]]:
    """(kept indices, rejected rows) for samples with a non-finite value in ``arrays``."""
    ok = finite_rows(*arrays)
    rej = [RejectedRow(uris[i], stage, f"non-finite {what}") for i in np.flatnonzero(~ok)]
    return np.flatnonzero(ok), rej
