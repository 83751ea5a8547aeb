"""Error types shared by every layer (kept here because configs imports nothing else)."""


class FacecorpusError(Exception):
    """Base of errors a user can act on; the CLI prints them without a traceback."""


class ConfigError(FacecorpusError):
    """A run config is invalid; the message lists every error with its key path."""


class InputError(FacecorpusError):
    """An input file is unusable; the message names the file and the reason."""


class AssetUnavailableError(FacecorpusError):
    """A model or asset source cannot be reached (offline, no local mirror, no cache)."""
