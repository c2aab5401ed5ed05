"""Read a pickle without running anything from it.

A pickle names classes and functions by module and name and asks the reader to import and call
them: that is how the LEGO authors' snapshots rebuild their networks, by executing the module
source they embed. :class:`InertUnpickler` answers every such name with an inert stand-in instead:

- tensors are rebuilt from their storages' bytes by torch's own restricted loader
  (``torch.load(..., weights_only=True)``), never by the file's code;
- ``collections.OrderedDict`` becomes a plain dict subclass (dicts keep insertion order);
- any other name (the persistence hook with its embedded source, timm and torch layers, the
  authors' classes, ``os.system``, ``builtins.exec`` ...) becomes a :class:`Record`: a fresh class
  that only stores the arguments and state it is given.

Nothing is imported by name, no attribute of a real object is set from the file, nothing runs.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lego_export.errors import LegoError


class Record:
    """An inert stand-in for an object of a class (or a call of a function) that the file names.

    ``module`` and ``name`` say what the file asked for; ``args`` holds the arguments it would have
    been called with, ``state`` what it would have been given to restore (usually its ``__dict__``).
    """

    module = ""
    name = ""
    args: tuple
    kwargs: dict
    state: object

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs) -> None:
        pass  # everything was kept by __new__ (pickle's NEWOBJ calls only __new__, REDUCE both)

    def __setstate__(self, state) -> None:
        self.state = state

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


class PickledDict(dict):
    """What an ``OrderedDict`` in the file becomes: a dict that keeps any state it is given inert."""

    def __setstate__(self, state) -> None:
        self.pickled_state = state


class StorageRef(Record):
    """A tensor storage rebuilt from its bytes by torch's restricted loader."""

    module, name = "torch.storage", "_load_from_bytes"
    untyped: Any  # torch.UntypedStorage
    dtype: Any  # torch.dtype


class TensorRef(Record):
    """A tensor rebuilt from a storage; the tensor itself sits in ``tensor``, out of the file's reach."""

    module, name = "torch._utils", "_rebuild_tensor_v2"
    tensor: Any  # torch.Tensor


class PersistentRef(Record):
    """What a persistent id (the file's reference to data kept outside the pickle) becomes."""

    module, name = "pickle", "persistent_id"


def _load_storage(data) -> StorageRef:
    """torch.storage._load_from_bytes, through torch's weights-only unpickler."""
    if not isinstance(data, bytes | bytearray):
        raise LegoError("a tensor storage is not stored as bytes")
    try:
        with warnings.catch_warnings():  # its notes on pickle protocols would break the one-line report
            warnings.simplefilter("ignore")
            storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except Exception as e:  # torch's restricted loader refuses anything but plain storages
        raise LegoError(f"a tensor storage could not be read safely ({_first_line(e)})") from None
    ref = StorageRef()
    if isinstance(storage, torch.TypedStorage):
        ref.untyped, ref.dtype = storage._untyped_storage, storage.dtype
    elif isinstance(storage, torch.UntypedStorage):
        ref.untyped, ref.dtype = storage, torch.uint8
    else:
        raise LegoError(f"a tensor storage holds a {type(storage).__name__}, not a storage")
    return ref


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 with every argument checked; the hooks and metadata are dropped."""
    if not isinstance(storage, StorageRef):
        raise LegoError(f"a tensor is built on {storage!r}, not on a storage")
    if not (_ints(size) and _ints(stride) and len(size) == len(stride) and isinstance(offset, int)):
        raise LegoError("a tensor has a malformed size, stride or offset")
    numel = storage.untyped.nbytes() // storage.dtype.itemsize
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if offset < 0 or any(s < 0 for s in stride) or (all(n > 0 for n in size) and last >= numel):
        raise LegoError("a tensor reaches outside its storage")
    tensor = torch.empty(0, dtype=storage.dtype).set_(storage.untyped, offset, tuple(size), tuple(stride))
    ref = TensorRef()
    ref.tensor = tensor.detach().clone()
    return ref


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """torch._utils._rebuild_parameter(_with_state): a parameter is just its tensor here."""
    if not isinstance(data, TensorRef):
        raise LegoError(f"a parameter holds {data!r}, not a tensor")
    return data


def _ints(values) -> bool:
    return isinstance(values, tuple | list) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


class _Rebuilder:
    """One of the rebuilders above as the file sees it: callable, but closed to pickle's BUILD, which
    would otherwise let the file set attributes (``__defaults__`` ...) of the function itself."""

    __slots__ = ("_fn",)
    _fn: Callable

    def __init__(self, fn) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args):
        return self._fn(*args)

    def __setstate__(self, state) -> None:
        raise LegoError("the file tries to change how tensors are rebuilt")


_KNOWN = {
    ("collections", "OrderedDict"): PickledDict,
    ("torch.storage", "_load_from_bytes"): _Rebuilder(_load_storage),
    ("torch._utils", "_rebuild_tensor_v2"): _Rebuilder(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Rebuilder(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Rebuilder(_rebuild_parameter),
}


class InertUnpickler(pickle.Unpickler):
    """A pickle reader whose every global is a data rebuilder of ours or an inert :class:`Record`."""

    def __init__(self, file) -> None:
        super().__init__(file)
        self._records: dict[tuple[str, str], type[Record]] = {}

    def find_class(self, module: str, name: str):
        known = _KNOWN.get((module, name))
        if known is not None:
            return known
        key = (str(module), str(name))
        if key not in self._records:
            # A new class per name, so that pickle's NEWOBJ (which needs a class) works, and so
            # that what the file asked for stays readable; it inherits only Record's behaviour.
            self._records[key] = type("Record", (Record,), {"module": key[0], "name": key[1]})
        return self._records[key]

    def persistent_load(self, pid) -> PersistentRef:
        return PersistentRef(pid)


def load_inert(path: str | Path):
    """Unpickle a file into plain containers, tensors and inert records; one-line LegoError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise LegoError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
        if head.startswith(b"PK"):
            raise LegoError(f"{path} is a zip archive (torch.save?), not a network-snapshot pickle")
        f.seek(0)
        try:
            return InertUnpickler(f).load()
        except LegoError as e:
            raise LegoError(f"{path}: {e}") from None
        except Exception as e:  # any malformed stream: a truncated file, a wrong opcode, bad arguments
            raise LegoError(f"{path} is not a readable pickle ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
