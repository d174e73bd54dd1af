"""Look inside a ``torch.save`` file without torch and without running or allocating what it declares.

:func:`inspect_checkpoint` reads the archive's table of contents and its pickle with a restricted
unpickler that imports nothing (every class or function the pickle names becomes an inert stand-in),
so it is safe on hostile files and cheap on large ones (the tensor data is never read). It returns the
tensors' declared shapes and sizes, the top-level keys, and the stored ``config`` (our own format), and it
refuses, before anything large is allocated:

* zip archives whose members expand beyond the file's own size (``torch.save`` stores members
  uncompressed, so a larger expansion is a zip bomb);
* pickles larger than :data:`MAX_PICKLE_BYTES`;
* storages whose declared size does not match the bytes the file actually holds for them, and tensors
  that claim more elements than their storage has (a few-kB file must not make the loader allocate GB).

:func:`sam_state_dict_problem` says whether the summary holds a SAM-Med3D-family state dict; the download
code uses it before it trusts a file that has no published checksum (a captive-portal HTML page is not
a checkpoint). This module is also used by ``models/checkpoint.py`` before ``torch.load``.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ..core.units import fmt_bytes

#: Largest pickle (``data.pkl`` of a zip checkpoint, or the object part of a legacy file) we parse.
MAX_PICKLE_BYTES = 64 << 20
#: Members of a zip checkpoint may expand to at most the file size plus this (directory, alignment).
ZIP_EXPANSION_SLACK = 1 << 20
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
#: Top-level parts every SAM-Med3D-family state dict has.
SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")

#: The ``format`` tags of the files this project writes (the one place they are defined): a whole model
#: (``save_checkpoint``, ``sam3d train``), the trained tensors of a parameter-efficient fine-tune alone, and
#: an exported image encoder alone.
FULL_FORMAT = "sam3dsegment-checkpoint/1"
PARTIAL_FORMAT = "sam3dsegment-partial/1"
ENCODER_FORMAT = "sam3dsegment-image-encoder/1"

#: Bytes per element of the storage classes ``torch.save`` names in its pickle.
ELEMENT_SIZES = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexDoubleStorage": 16, "ComplexFloatStorage": 8, "QInt8Storage": 1, "QUInt8Storage": 1,
    "QInt32Storage": 4, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1, "UntypedStorage": 1,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the problem and the fix."""


# ------------------------------------------------------------------------------------ restricted unpickler
class _Stub:
    """Stand-in for any object the pickle builds by calling a named class or function."""

    _module = "?"
    _name = "?"

    def __new__(cls, *args, **kwargs):  # REDUCE calls the class, NEWOBJ only __new__: set up in both
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        obj.items = {}
        obj.list = []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.list.append(value)

    def extend(self, values):
        self.list.extend(values)

    @classmethod
    def qualname(cls) -> str:
        return f"{cls._module}.{cls._name}"


@dataclass
class StorageInfo:
    key: str
    type_name: str
    numel: int
    element_size: int
    location: str

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_size


@dataclass
class TensorInfo:
    shape: Tuple[int, ...]
    storage: StorageInfo
    offset: int
    stride: Tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class _Unpickler(pickle.Unpickler):
    """Builds a tree of plain containers and :class:`_Stub` objects; imports and calls nothing real."""

    _SAFE = {("collections", "OrderedDict"): collections.OrderedDict}

    def __init__(self, stream):
        super().__init__(stream)
        self.storages: Dict[str, StorageInfo] = {}
        self._classes: Dict[Tuple[str, str], type] = {}

    def find_class(self, module, name):
        if (module, name) in self._SAFE:
            return self._SAFE[(module, name)]
        key = (str(module), str(name))
        if key not in self._classes:
            self._classes[key] = type(f"Stub_{name}", (_Stub,), {"_module": key[0], "_name": key[1]})
        return self._classes[key]

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] not in ("storage", b"storage"):
            raise CheckpointError(f"unexpected persistent id {str(pid)[:80]!r}")
        storage_type, key, location, numel = pid[1:5]
        type_name = getattr(storage_type, "_name", None)
        if type_name not in ELEMENT_SIZES:
            raise CheckpointError(f"unknown storage type {type_name!r}")
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"storage {key!r} declares an invalid size {numel!r}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        info = StorageInfo(key, type_name, numel, ELEMENT_SIZES[type_name], str(location))
        previous = self.storages.setdefault(key, info)
        if previous.nbytes != info.nbytes:
            raise CheckpointError(f"storage {key!r} is declared twice with different sizes")
        return previous


def strip_wrapper_prefixes(state: Mapping) -> Tuple[dict, List[str]]:
    """``state`` without the wrapper prefixes all its keys carry (repeatedly: ``module._orig_mod.`` goes too),
    and the prefixes removed, in order."""
    out, removed = dict(state), []
    while out and (prefix := next((p for p in WRAPPER_PREFIXES if all(str(k).startswith(p) for k in out)), None)):
        out = {str(k)[len(prefix):]: v for k, v in out.items()}
        removed.append(prefix)
    return out, removed


