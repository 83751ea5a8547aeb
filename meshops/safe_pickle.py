"""A restricted unpickler for model files that only exist as pickles (FLAME, 3DDFA).

``pickle.load`` runs whatever callables a file names. This unpickler resolves only:

- numpy array/dtype/scalar reconstruction (``numpy.core.multiarray._reconstruct``,
  ``numpy.ndarray``, ``numpy.dtype``, ``numpy.core.multiarray.scalar`` and their
  ``numpy._core`` spellings);
- plain containers (``set``, ``frozenset``, ``collections.OrderedDict``), ``slice``, ``complex``;
- chumpy ``Ch`` objects and scipy sparse matrices, mapped to inert stand-ins that only keep
  their pickled state (FLAME files hold ``chumpy.ch.Ch`` arrays; chumpy is not imported).

Every other global (``os.system``, ``builtins.eval``, ``subprocess.Popen`` ...) is refused
with :class:`RefusedPickleError` before anything is called.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from typing import Any

import numpy as np


class RefusedPickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list."""


class PickledState:
    """An inert stand-in for a foreign object (chumpy array, scipy sparse matrix):
    it records the class name and the pickled state; nothing of the class runs."""

    qualname = "?"
    state: Any = None

    def __new__(cls, *args, **kwargs):  # arguments from the pickle are ignored: inert
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<PickledState {self.qualname}>"

    def array(self) -> np.ndarray | None:
        """The array this object stood for, if its state holds one (chumpy keeps it in 'x')."""
        st = self.state
        if isinstance(st, tuple) and len(st) == 2 and isinstance(st[1], dict):
            st = st[1]  # (None, dict) slot-state pairs
        if isinstance(st, dict):
            x = st.get("x")
            if isinstance(x, np.ndarray):
                return x
            if isinstance(x, PickledState):
                return x.array()
            # scipy sparse: data/indices/indptr/_shape -> dense
            if {"data", "indices", "indptr"} <= set(st) and ("_shape" in st or "shape" in st):
                shape = st.get("_shape", st.get("shape"))
                return _csc_or_csr_to_dense(st, shape)
        return None


def _csc_or_csr_to_dense(st: dict, shape) -> np.ndarray | None:
    try:
        data, indices, indptr = (np.asarray(st[k]) for k in ("data", "indices", "indptr"))
        rows, cols = int(shape[0]), int(shape[1])
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    out = np.zeros((rows, cols), dtype=data.dtype)
    csc = len(indptr) == cols + 1
    for j in range(len(indptr) - 1):
        sl = slice(int(indptr[j]), int(indptr[j + 1]))
        if csc:
            out[indices[sl], j] = data[sl]
        else:
            out[j, indices[sl]] = data[sl]
    return out


def _stand_in_class(qualname: str) -> type:
    """A fresh subclass per foreign class name, so isinstance checks stay meaningful."""
    return type("PickledState_" + qualname.replace(".", "_"), (PickledState,),
                {"qualname": qualname})


def _safe_reconstructor(cls, base, state):
    """``copyreg._reconstructor`` restricted to our stand-ins built on ``object``."""
    if not (isinstance(cls, type) and issubclass(cls, PickledState)) or base is not object:
        raise RefusedPickleError(f"refused object reconstruction of {cls!r}")
    return cls()


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2
        from numpy._core import multiarray as ma
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray as ma
    reconstruct, scalar = ma._reconstruct, ma.scalar
    out = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = reconstruct
        out[(mod, "scalar")] = scalar
    for mod in ("numpy", "numpy.core.numeric", "numpy._core.numeric"):
        out[(mod, "ndarray")] = np.ndarray
        out[(mod, "dtype")] = np.dtype
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    out[("numpy.core.numeric", "_frombuffer")] = _frombuffer
    out[("numpy._core.numeric", "_frombuffer")] = _frombuffer
    return out


def _frombuffer(buf, dtype, shape, order):
    """numpy's protocol-5 array reconstructor, re-implemented without object dtypes."""
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise RefusedPickleError("refused object-dtype buffer")
    return np.frombuffer(buf, dtype=dt).reshape(shape, order=order)


def _codecs_encode(text, encoding="utf-8"):
    """Protocol-2 pickles spell bytes as ``_codecs.encode(str, 'latin1')``: allow only that."""
    if not isinstance(text, str) or str(encoding).lower().replace("-", "") not in (
            "latin1", "iso88591", "utf8", "ascii"):
        raise RefusedPickleError("refused _codecs.encode call")
    return text.encode(encoding)


_PLAIN = {
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice, ("builtins", "complex"): complex,
    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,
    ("__builtin__", "slice"): slice, ("__builtin__", "complex"): complex,
    ("collections", "OrderedDict"): OrderedDict,
    ("copy_reg", "_reconstructor"): _safe_reconstructor,
    ("copyreg", "_reconstructor"): _safe_reconstructor,
}

# Foreign classes whose pickled state is kept as data (never imported, never called).
_STAND_IN_PREFIXES = ("chumpy.", "scipy.sparse.")


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only resolves the allow-list above."""

    _numpy = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._numpy is None:
            RestrictedUnpickler._numpy = _numpy_globals()
        key = (module, name)
        if key in RestrictedUnpickler._numpy:
            return RestrictedUnpickler._numpy[key]
        if key in _PLAIN:
            return _PLAIN[key]
        if module.startswith(_STAND_IN_PREFIXES) and name[:1].isupper():
            return _stand_in_class(f"{module}.{name}")
        raise RefusedPickleError(f"refused global '{module}.{name}'")


def safe_loads(data: bytes, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (latin1 reads Python 2 pickles)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def safe_load(path, encoding: str = "latin1") -> Any:
    with open(path, "rb") as fh:
        return RestrictedUnpickler(fh, encoding=encoding).load()


def to_array(obj) -> np.ndarray | None:
    """An ndarray from a plain array or a stand-in that holds one; None otherwise."""
    if isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, PickledState):
        return obj.array()
    return None


__all__ = ["PickledState", "RefusedPickleError", "RestrictedUnpickler", "safe_load",
           "safe_loads", "to_array"]
