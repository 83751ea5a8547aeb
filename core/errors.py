"""Error types shared by every layer, and the one record of a rejected sample.

Everything here imports nothing from facecorpus, so meshops, renderers, datasets, tasks and
flows can all raise and catch the same types.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


class FacecorpusError(Exception):
    """Base of errors a user can act on; the CLI prints them without a traceback."""


class ConfigError(FacecorpusError):
    """A run config is invalid; the message lists every error with its key path."""


class InputError(FacecorpusError):
    """An input file is unusable; the message names the file and the reason."""


class AssetUnavailableError(FacecorpusError):
    """A model or asset source cannot be reached (offline, no local mirror, no cache)."""


@dataclass
class RejectedRow:
    """One sample that did not make it into a dataset: the rejected table's row.

    ``stage`` names the step that refused it (ingest, landmarks, fit, fit2, unwrap, prior,
    blend, augment, render, ...), ``error`` the exception type (or ``"check"`` for a result
    that failed a check, e.g. non-finite), ``reason`` the human-readable message. ``extra``
    holds producer columns (synthesis: face_index, group, parents).
    """

    source_uri: str
    stage: str
    reason: str
    error: str = "check"
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    @classmethod
    def from_exception(cls, source_uri: str, stage: str, exc: BaseException,
                       **extra) -> RejectedRow:
        if isinstance(exc, SampleRejected):
            return cls(source_uri, exc.stage or stage, exc.reason, exc.error, extra)
        msg = str(exc) or exc.__class__.__name__
        return cls(source_uri, stage, msg[:500], type(exc).__name__, extra)


class SampleRejected(InputError):
    """Raised inside a stage when one sample cannot be used; caught at the sample boundary
    and turned into a :class:`RejectedRow` (the run goes on)."""

    def __init__(self, source_uri: str, stage: str, reason: str, error: str = "check"):
        self.source_uri, self.stage, self.reason, self.error = source_uri, stage, reason, error
        super().__init__(f"{source_uri}: [{stage}] {reason}")

    def row(self) -> dict:
        return RejectedRow(self.source_uri, self.stage, self.reason, self.error).row()