def _unpickle(data: bytes) -> Tuple[Any, Dict[str, StorageInfo]]:
    up = _Unpickler(io.BytesIO(data))
    obj = up.load()
    return obj, up.storages


def _as_tensor(obj: Any) -> Optional[TensorInfo]:
    """The tensor a rebuilt stub stands for, or None."""
    if not isinstance(obj, _Stub):
        return None
    name = obj._name
    args = obj.args
    if name in ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_tensor_v3") and len(args) >= 4 \
            and isinstance(args[0], StorageInfo):
        try:
            shape = tuple(int(s) for s in args[2])
            stride = tuple(int(s) for s in args[3])
            offset = int(args[1])
        except (TypeError, ValueError):
            raise CheckpointError("a tensor record has a malformed shape") from None
        if len(shape) != len(stride) or any(s < 0 for s in shape) or offset < 0:
            raise CheckpointError("a tensor record has a malformed shape")
        return TensorInfo(shape, args[0], offset, stride)
    if name == "_rebuild_parameter" and args:
        return _as_tensor(args[0])
    if name == "_rebuild_parameter_with_state" and args:
        return _as_tensor(args[0])
    if name == "_rebuild_from_type_v2" and len(args) >= 3 and isinstance(args[2], tuple) and isinstance(args[0], type) \
            and issubclass(args[0], _Stub):
        return _as_tensor(args[0](*args[2]))
    return None


# ------------------------------------------------------------------------------------------- summary
@dataclass
class CheckpointSummary:
    path: Path
    kind: str  # "zip" | "legacy"
    file_size: int
    root: Any
    storages: Dict[str, StorageInfo] = field(default_factory=dict)

    @property
    def top_keys(self) -> List[str]:
        return [str(k) for k in self.root] if isinstance(self.root, Mapping) else []

    def state_dict(self) -> Dict[str, TensorInfo]:
        """The weights mapping (top level or under ``model_state_dict``/``state_dict``/``model``), with
        ``module.`` / ``_orig_mod.`` prefixes stripped; empty when there is none."""
        sd: Any = self.root
        if isinstance(self.root, Mapping):
            for key in STATE_DICT_KEYS:
                inner = self.root.get(key)
                if isinstance(inner, Mapping) and inner and all(_as_tensor(v) for v in inner.values()):
                    sd = inner
                    break
        if not isinstance(sd, Mapping) or not sd:
            return {}
        tensors = {str(k): _as_tensor(v) for k, v in sd.items()}
        if not all(tensors.values()):
            return {}
        return strip_wrapper_prefixes(tensors)[0]  # type: ignore[return-value]

    def config(self) -> Optional[dict]:
        cfg = self.root.get("config") if isinstance(self.root, Mapping) else None
        return dict(cfg) if isinstance(cfg, Mapping) else None

    @property
    def storage_bytes(self) -> int:
        return sum(s.nbytes for s in self.storages.values())


def sam_state_dict_problem(summary: CheckpointSummary) -> Optional[str]:
    """None when ``summary`` holds a SAM-Med3D-family state dict, else what is wrong (one phrase)."""
    if isinstance(summary.root, Mapping) and summary.root.get("format") in (PARTIAL_FORMAT, ENCODER_FORMAT):
        return f"it is a partial training file ({summary.root.get('format')}), not a whole model"
    sd = summary.state_dict()
    if not sd:
        return (f"it holds no model weights (top-level: {summary.top_keys[:10] or type(summary.root).__name__}); "
                f"expected a state dict or one under {list(STATE_DICT_KEYS)}")
    absent = [p.rstrip(".") for p in SAM_PARTS if not any(k.startswith(p) for k in sd)]
    if absent:
        return (f"its {len(sd)} tensors lack the SAM-Med3D parts {absent} (first keys: "
                f"{list(sd)[:3]}); it is not a SAM-Med3D-family model")
    return None


def _check_tensors(root: Any, where: str) -> None:
    """Every tensor must fit inside its storage (no view claiming more elements than were saved)."""
    stack = [root]
    seen = 0
    while stack:
        obj = stack.pop()
        seen += 1
        if seen > 5_000_000:
            raise CheckpointError(f"{where}: the pickle holds too many objects")
        t = _as_tensor(obj)
        if t is not None:
            if t.numel:
                extent = t.offset + 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride))
                if any(st < 0 for st in t.stride) or extent > t.storage.numel or \
                        t.numel * t.storage.element_size > t.storage.nbytes:
                    raise CheckpointError(
                        f"{where}: a tensor of shape {list(t.shape)} claims more elements than its storage "
                        f"{t.storage.key!r} holds ({t.storage.numel}); the file is corrupt or crafted")
            continue
        if isinstance(obj, Mapping):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, _Stub):
            stack.extend(obj.args)
            stack.extend(obj.items.values())
            stack.extend(obj.list)
            if obj.state is not None:
                stack.append(obj.state)


