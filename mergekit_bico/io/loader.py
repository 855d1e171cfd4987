"""Lazy, validated access to the tensors of one model folder.

:class:`LazyModel` indexes a Hugging Face style model folder without reading
tensor data and then hands out one tensor at a time.

Supported layouts, tried in this order:

1. ``model.safetensors``
2. ``model.safetensors.index.json`` (``weight_map`` -> shards)
3. ``pytorch_model.bin``
4. ``pytorch_model.bin.index.json``
5. index-less safetensors shards: accepted only when the folder holds one
   complete, unambiguous set ``<prefix>-NNNNN-of-MMMMM.safetensors`` (all of
   1..M present, one prefix, one M, no tensor name in two shards).  Any other
   collection of ``*.safetensors`` files (e.g. ``adapter_model.safetensors``)
   is not treated as a model.

Safety rules:

* every safetensors header is parsed and validated here before
  ``safetensors`` touches the file (header length, JSON, dtypes, shapes,
  offsets inside the data section, sizes consistent with shape x dtype, no
  overlap, no gap, no trailing bytes), so a corrupt, truncated or lying shard
  gives a one-line :class:`ModelLoadError` naming the shard and the tensor;
* every weight file (index shards and the single-file layouts) must be a
  regular file inside the model folder: absolute names, ``..`` components and
  symlinks resolving outside the folder are refused.  The one exception is a
  Hugging Face hub cache snapshot (``.../snapshots/<rev>/``), whose files are
  symlinks into the sibling ``.../blobs/`` folder;
* ``.bin`` files are only ever opened with ``torch.load(weights_only=True)``;
  a pickle that needs anything beyond plain tensors is refused.

Tensors returned by :meth:`LazyModel.get` are owned by the caller: when no
dtype / device conversion copies them, they are cloned, because the mmap
behind an open shard is shared by every read of that shard and an in-place
edit by one consumer would otherwise be seen by the next.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import struct
import sys
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mergekit_bico.dtypes import TAG_OF, TAGS, name_of, torch, torch_dtype

from mergekit_bico.errors import ModelLoadError, TensorMismatchError

__all__ = ["LazyModel", "SAFETENSORS_DTYPES", "WEIGHT_LAYOUTS"]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_LAYOUTS = (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX)

# safetensors' own limit on the JSON header
_MAX_HEADER_BYTES = 100_000_000

# safetensors dtype tag -> (dtype name, bytes per element): :data:`mergekit_bico.dtypes.TAGS`.
# A tag whose dtype the installed torch lacks is refused when such a tensor is read.
SAFETENSORS_DTYPES = TAGS

# safetensors data is little-endian; preadv is POSIX (no Windows): else the safetensors mmap path
_PREAD = sys.byteorder == "little" and hasattr(os, "preadv")

_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")

# fingerprint sampling
_FP_WINDOW = 64  # bytes per window, 3 windows per safetensors tensor
_FP_BIN_WHOLE = 8 << 20  # .bin files up to this size are hashed whole
_FP_BIN_CHUNKS = 256
_FP_BIN_CHUNK = 4096


@dataclass(frozen=True)
class _TensorInfo:
    file: str  # path relative to the model folder
    dtype_name: str  # "bfloat16", ... (see mergekit_bico.dtypes)
    shape: tuple[int, ...]
    nbytes: int
    begin: int = -1  # absolute byte offset of the data in a safetensors file

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)


@dataclass
class _StFile:
    rel: str
    path: Path
    size: int
    header_len: int
    tensors: "OrderedDict[str, _TensorInfo]"  # in data (file) order


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class LazyModel:
    """Index of one model folder's tensors; reads one tensor at a time (safetensors mmap)."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        raw = Path(path).expanduser()
        if not raw.exists():
            raise ModelLoadError(f"model path '{raw}' does not exist")
        if not raw.is_dir():
            raise ModelLoadError(
                f"model path '{raw}' is not a directory of weights (it is a file)"
            )
        self.path = raw.resolve()
        self._lock = threading.RLock()
        self._info: dict[str, _TensorInfo] = {}
        self._where: dict[str, str] = {}  # tensor -> rel file (all layouts)
        self._order: list[str] = []
        self._files: list[str] = []  # rel weight files, in layout order
        self._st_files: dict[str, _StFile] = {}
        self._handles: dict[str, Any] = {}
        self._fds: dict[str, int] = {}
        self._bin_cache: "OrderedDict[str, dict[str, torch.Tensor]]" = OrderedDict()
        self._bin_loaded: set[str] = set()
        self._bin_keys_known = True
        self._index_file: str | None = None
        self._config: dict | None = None
        self._allowed_roots = [self.path]
        if self.path.parent.name == "snapshots":
            blobs = self.path.parent.parent / "blobs"
            if blobs.is_dir():
                self._allowed_roots.append(blobs.resolve())
        self._detect_layout()

    # ------------------------------------------------------------------ layout
    def _err(self, msg: str) -> ModelLoadError:
        return ModelLoadError(f"model '{self.path}': {msg}")

    def _detect_layout(self) -> None:
        p = self.path
        if (p / SAFE_SINGLE).exists() or (p / SAFE_SINGLE).is_symlink():
            self.layout = "safetensors"
            st = self._add_st_file(self._checked_file(SAFE_SINGLE, None), SAFE_SINGLE)
            for name, info in st.tensors.items():
                self._where[name] = SAFE_SINGLE
                self._order.append(name)
                self._info[name] = info
        elif (p / SAFE_INDEX).is_file():
            self.layout = "safetensors-index"
            self._load_index(SAFE_INDEX, safetensors=True)
        elif (p / BIN_SINGLE).exists() or (p / BIN_SINGLE).is_symlink():
            self.layout = "bin"
            self._checked_file(BIN_SINGLE, None)
            self._files = [BIN_SINGLE]
            self._bin_keys_known = False  # keys come from the pickle itself
        elif (p / BIN_INDEX).is_file():
            self.layout = "bin-index"
            self._load_index(BIN_INDEX, safetensors=False)
        else:
            shards = self._indexless_shards()
            if shards is None:
                raise ModelLoadError(
                    f"model path '{p}' is not a directory of weights (no {SAFE_SINGLE}, "
                    f"{SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
                )
            self.layout = "safetensors-shards"
            for rel in shards:
                st = self._add_st_file(self._checked_file(rel, None), rel)
                for name, info in st.tensors.items():
                    if name in self._where:
                        raise self._err(
                            f"tensor '{name}' appears in both '{self._where[name]}' and "
                            f"'{rel}' and there is no {SAFE_INDEX} to choose; "
                            "the shard set is ambiguous"
                        )
                    self._where[name] = rel
                    self._order.append(name)
                    self._info[name] = info

    def _indexless_shards(self) -> list[str] | None:
        """A complete ``<prefix>-NNNNN-of-MMMMM.safetensors`` set, else None."""
        try:
            names = sorted(
                e.name
                for e in os.scandir(self.path)
                if e.name.endswith(".safetensors") and not e.name.startswith(".")
            )
        except OSError as e:
            raise ModelLoadError(f"cannot list model path '{self.path}': {e.strerror}") from e
        if not names:
            return None
        groups: set[tuple[str, int]] = set()
        seen: set[int] = set()
        for name in names:
            m = _SHARD_RE.match(name)
            if m is None:
                return None  # something that is not part of a shard set
            groups.add((m["prefix"], int(m["n"])))
            seen.add(int(m["i"]))
        if len(groups) != 1:
            return None
        (_prefix, total), = groups
        if total < 1 or seen != set(range(1, total + 1)) or len(names) != total:
            return None
        return names

    def _checked_file(self, rel: str, index: str | None) -> Path:
        """Resolve ``rel`` (from an index or a layout name) to a regular file inside the folder."""
        where = f"index '{index}' names shard '{rel}'" if index else f"weight file '{rel}'"
        if not isinstance(rel, str) or not rel.strip():
            raise self._err(f"{where}: empty or non-string shard name")
        if os.path.isabs(rel) or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
            raise self._err(
                f"{where} with an absolute path; shards must be files inside the model folder"
            )
        parts = re.split(r"[/\\]+", rel)
        if ".." in parts:
            raise self._err(f"{where} outside the model folder ('..' is not allowed)")
        full = self.path / rel
        if not os.path.lexists(full):
            raise self._err(f"{where}, which is missing")
        try:
            real = full.resolve(strict=True)
        except (OSError, RuntimeError):
            raise self._err(f"{where}, which is a broken symlink") from None
        if not any(real == root or root in real.parents for root in self._allowed_roots):
            raise self._err(
                f"{where}, which is a symlink resolving outside the model folder (to '{real}')"
            )
        if not real.is_file():
            raise self._err(f"{where}, which is not a regular file")
        return full

    def _load_index(self, index_rel: str, *, safetensors: bool) -> None:
        self._index_file = index_rel
        ipath = self.path / index_rel
        try:
            data = json.loads(
                ipath.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys
            )
        except OSError as e:
            raise self._err(f"cannot read index '{index_rel}': {e.strerror}") from e
        except (ValueError, UnicodeDecodeError) as e:
            raise self._err(f"index '{index_rel}' is not valid JSON ({_one_line(e)})") from None
        if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
            raise self._err(f"index '{index_rel}' has no 'weight_map' object")
        weight_map: dict = data["weight_map"]
        if not weight_map:
            raise self._err(f"index '{index_rel}' has an empty 'weight_map'")
        checked: dict[str, Path] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise self._err(
                    f"index '{index_rel}' maps tensor '{name}' to a non-string shard ({shard!r})"
                )
            if shard not in checked:
                checked[shard] = self._checked_file(shard, index_rel)
            self._where[name] = shard
            self._order.append(name)
        self._files = list(checked)
        if safetensors:
            for shard, full in checked.items():
                self._add_st_file(full, shard)
            for name, shard in self._where.items():
                st = self._st_files[shard]
                if name not in st.tensors:
                    raise self._err(
                        f"index '{index_rel}' says tensor '{name}' is in shard '{shard}', "
                        "but that shard has no such tensor"
                    )
                self._info[name] = st.tensors[name]

    # ------------------------------------------------------- safetensors header
    def _add_st_file(self, full: Path, rel: str) -> _StFile:
        st = self._read_st_header(rel, full)
        self._st_files[rel] = st
        if rel not in self._files:
            self._files.append(rel)
        return st

    def _read_st_header(self, rel: str, full: Path) -> _StFile:
        pre = f"shard '{rel}'"
        try:
            with open(full, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise self._err(
                        f"{pre} is truncated ({size} bytes, less than the 8-byte header length)"
                    )
                (hlen,) = struct.unpack("<Q", f.read(8))
                if hlen > size - 8:
                    raise self._err(
                        f"{pre} is truncated or not a safetensors file (header length says "
                        f"{hlen} bytes, file has {size - 8} after it)"
                    )
                if hlen > _MAX_HEADER_BYTES:
                    raise self._err(f"{pre} has an implausible header length ({hlen} bytes)")
                if hlen < 2:
                    raise self._err(f"{pre} has an empty header")
                raw = f.read(hlen)
        except OSError as e:
            raise self._err(f"cannot read {pre}: {e.strerror}") from e
        if len(raw) != hlen:
            raise self._err(f"{pre} changed while being read")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except (UnicodeDecodeError, ValueError) as e:
            raise self._err(
                f"{pre} has a corrupt header (not valid JSON: {_one_line(e, 120)})"
            ) from None
        if not isinstance(header, dict):
            raise self._err(f"{pre} has a corrupt header (not a JSON object)")
        meta = header.pop("__metadata__", None)
        if meta is not None and (
            not isinstance(meta, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        ):
            raise self._err(f"{pre} has a corrupt header ('__metadata__' is not str -> str)")
        data_size = size - 8 - hlen
        entries: list[tuple[int, int, str, _TensorInfo]] = []
        for name, ent in header.items():
            tpre = f"{pre}, tensor '{name}'"
            if not isinstance(ent, dict) or set(ent) != {"dtype", "shape", "data_offsets"}:
                raise self._err(
                    f"{tpre}: malformed header entry (need exactly dtype, shape, data_offsets)"
                )
            tag, shape, offs = ent["dtype"], ent["shape"], ent["data_offsets"]
            if not isinstance(tag, str) or tag not in SAFETENSORS_DTYPES:
                raise self._err(f"{tpre}: unknown or unsupported dtype {tag!r}")
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise self._err(f"{tpre}: invalid shape {shape!r}")
            if (
                not isinstance(offs, list)
                or len(offs) != 2
                or not all(_is_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1]
            ):
                raise self._err(f"{tpre}: invalid data_offsets {offs!r}")
            dtype_name, itemsize = TAGS[tag]
            need = math.prod(shape) * itemsize
            begin, end = offs
            if end - begin != need:
                raise self._err(
                    f"{tpre}: data_offsets [{begin}, {end}] span {end - begin} bytes but "
                    f"shape {shape} x {tag} needs {need}"
                )
            info = _TensorInfo(rel, dtype_name, tuple(shape), need, 8 + hlen + begin)
            entries.append((begin, end, name, info))
        entries.sort(key=lambda e: (e[0], e[1]))
        if entries:
            last = max(entries, key=lambda e: e[1])
            if last[1] > data_size:
                raise self._err(
                    f"{pre} is truncated (header says {last[1]} bytes of data, file has "
                    f"{data_size}; tensor '{last[2]}' ends past the end of the file)"
                )
        prev_end, prev_name = 0, None
        for begin, end, name, _ in entries:
            if begin < prev_end:
                raise self._err(
                    f"{pre}: tensors '{prev_name}' and '{name}' overlap (header offsets lie: "
                    f"'{name}' starts at byte {begin}, before byte {prev_end})"
                )
            if begin > prev_end:
                raise self._err(
                    f"{pre}: header offsets lie: gap of {begin - prev_end} "
                    f"bytes before tensor '{name}' (starts at {begin}, previous data ends at "
                    f"{prev_end})"
                )
            prev_end, prev_name = end, name
        if prev_end != data_size:
            raise self._err(
                f"{pre} has {data_size - prev_end} bytes after the last tensor (header says "
                f"{prev_end} bytes of data, file has {data_size}); corrupt or not a safetensors file"
            )
        tensors: OrderedDict[str, _TensorInfo] = OrderedDict((e[2], e[3]) for e in entries)
        return _StFile(rel, full, size, hlen, tensors)

    # ----------------------------------------------------------------- .bin
    def _load_bin(self, rel: str) -> dict[str, torch.Tensor]:
        """Return the (cached) state dict of one .bin file."""
        with self._lock:
            cached = self._bin_cache.get(rel)
            if cached is not None:
                self._bin_cache.move_to_end(rel)
                return cached
            full = self.path / rel
            sd, mmapped = self._torch_load(rel, full)
            if not isinstance(sd, dict):
                raise self._err(
                    f"'{rel}' is not a state dict (unpickled a {type(sd).__name__}, "
                    "expected a dict of tensors)"
                )
            for key, value in sd.items():
                if not isinstance(key, str):
                    raise self._err(f"'{rel}' has a non-string key {key!r}")
                if not isinstance(value, torch.Tensor):
                    raise self._err(
                        f"entry '{key}' in '{rel}' is not a tensor ({type(value).__name__})"
                    )
            if rel not in self._bin_loaded:
                if self._bin_keys_known:  # index layout: the index must be right
                    missing = [k for k, f in self._where.items() if f == rel and k not in sd]
                    if missing:
                        raise self._err(
                            f"index '{self._index_file}' says tensor '{missing[0]}' is in shard "
                            f"'{rel}', but that shard has no such tensor"
                        )
                else:  # single pytorch_model.bin: the pickle defines the keys
                    for key in sd:
                        self._where[key] = rel
                        self._order.append(key)
                    self._bin_keys_known = True
                for key, value in sd.items():
                    if self._where.get(key) == rel:
                        self._info[key] = _TensorInfo(
                            rel, name_of(value.dtype), tuple(value.shape), value.numel() * value.element_size()
                        )
                self._bin_loaded.add(rel)
            self._bin_cache[rel] = sd
            # mmapped files cost only address space; a fully loaded legacy file
            # is kept alone so that at most one of them is resident.
            limit = 64 if mmapped else 1
            while len(self._bin_cache) > limit:
                self._bin_cache.popitem(last=False)
            return sd

    def _torch_load(self, rel: str, full: Path) -> tuple[Any, bool]:
        attempts = (True, False)
        last: Exception | None = None
        for mmap in attempts:
            try:
                with warnings.catch_warnings():
                    # e.g. "Detected pickle protocol 4": problems surface as errors below
                    warnings.simplefilter("ignore", UserWarning)
                    sd = torch.load(full, map_location="cpu", weights_only=True, mmap=mmap)
                return sd, mmap
            except pickle.UnpicklingError as e:
                raise self._err(
                    f"refusing to unpickle '{rel}': not a plain tensor file "
                    f"({_unpickle_reason(e)})"
                ) from None
            except OSError as e:
                raise self._err(f"cannot read '{rel}': {e.strerror or e}") from None
            except Exception as e:  # noqa: BLE001 - torch raises RuntimeError & co
                last = e
                if mmap and "mmap" in str(e):
                    continue  # legacy (non-zip) file: retry without mmap
                break
        raise self._err(f"cannot read '{rel}': {_one_line(last, 200)}")

    def _ensure_keys(self) -> None:
        if not self._bin_keys_known:
            self._load_bin(self._files[0])

    def _meta(self, name: str) -> _TensorInfo:
        info = self._info.get(name)
        if info is not None:
            return info
        self._ensure_keys()
        rel = self._where.get(name)
        if rel is None:
            raise TensorMismatchError(f"model '{self.path}' has no tensor '{name}'")
        self._load_bin(rel)
        return self._info[name]

    # ----------------------------------------------------------------- public
    def keys(self) -> list[str]:
        """Tensor names: index order for index layouts, file order otherwise."""
        self._ensure_keys()
        return list(self._order)

    def __contains__(self, name: object) -> bool:
        self._ensure_keys()
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        self._ensure_keys()
        return len(self._order)

    def files(self) -> list[str]:
        """Weight files (relative to :attr:`path`) in layout order."""
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype of ``name`` (imports torch; :meth:`dtype_name` does not)."""
        info = self._meta(name)
        try:
            return info.dtype
        except KeyError:
            raise self._err(f"tensor '{name}' has dtype {TAG_OF.get(info.dtype_name, info.dtype_name)}, "
                            "which the installed torch does not support") from None

    def dtype_name(self, name: str) -> str:
        """``"bfloat16"``, ``"float32"``, ... of ``name`` (from the header; no torch)."""
        return self._meta(name).dtype_name

    def nbytes(self, name: str) -> int:
        return self._meta(name).nbytes

    def file_of(self, name: str) -> str:
        """The weight file (relative to :attr:`path`) holding ``name``."""
        self._meta(name)
        return self._where[name]

    def get(
        self,
        name: str,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> torch.Tensor:
        """Read one tensor; the result is the caller's own (never aliases a shared mmap)."""
        info = self._meta(name)
        rel = info.file
        if rel in self._st_files:
            if _PREAD:
                # pread into a fresh tensor: one copy from the page cache, nothing mapped, so
                # the process's RSS does not accumulate the inputs' file pages as the merge
                # proceeds; the result is already the caller's own.
                t = self._pread(rel, name, info)
                if (dtype is None or dtype == t.dtype) and torch.device(device).type == "cpu":
                    return t
                try:
                    return t.to(device=device, dtype=dtype)
                except (RuntimeError, TypeError, ValueError) as e:
                    raise self._err(
                        f"cannot convert tensor '{name}' to dtype={dtype} device={device}: "
                        f"{_one_line(e, 200)}"
                    ) from None
            handle = self._handle(rel)
            try:
                t = handle.get_tensor(name)
            except Exception as e:  # noqa: BLE001 - SafetensorError is not exported stably
                raise self._err(
                    f"cannot read tensor '{name}' from shard '{rel}': {_one_line(e, 200)}"
                ) from None
        else:
            t = self._load_bin(rel)[name]
        try:
            out = t.to(device=device, dtype=dtype)
        except (RuntimeError, TypeError, ValueError) as e:
            raise self._err(
                f"cannot convert tensor '{name}' to dtype={dtype} device={device}: "
                f"{_one_line(e, 200)}"
            ) from None
        if out.data_ptr() == t.data_ptr() and out.numel() > 0:
            out = out.clone(memory_format=torch.contiguous_format)
        return out

    def _fd(self, rel: str) -> int:
        """A read-only descriptor of one safetensors shard (size checked against the index)."""
        with self._lock:
            fd = self._fds.get(rel)
            if fd is not None:
                return fd
            st = self._st_files[rel]
            try:
                fd = os.open(st.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                size = os.fstat(fd).st_size
            except OSError as e:
                raise self._err(f"cannot read shard '{rel}': {e.strerror}") from None
            if size != st.size:
                os.close(fd)
                raise self._err(
                    f"shard '{rel}' changed on disk since it was indexed "
                    f"(was {st.size} bytes, now {size})"
                )
            self._fds[rel] = fd
            return fd

    def _pread(self, rel: str, name: str, info: _TensorInfo) -> torch.Tensor:
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        self._pread_into(rel, name, memoryview(buf.numpy()), info.begin)
        return buf.view(self.dtype(name)).reshape(info.shape)

    def _pread_into(self, rel: str, name: str, view: memoryview, offset: int) -> None:
        """Fill the writable byte buffer ``view`` from byte ``offset`` of shard ``rel``."""
        total = view.nbytes
        if not total:
            return
        fd = self._fd(rel)
        view = view.cast("B") if view.format != "B" else view
        done = 0
        while done < total:  # Linux returns at most ~2 GiB per call
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise self._err(
                    f"cannot read tensor '{name}' from shard '{rel}': {e.strerror}"
                ) from None
            if n <= 0:
                raise self._err(
                    f"cannot read tensor '{name}' from shard '{rel}': the file is shorter "
                    "than its header says (truncated while in use?)"
                )
            done += n

    def get_flat(
        self, name: str, start: int, stop: int, *, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Elements ``start:stop`` of the flattened tensor (row-major), as a new 1-D tensor.

        Reads only those bytes (one ``pread``) for safetensors; lets the executor merge a big
        tensor in bounded slices.
        """
        info = self._meta(name)
        numel = math.prod(info.shape)
        if not 0 <= start <= stop <= numel:
            raise ValueError(f"range {start}:{stop} out of bounds for '{name}' ({numel} elements)")
        rel = info.file
        if rel in self._st_files and _PREAD:
            itemsize = info.nbytes // numel if numel else 1
            buf = torch.empty((stop - start) * itemsize, dtype=torch.uint8)
            self._pread_into(rel, name, memoryview(buf.numpy()), info.begin + start * itemsize)
            t = buf.view(self.dtype(name))
        else:
            t = self.get(name).reshape(-1)[start:stop].clone()
        return t if dtype is None or dtype == t.dtype else t.to(dtype)

    def can_read_raw(self, name: str) -> bool:
        """Whether :meth:`read_flat_into` can read ``name`` (a safetensors tensor, POSIX pread)."""
        return _PREAD and self._meta(name).file in self._st_files

    def read_flat_into(self, name: str, start: int, out: Any) -> None:
        """Fill the writable array ``out`` (any buffer, e.g. a numpy array of ``len(out)`` elements
        of the tensor's item size) with elements ``start:start + len(out)`` of the flattened
        tensor, as stored (little-endian bytes; one ``pread``, no torch)."""
        info = self._meta(name)
        numel = math.prod(info.shape)
        view = memoryview(out).cast("B")
        itemsize = info.nbytes // numel if numel else 1
        if view.nbytes % itemsize or not 0 <= start <= start + view.nbytes // itemsize <= numel:
            raise ValueError(f"bad range for '{name}' ({numel} elements of {itemsize} bytes)")
        if not self.can_read_raw(name):
            raise ValueError(f"tensor '{name}' is not in a safetensors shard")
        self._pread_into(info.file, name, view, info.begin + start * itemsize)

    def _handle(self, rel: str) -> Any:
        with self._lock:
            h = self._handles.get(rel)
            if h is not None:
                return h
            st = self._st_files[rel]
            try:
                size = os.stat(st.path).st_size
            except OSError as e:
                raise self._err(f"cannot read shard '{rel}': {e.strerror}") from None
            if size != st.size:
                raise self._err(
                    f"shard '{rel}' changed on disk since it was indexed "
                    f"(was {st.size} bytes, now {size})"
                )
            from safetensors import safe_open

            try:
                h = safe_open(str(st.path), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001
                raise self._err(f"cannot open shard '{rel}': {_one_line(e, 200)}") from None
            self._handles[rel] = h
            return h

    def config_dict(self) -> dict:
        """Parsed ``config.json`` ({} when absent)."""
        if self._config is not None:
            return dict(self._config)
        cfg = self.path / "config.json"
        if not cfg.exists():
            self._config = {}
            return {}
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except OSError as e:
            raise self._err(f"cannot read config.json: {e.strerror}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise self._err(f"config.json is not valid JSON ({_one_line(e, 200)})") from None
        if not isinstance(data, dict):
            raise self._err("config.json is not a JSON object")
        self._config = data
        return dict(data)

    def fingerprint(self) -> str:
        """Stable hex digest of the weights' identity.

        Hashes, per weight file (sorted by relative name): the name, the size,
        for safetensors the raw header plus three 64-byte windows (start,
        middle, end) of every tensor's data, for ``.bin`` the whole file when
        small else 256 evenly spaced 4 KiB chunks; plus the index file and
        ``config.json`` bytes.  Reads a few KiB per tensor, never the full
        data; identical copies of a model in different folders agree; a
        re-saved checkpoint with identical headers (same shapes) is still
        detected through the data windows.
        """
        h = hashlib.sha256(b"mergekit-bico-fingerprint-v1\0")

        def feed(tag: str, data: bytes) -> None:
            h.update(tag.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

        try:
            for extra in (self._index_file, "config.json"):
                if extra and (self.path / extra).is_file():
                    feed(f"file:{extra}", (self.path / extra).read_bytes())
            for rel in sorted(self._files):
                full = self.path / rel
                with open(full, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    feed(f"weights:{rel}", size.to_bytes(8, "little"))
                    st = self._st_files.get(rel)
                    if st is not None:
                        f.seek(0)
                        feed("header", f.read(8 + st.header_len))
                        for name, info in st.tensors.items():
                            for off, n in _windows(info.nbytes):
                                f.seek(info.begin + off)
                                feed(name, f.read(n))
                    elif size <= _FP_BIN_WHOLE:
                        feed("data", f.read())
                    else:
                        step = (size - _FP_BIN_CHUNK) // (_FP_BIN_CHUNKS - 1)
                        for i in range(_FP_BIN_CHUNKS):
                            f.seek(i * step)
                            feed("chunk", f.read(_FP_BIN_CHUNK))
        except OSError as e:
            raise self._err(f"cannot read weights for fingerprint: {e.strerror}") from None
        return h.hexdigest()

    def close(self) -> None:
        """Drop open mmaps and cached .bin state dicts (the index stays usable)."""
        with self._lock:
            for h in self._handles.values():
                exit_ = getattr(h, "__exit__", None)
                if exit_ is not None:
                    try:
                        exit_(None, None, None)
                    except Exception:  # noqa: BLE001
                        pass
            self._handles.clear()
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()
            self._bin_cache.clear()

    def __enter__(self) -> "LazyModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LazyModel({str(self.path)!r}, layout={self.layout!r})"


def _windows(nbytes: int) -> list[tuple[int, int]]:
    w = _FP_WINDOW
    if nbytes <= 3 * w:
        return [(0, nbytes)]
    mid = nbytes // 2 - w // 2
    return [(0, w), (mid, w), (nbytes - w, w)]


def _unpickle_reason(e: Exception) -> str:
    """The informative part of torch's multi-paragraph weights_only error."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    reason = ""
    m = re.search(r"WeightsUnpickler error:[ \t]*(.*?)\s*(?:\n|$)", text)
    if m:
        reason = m.group(1)
        if not reason:  # the reason is on the next non-empty line
            rest = [ln.strip() for ln in text[m.end():].splitlines() if ln.strip()]
            reason = rest[0] if rest else ""
    if not reason:
        m = re.search(r"[^\n]*(?:GLOBAL|Unsupported)[^\n]*", text)
        reason = m.group(0).strip() if m else ""
    reason = re.split(r"\.\s", reason, maxsplit=1)[0].rstrip(".")
    return _one_line(reason, 160) if reason else "weights_only=True refused it"
