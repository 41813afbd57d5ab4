"""Loading pickled files a user may have downloaded without running their code.

Upstream info pkls and mmcv checkpoints hold numpy arrays and scalars besides builtins; a pickle
can name any importable callable, so a crafted file runs code on `pickle.load` or
`torch.load(weights_only=False)`. raydrive resolves only the globals these files legitimately
contain (numpy's array/scalar/dtype reconstruction, OrderedDict) and refuses anything else, naming
it. Old checkpoints with other objects load only with an explicit `--trust-checkpoint`.
"""

from __future__ import annotations

import importlib
import pickle
import warnings
from pathlib import Path

from raydrive.config import ConfigError

# numpy moved `core` to `_core` in 2.0; files written with either name appear in the wild
_NUMPY_NAMES = {"_reconstruct", "scalar", "ndarray", "dtype"}
_OTHER = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


def allowed(module: str, name: str) -> bool:
    """Whether a pickle global is one that info pkls and checkpoints legitimately use."""
    if (module, name) in _OTHER:
        return True
    if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in _NUMPY_NAMES:
        return True
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":  # pickle protocol 5
        return True
    return module == "numpy.dtypes" and name.endswith("DType")


def _resolve(module: str, name: str):
    if module.startswith("numpy._core") and not hasattr(importlib.import_module("numpy"), "_core"):
        module = module.replace("numpy._core", "numpy.core")  # a numpy-2 file read with numpy 1
    return getattr(importlib.import_module(module), name)


def _numpy_objects() -> list:
    """Every numpy global `allowed` lets through (torch's static scan does not list the dtype classes
    that arrays' dtypes reduce to)."""
    import numpy as np

    try:
        multiarray, numeric = (importlib.import_module(f"numpy._core.{m}") for m in ("multiarray", "numeric"))
    except ImportError:  # numpy < 1.26
        multiarray, numeric = (importlib.import_module(f"numpy.core.{m}") for m in ("multiarray", "numeric"))
    objs = [multiarray._reconstruct, multiarray.scalar, numeric._frombuffer, np.ndarray, np.dtype]
    return objs + [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if not allowed(module, name):
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: info pkls hold only numpy arrays and builtins"
            )
        return _resolve(module, name)


def load_pickle(f):
    """`pickle.load` that resolves only the globals `allowed` lets through."""
    return RestrictedUnpickler(f).load()


class UnsafeCheckpoint(ConfigError):
    pass


def checkpoint_globals(path: str | Path) -> list:
    """The non-tensor globals a torch checkpoint needs, read without unpickling it; raises
    UnsafeCheckpoint naming any that could run code."""
    import torch

    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # torch's reader on a truncated or foreign file: say so in one line
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConfigError(
            f"{path} cannot be read as a torch checkpoint ({first.split('. ')[0]}): it is truncated or not a .pth "
            f"file; copy or download it again"
        ) from None
    unsafe = [g for g in found if "." in g]
    refused = [g for g in unsafe if not allowed(*g.rsplit(".", 1))]
    if refused:
        raise UnsafeCheckpoint(
            f"{path} needs {', '.join(sorted(refused))} to load, which could run code; if you trust the file, "
            f"pass --trust-checkpoint"
        )
    return [_resolve(*g.rsplit(".", 1)) for g in unsafe]


def torch_load(path: str | Path, trust: bool = False):
    """`torch.load` with `weights_only=True`, letting through numpy's reconstruction globals that mmcv
    checkpoints carry in their meta; other globals need `trust` (full unpickling, with a warning)."""
    import torch

    if trust:
        warnings.warn(f"--trust-checkpoint: {path} is unpickled in full; it can run code", stacklevel=2)
        return torch.load(str(path), map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(checkpoint_globals(path) + _numpy_objects()):
        return torch.load(str(path), map_location="cpu", weights_only=True)