def inspect_checkpoint(path: Union[str, Path]) -> CheckpointSummary:
    """Parse ``path`` as a ``torch.save`` file (zip or legacy) without torch; raise :class:`CheckpointError`
    on anything that is not one, or that declares more data than it holds."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if head.startswith(b"PK"):
        summary = _inspect_zip(path, size)
    elif head[:1] == b"\x80":
        summary = _inspect_legacy(path, size)
    else:
        preview = head.decode("latin-1")
        hint = " It looks like an HTML page (a failed download, captive portal or login page?)." \
            if preview.lstrip().lower().startswith(("<!doc", "<html", "<head", "<?xml")) else ""
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it starts with {preview!r}).{hint}")
    _check_tensors(summary.root, str(path))
    return summary


def _inspect_zip(path: Path, size: int) -> CheckpointSummary:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            expanded = sum(i.file_size for i in infos)
            if expanded > size + ZIP_EXPANSION_SLACK:
                raise CheckpointError(
                    f"checkpoint {path} expands to {fmt_bytes(expanded)} from {fmt_bytes(size)} on disk; "
                    "torch.save writes uncompressed archives, so this is a zip bomb or not a torch.save file. "
                    "Refusing to load it; use the original checkpoint file")
            pkls = [i for i in infos if i.filename.endswith("data.pkl") and i.filename.count("/") == 1]
            if len(pkls) != 1:
                raise CheckpointError(f"{path} is a zip archive but not a torch.save checkpoint (no single "
                                      "<name>/data.pkl inside)")
            pkl = pkls[0]
            if pkl.file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(f"{path}: its object pickle is {fmt_bytes(pkl.file_size)} (limit "
                                      f"{fmt_bytes(MAX_PICKLE_BYTES)}); not a model checkpoint")
            prefix = pkl.filename[: -len("data.pkl")]
            records = {i.filename: i.file_size for i in infos}
            try:
                root, storages = _unpickle(zf.read(pkl))
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: {exc}") from None
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({exc}; {size} bytes on disk). "
                              "Download it again (an interrupted download leaves a partial file).") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, RecursionError, MemoryError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (its pickle cannot be read: "
                              f"{type(exc).__name__}). Download it again.") from None
    for s in storages.values():
        stored = records.get(f"{prefix}data/{s.key}")
        if stored is None:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: storage {s.key!r} is missing. "
                                  "Download it again.")
        if stored != s.nbytes:
            raise CheckpointError(
                f"checkpoint {path} declares {fmt_bytes(s.nbytes)} for storage {s.key!r} but stores "
                f"{fmt_bytes(stored)}; the file is corrupt or crafted. Refusing to allocate it")
    return CheckpointSummary(path, "zip", size, root, storages)


def _inspect_legacy(path: Path, size: int) -> CheckpointSummary:
    """Legacy ``torch.save`` stream: magic, protocol, sys-info and object pickles, key list, raw storages."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint ({why}). Download it "
                               "again, or pass a .pth file of a SAM-Med3D model.")

    with open(path, "rb") as f:
        def load_small(limit: int) -> Any:
            start = f.tell()
            chunk = f.read(limit + 1)
            bio = io.BytesIO(chunk)
            up = _Unpickler(bio)
            obj = up.load()
            f.seek(start + bio.tell())
            return obj, up.storages

        try:
            magic, _ = load_small(1024)
            if magic != _LEGACY_MAGIC:
                raise bad("it is a pickle, not a torch.save file")
            load_small(1024)  # protocol version
            load_small(1 << 16)  # sys info
            root, storages = load_small(MAX_PICKLE_BYTES)
            keys, _ = load_small(MAX_PICKLE_BYTES)
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                struct.error, RecursionError, MemoryError) as exc:
            raise bad(f"its pickle cannot be read: {type(exc).__name__}") from None
        if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
            raise bad("its storage list does not match its tensors")
        for key in keys:
            s = storages[str(key)]
            header = f.read(8)
            if len(header) != 8:
                raise bad(f"storage {key!r} is missing; the file is truncated")
            (count,) = struct.unpack("<q", header)
            remaining = size - f.tell()
            if count != s.numel or s.nbytes > remaining:
                raise CheckpointError(
                    f"checkpoint {path} declares {fmt_bytes(s.nbytes)} for storage {key!r} but holds "
                    f"{fmt_bytes(max(0, min(count * s.element_size, remaining)))} for it; the file is truncated, "
                    "corrupt or crafted. Refusing to allocate it")
            f.seek(s.nbytes, io.SEEK_CUR)
    return CheckpointSummary(path, "legacy", size, root, storages)
