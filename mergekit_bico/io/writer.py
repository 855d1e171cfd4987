"""Streaming safetensors writer and an atomic output folder.

* :class:`ShardedWriter` buffers at most one shard's tensors and writes
  ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` plus
  ``model.safetensors.index.json`` the way ``transformers`` does.
* :func:`atomic_output_dir` builds the output in ``.<name>.partial-<pid>-<rand>``
  next to OUT and renames it into place only when everything succeeded, so
  OUT is either the complete new model, the untouched old one, or absent.
* :func:`copy_support_files` copies config / tokenizer files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from mergekit_bico.dtypes import TAG_OF, itemsize as _itemsize, name_of, torch

from mergekit_bico.errors import ConfigError, ModelLoadError, OutputError

__all__ = [
    "parse_size",
    "ShardedWriter",
    "StreamingShardedWriter",
    "atomic_output_dir",
    "check_output_dir",
    "cleanup_stale_partials",
    "copy_support_files",
    "support_files",
    "CONFIG_FILES",
    "TOKENIZER_FILES",
]

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
)

# errno values that mean "the output side cannot be written"
_WRITE_ERRNOS = {
    errno.ENOSPC,
    errno.EROFS,
    errno.EFBIG,
    getattr(errno, "EDQUOT", errno.ENOSPC),
}

# --------------------------------------------------------------------- sizes
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"5G"`` -> 5 * 1024**3.

    Units K/M/G/T (also KB/MB/GB/TB, KiB/MiB/GiB/TiB, case-insensitive) are
    powers of 1024; a bare number (or ``"123B"``) is bytes.  Fractions are
    allowed with a unit (``"1.5G"``) and rounded down to whole bytes.
    """
    if isinstance(text, bool):
        raise ConfigError(f"invalid size {text!r}: expected e.g. 5G, 500M, 100K or a byte count")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"invalid size {text!r}: must not be negative")
        return text
    if isinstance(text, float):
        if not text >= 0 or text != text or text == float("inf"):
            raise ConfigError(f"invalid size {text!r}: must be a finite non-negative number")
        return int(text)
    if not isinstance(text, str):
        raise ConfigError(f"invalid size {text!r}: expected e.g. 5G, 500M, 100K or a byte count")
    m = _SIZE_RE.match(text)
    if m is None:
        raise ConfigError(
            f"invalid size {text!r}: expected a number with an optional unit "
            "K, M, G, T (KB/KiB/... too), e.g. 5G, 500M, 1.5G"
        )
    number, unit, suffix = m.group(1), m.group(2).upper(), (m.group(3) or "").upper()
    if suffix == "IB" and not unit:
        raise ConfigError(f"invalid size {text!r}: 'iB' needs a unit (KiB, MiB, GiB, TiB)")
    mult = 1024 ** _UNITS[unit]
    if "." in number:
        if not unit:
            raise ConfigError(f"invalid size {text!r}: a byte count must be a whole number")
        # exact decimal arithmetic: "1.5G" is exactly 1.5 * 2**30
        whole, _, frac = number.partition(".")
        value = int(whole or "0") * mult + (int(frac or "0") * mult) // (10 ** len(frac or ""))
        return value
    return int(number) * mult


# -------------------------------------------------------------------- writer
def _write_error(where: Path, e: BaseException) -> OutputError:
    """One-line OutputError for a failed write (OSError or safetensors' error)."""
    if isinstance(e, OSError):
        reason = e.strerror or str(e)
    else:
        text = str(e)
        code = re.search(r"os error (\d+)", text)
        if code:
            reason = os.strerror(int(code.group(1)))
        elif "No space left" in text or "StorageFull" in text:
            reason = os.strerror(errno.ENOSPC)
        elif "PermissionDenied" in text or "Permission denied" in text:
            reason = os.strerror(errno.EACCES)
        elif "ReadOnlyFilesystem" in text or "Read-only file system" in text:
            reason = os.strerror(errno.EROFS)
        else:
            reason = " ".join(text.split())[:200]
    return OutputError(f"cannot write output folder '{where}': {reason}")


def _writer_args(out_dir: Path, max_shard_bytes: int, metadata: dict[str, str] | None) -> tuple[Path, int, dict[str, str]]:
    """Checked (out_dir, max_shard_bytes, safetensors metadata with format=pt) of a shard writer."""
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int):
        raise ConfigError(f"max shard size must be an integer byte count, got {max_shard_bytes!r}")
    if max_shard_bytes <= 0:
        raise ConfigError(f"max shard size must be positive, got {max_shard_bytes}")
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise OutputError(f"cannot write output folder '{out_dir}': not a directory")
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ConfigError(f"safetensors metadata must be str -> str, got {k!r}: {v!r}")
        meta[k] = v
    meta["format"] = "pt"
    return out_dir, max_shard_bytes, meta


def _finalize_shards(out_dir: Path, shards: list[tuple[Path, list[str]]], total_parameters: int, total_size: int) -> dict[str, str]:
    """Rename finished temp shards to ``model[-i-of-n].safetensors``, write the index when there
    are several (fsynced, atomically); return the sorted weight_map."""
    n = len(shards)
    weight_map: dict[str, str] = {}
    try:
        for i, (tmp, names) in enumerate(shards, start=1):
            final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, out_dir / final)
            for name in names:
                weight_map[name] = final
        if n > 1:
            index = {
                "metadata": {"total_parameters": total_parameters, "total_size": total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            tmp_index = out_dir / ".model.safetensors.index.json.tmp"
            with open(tmp_index, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_index, out_dir / "model.safetensors.index.json")
    except OSError as e:
        raise _write_error(out_dir, e) from e
    return dict(sorted(weight_map.items()))


class ShardedWriter:
    """Streams tensors into safetensors shards of at most max_shard_bytes (a single tensor bigger than that gets its own shard).

    Shard size counts tensor bytes (safetensors headers add a little).  The
    writer keeps references to the buffered tensors until their shard is
    written: a contiguous CPU tensor that owns its whole storage is kept as
    is (no copy), so the caller must not modify it in place after ``add``;
    GPU tensors, non-contiguous tensors, views into bigger buffers and a
    second name for a storage already buffered are copied.
    """

    def __init__(
        self,
        out_dir: Path,
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.out_dir, self.max_shard_bytes, self.metadata = _writer_args(out_dir, max_shard_bytes, metadata)
        self.bytes_written = 0  # bytes of shard files on disk
        self.peak_buffered_bytes = 0
        self.total_tensor_bytes = 0
        self.total_parameters = 0
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_ptrs: set[int] = set()
        self._buffered = 0
        self._names: set[str] = set()
        self._temp_shards: list[tuple[Path, list[str]]] = []
        self._finished = False

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._finished:
            raise OutputError(f"cannot add tensor '{name}': the writer for '{self.out_dir}' is finished")
        if not isinstance(name, str) or not name:
            raise OutputError(f"invalid output tensor name {name!r}")
        if name in self._names:
            raise OutputError(f"output tensor '{name}' was written twice (to '{self.out_dir}')")
        if not isinstance(tensor, torch.Tensor):
            raise OutputError(f"output tensor '{name}' is a {type(tensor).__name__}, not a torch.Tensor")
        t = self._own(name, tensor)
        nbytes = t.numel() * t.element_size()
        if self._buffer and self._buffered + nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._buffer[name] = t
        if t.numel():
            self._buffer_ptrs.add(t.untyped_storage().data_ptr())
        self._buffered += nbytes
        self.total_tensor_bytes += nbytes
        self.total_parameters += t.numel()
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, self._buffered)

    def _own(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        t = tensor.detach()
        if t.layout != torch.strided:
            raise OutputError(f"output tensor '{name}' has unsupported layout {t.layout}")
        from safetensors.torch import _SIZE  # dtypes safetensors can store

        if t.dtype not in _SIZE:
            raise OutputError(f"output tensor '{name}' has dtype {t.dtype}, which safetensors cannot store")
        if t.device.type != "cpu":
            return t.to("cpu").contiguous()  # a fresh copy
        if not t.is_contiguous():
            return t.contiguous()  # copies
        if t.numel() == 0:
            return t.clone()
        storage = t.untyped_storage()
        owns_all = t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        if not owns_all or storage.data_ptr() in self._buffer_ptrs:
            return t.clone()
        return t

    def _flush(self) -> None:
        if not self._buffer:
            return
        from safetensors.torch import save_file

        idx = len(self._temp_shards)
        path = self.out_dir / f".shard-{idx:05d}.safetensors.tmp"
        try:
            save_file(self._buffer, str(path), metadata=self.metadata)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            size = os.path.getsize(path)
        except Exception as e:  # noqa: BLE001 - OSError or safetensors' own error
            with contextlib.suppress(OSError):
                path.unlink()
            raise _write_error(self.out_dir, e) from e
        self.bytes_written += size
        self._temp_shards.append((path, list(self._buffer)))
        self._buffer = {}
        self._buffer_ptrs = set()
        self._buffered = 0

    def finish(self) -> dict:
        """Write the last shard, give shards their final names; return the weight_map."""
        if self._finished:
            raise OutputError(f"the writer for '{self.out_dir}' is already finished")
        if not self._temp_shards and not self._buffer:
            # an empty model still gets a valid (empty) model.safetensors
            self._buffer = {}
            from safetensors.torch import save_file

            path = self.out_dir / ".shard-00000.safetensors.tmp"
            try:
                save_file({}, str(path), metadata=self.metadata)
            except Exception as e:  # noqa: BLE001
                raise _write_error(self.out_dir, e) from e
            self.bytes_written += path.stat().st_size
            self._temp_shards.append((path, []))
        self._flush()
        weight_map = _finalize_shards(self.out_dir, self._temp_shards, self.total_parameters, self.total_tensor_bytes)
        self._finished = True
        return weight_map


def _tag(dtype: object) -> str | None:
    """The safetensors tag of a torch dtype or dtype name (None: safetensors cannot store it)."""
    return TAG_OF.get(name_of(dtype))


_EARLY_WRITEBACK = hasattr(os, "posix_fadvise")


class StreamingShardedWriter:
    """Writes each tensor to its shard file as soon as it is added: nothing is buffered.

    safetensors puts a JSON header (names, dtypes, shapes, byte offsets) before the data, so the
    header must be known before the data is written: the caller gives the whole ``layout`` --
    ``(name, dtype, shape)`` of every output tensor, in the order they will be added -- up front
    (the planner knows it from the input headers). Shards are cut exactly like
    :class:`ShardedWriter` cuts them for the same order; within a shard the tensors are laid
    out in that order (stable-sorted by descending element size, so every tensor is aligned to
    its element size), each shard's header is written when its first tensor arrives and every
    tensor goes straight to its offset (``pwrite``), so a tensor may arrive in any order. A shard
    is fsynced and closed when its last tensor has arrived. Shard size counts tensor bytes.

    Memory: none beyond the tensor being added, whatever the model or shard size.
    """

    def __init__(
        self,
        out_dir: Path,
        max_shard_bytes: int,
        layout: Iterable[tuple[str, torch.dtype | str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        """``layout``: ``(name, dtype, shape)`` per tensor; dtype a torch dtype or its name."""
        self.out_dir, self.max_shard_bytes, self.metadata = _writer_args(out_dir, max_shard_bytes, metadata)
        self.bytes_written = 0
        self.peak_buffered_bytes = 0
        self.total_tensor_bytes = 0
        self.total_parameters = 0
        self._finished = False
        # name -> (shard index, absolute offset, dtype name, shape, nbytes)
        self._slots: dict[str, tuple[int, int, str, tuple[int, ...], int]] = {}
        self._written: set[str] = set()
        self._parts: dict[str, int] = {}  # bytes written so far of tensors added in parts
        groups: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, dtype, shape in layout:
            dtype = name_of(dtype)
            if not isinstance(name, str) or not name:
                raise OutputError(f"invalid output tensor name {name!r}")
            if name in self._slots:
                raise OutputError(f"output tensor '{name}' is planned twice (in '{self.out_dir}')")
            if _tag(dtype) is None:
                raise OutputError(f"output tensor '{name}' has dtype {dtype}, which safetensors cannot store")
            shape = tuple(int(d) for d in shape)
            nbytes = math.prod(shape) * _itemsize(dtype)
            if groups[-1] and used + nbytes > max_shard_bytes:
                groups.append([])
                used = 0
            groups[-1].append((name, dtype, shape, nbytes))
            used += nbytes
            self.total_tensor_bytes += nbytes
            self.total_parameters += math.prod(shape)
            self._slots[name] = (-1, 0, dtype, shape, nbytes)  # placeholder for duplicates check
        # shard files: header + data
        self._shards: list[dict] = []
        for index, group in enumerate(groups):
            entries = sorted(group, key=lambda e: -_itemsize(e[1]))  # stable: keeps arrival order
            header: dict = {"__metadata__": self.metadata}
            offset = 0
            for name, dtype, shape, nbytes in entries:
                header[name] = {"dtype": _tag(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            pos = start
            for name, dtype, shape, nbytes in entries:
                self._slots[name] = (index, pos, dtype, shape, nbytes)
                pos += nbytes
            self._shards.append({
                "path": self.out_dir / f".shard-{index:05d}.safetensors.tmp",
                "header": len(raw).to_bytes(8, "little") + raw,
                "size": pos,
                "names": [e[0] for e in group],
                "left": len(group),
                "fd": None,
            })

    def __len__(self) -> int:
        return len(self._written)

    def __contains__(self, name: object) -> bool:
        return name in self._written

    @property
    def buffered_bytes(self) -> int:
        return 0

    def _open(self, shard: dict) -> int:
        if shard["fd"] is None:
            path = shard["path"]
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
                shard["fd"] = fd
                self._pwrite(fd, memoryview(shard["header"]), 0)
            except OSError as e:
                raise _write_error(self.out_dir, e) from e
        return shard["fd"]

    @staticmethod
    def _pwrite(fd: int, data: memoryview, offset: int) -> None:
        done, total = 0, len(data)
        while done < total:  # Linux writes at most ~2 GiB per call
            done += os.pwrite(fd, data[done:], offset + done)
        if _EARLY_WRITEBACK and total >= 1 << 20:
            # Start writing these pages to disk now (Linux: DONTNEED on dirty pages starts async
            # writeback and drops them once clean; we never read them back), so the fsync at the
            # end of the shard waits for the tail only instead of the whole shard.
            start = -(-offset // 4096) * 4096  # whole pages only: the partial first/last pages
            end = (offset + total) // 4096 * 4096  # are still being filled by the neighbours
            if end > start:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)

    def _close(self, shard: dict, *, sync: bool) -> None:
        fd = shard["fd"]
        if fd is None:
            return
        shard["fd"] = None
        try:
            if sync:
                os.ftruncate(fd, shard["size"])  # no-op unless trailing tensors were empty
                os.fsync(fd)
        finally:
            os.close(fd)

    def _slot(self, name: str) -> tuple[int, int, str, tuple[int, ...], int]:
        """(shard, offset, dtype, shape, nbytes) of a planned tensor not written yet."""
        if self._finished:
            raise OutputError(f"cannot add tensor '{name}': the writer for '{self.out_dir}' is finished")
        slot = self._slots.get(name)
        if slot is None:
            raise OutputError(f"output tensor '{name}' was not planned (writer for '{self.out_dir}')")
        if name in self._written:
            raise OutputError(f"output tensor '{name}' was written twice (to '{self.out_dir}')")
        return slot

    def add(self, name: str, tensor: torch.Tensor) -> None:
        slot = self._slot(name)
        if not isinstance(tensor, torch.Tensor):
            raise OutputError(f"output tensor '{name}' is a {type(tensor).__name__}, not a torch.Tensor")
        index, offset, dtype, shape, nbytes = slot
        t = tensor.detach()
        if name_of(t.dtype) != dtype or tuple(t.shape) != shape:
            raise OutputError(
                f"output tensor '{name}' is {name_of(t.dtype)}{list(t.shape)}, but {dtype}{list(shape)} was planned"
            )
        if t.layout != torch.strided:
            raise OutputError(f"output tensor '{name}' has unsupported layout {t.layout}")
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        shard = self._shards[index]
        fd = self._open(shard)
        if nbytes:
            data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            try:
                self._pwrite(fd, data, offset)
            except OSError as e:
                self._abort()
                raise _write_error(self.out_dir, e) from e
        self._complete(name, shard)

    def add_part(self, name: str, part: torch.Tensor, start: int) -> None:
        """Write elements ``start:start+part.numel()`` of the flattened tensor ``name``.

        The tensor counts as added once all its elements have been written (parts must not
        overlap); lets a caller merge a big tensor in slices without ever holding all of it.
        """
        t = part.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous().reshape(-1)
        self.add_part_bytes(name, memoryview(t.view(torch.uint8).numpy()), start, name_of(t.dtype))

    def add_part_bytes(self, name: str, data: memoryview, start: int, dtype: str) -> None:
        """:meth:`add_part` for raw little-endian element bytes of dtype (name) ``dtype`` (any
        C-contiguous buffer, e.g. a numpy array; bfloat16 as its uint16 bit patterns)."""
        index, offset, planned, shape, nbytes = self._slot(name)
        if dtype != planned:
            raise OutputError(f"part of output tensor '{name}' is {dtype}, but {planned} was planned")
        data = memoryview(data).cast("B")
        itemsize = _itemsize(dtype)
        count = data.nbytes // itemsize
        done = self._parts.get(name, 0)
        if start < 0 or data.nbytes % itemsize or (start + count) * itemsize > nbytes:
            raise OutputError(f"part {start}:{start + count} is outside output tensor '{name}'")
        shard = self._shards[index]
        fd = self._open(shard)
        if count:
            try:
                self._pwrite(fd, data, offset + start * itemsize)
            except OSError as e:
                self._abort()
                raise _write_error(self.out_dir, e) from e
        done += count * itemsize
        self._parts[name] = done
        if done == nbytes:
            del self._parts[name]
            self._complete(name, shard)

    def _complete(self, name: str, shard: dict) -> None:
        self._written.add(name)
        shard["left"] -= 1
        if shard["left"] == 0:
            try:
                self._close(shard, sync=True)
            except OSError as e:
                self._abort()
                raise _write_error(self.out_dir, e) from e
            self.bytes_written += shard["size"]

    def _abort(self) -> None:
        for shard in self._shards:
            with contextlib.suppress(OSError):
                self._close(shard, sync=False)

    def __del__(self) -> None:  # a failed run: do not leak descriptors
        with contextlib.suppress(Exception):
            self._abort()

    def finish(self) -> dict:
        """Check that every planned tensor arrived, give shards their final names; return the weight_map."""
        if self._finished:
            raise OutputError(f"the writer for '{self.out_dir}' is already finished")
        missing = [n for n in self._slots if n not in self._written]
        if missing:
            self._abort()
            raise OutputError(f"output tensor '{missing[0]}' was planned but never written ({len(missing)} missing)")
        for shard in self._shards:
            if shard["left"] == 0 and shard["fd"] is None and not shard["path"].exists():
                # only an empty model (no tensors) gets here: header only
                try:
                    self._open(shard)
                    self._close(shard, sync=True)
                except OSError as e:
                    raise _write_error(self.out_dir, e) from e
                self.bytes_written += shard["size"]
        shards = [(shard["path"], shard["names"]) for shard in self._shards]
        weight_map = _finalize_shards(self.out_dir, shards, self.total_parameters, self.total_tensor_bytes)
        self._finished = True
        return weight_map


# ------------------------------------------------------------- output folder
def _abs(out: str | os.PathLike) -> Path:
    # symlinks are resolved so that the temp folder lands on the target's filesystem
    p = Path(os.path.realpath(os.path.expanduser(os.fspath(out))))
    if not p.name:
        raise OutputError(f"output folder '{p}' is a filesystem root")
    return p


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _nonempty_dir(p: Path) -> bool:
    with os.scandir(p) as it:
        return any(True for _ in it)


def check_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool,
    protected: Iterable[str | os.PathLike] = (),
) -> None:
    """Refuse an output folder that cannot or must not be (re)written.

    * OUT exists and is not a directory -> OutputError;
    * OUT is a non-empty directory and ``overwrite`` is false -> OutputError;
    * with ``overwrite``: OUT must not be the home folder, contain the
      current directory, or contain any ``protected`` path (pass the input
      model folders);
    * the nearest existing ancestor must be a writable directory.
    """
    p = _abs(out)
    real = Path(os.path.realpath(p))
    for prot in protected:
        pr = Path(os.path.realpath(os.path.expanduser(os.fspath(prot))))
        if _is_within(pr, real):
            raise OutputError(
                f"output folder '{p}' would contain or replace input '{prot}'; choose another output folder"
            )
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise OutputError(f"output path '{p}' exists and is not a directory")
        try:
            nonempty = _nonempty_dir(p)
        except OSError as e:
            raise OutputError(f"cannot write output folder '{p}': {e.strerror}") from None
        if nonempty:
            if not overwrite:
                raise OutputError(
                    f"output folder '{p}' exists and is not empty; pass --overwrite to replace it"
                )
            home = Path(os.path.realpath(Path.home()))
            cwd = Path(os.path.realpath(os.getcwd()))
            if real == home or _is_within(cwd, real):
                raise OutputError(
                    f"refusing to overwrite '{p}': it is the home folder or contains the current directory"
                )
    ancestor = p.parent
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write output folder '{p}': '{ancestor}' is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output folder '{p}': {os.strerror(errno.EACCES)} ('{ancestor}')")


def _partial_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(partial|old)-(\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True
    return True


def cleanup_stale_partials(out: str | os.PathLike) -> list[Path]:
    """Remove ``.<name>.partial-<pid>-*`` folders of dead processes next to OUT.

    Also handles ``.<name>.old-<pid>-*`` (the previous OUT moved aside during
    an overwrite): deleted when OUT exists, renamed back to OUT when a crash
    left no OUT.  Returns the removed paths.  Folders of live pids are kept.
    """
    p = _abs(out)
    parent = p.parent
    if not parent.is_dir():
        return []
    pat = _partial_re(p.name)
    removed: list[Path] = []
    try:
        entries = sorted(os.scandir(parent), key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        m = pat.match(entry.name)
        if m is None or not entry.is_dir(follow_symlinks=False):
            continue
        if _pid_alive(int(m.group(2))):
            continue
        path = Path(entry.path)
        if m.group(1) == "old" and not (p.exists() or p.is_symlink()):
            # a crash between "move old OUT aside" and "move new OUT in": restore
            with contextlib.suppress(OSError):
                os.rename(path, p)
            continue  # never delete the only copy of the previous output
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def _is_output_oserror(e: BaseException, tmp: Path) -> bool:
    if not isinstance(e, OSError):
        return False
    if e.errno in _WRITE_ERRNOS:
        return True
    for fn in (e.filename, getattr(e, "filename2", None)):
        if fn is not None:
            with contextlib.suppress(TypeError, ValueError):
                if _is_within(_abs(fn), tmp):
                    return True
    return False


@contextlib.contextmanager
def atomic_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    protected: Iterable[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes OUT on success.

    Entry: :func:`check_output_dir` (refuses a non-empty OUT unless
    ``overwrite``), missing parent folders are created, the temp folder
    ``.<name>.partial-<pid>-<hex>`` is made next to OUT.  Success: the temp
    folder is renamed to OUT (an empty OUT is replaced); with ``overwrite``
    the old OUT is first renamed to ``.<name>.old-<pid>-<hex>``, the new one
    renamed in, then the old one deleted.  Any exception (KeyboardInterrupt
    and SystemExit included) deletes the temp folder and propagates; an
    OSError about the output (ENOSPC, EROFS, or a path inside the temp
    folder) is re-raised as a one-line :class:`OutputError`.
    """
    protected = tuple(protected)
    check_output_dir(out, overwrite=overwrite, protected=protected)
    p = _abs(out)
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{p.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"cannot write output folder '{p}': {e.strerror or e}") from None
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_output_oserror(e, tmp):
            raise OutputError(f"cannot write output folder '{p}': {e.strerror or e}") from e  # type: ignore[union-attr]
        if isinstance(e, OutputError) and str(tmp) in str(e):
            # the writers name the temp folder, which is gone now: name OUT, what the user gave
            raise OutputError(str(e).replace(str(tmp), str(p))) from e
        raise
    try:
        _commit(tmp, p, overwrite=overwrite)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, out: Path, *, overwrite: bool) -> None:
    try:
        exists = out.exists() or out.is_symlink()
        if exists and out.is_dir() and not out.is_symlink() and not _nonempty_dir(out):
            out.rmdir()
            exists = False
        if not exists:
            os.rename(tmp, out)
            return
        if not out.is_dir() or not overwrite:
            # someone created OUT while we were working: keep the result visible
            keep = out.parent / f"{out.name}.merged-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(tmp, keep)
            raise OutputError(
                f"output folder '{out}' appeared during the run and is not empty; "
                f"the result was left in '{keep}'"
            )
        aside = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, aside)
        try:
            os.rename(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(aside, out)
            raise
        if aside.is_symlink():
            aside.unlink()
        else:
            shutil.rmtree(aside, ignore_errors=True)
    except OSError as e:
        raise OutputError(f"cannot write output folder '{out}': {e.strerror or e}") from None


# ------------------------------------------------------------- support files
def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (resolved) lies in ``folder``, or in the ``blobs/`` of the hub cache
    ``folder`` is a snapshot of (``.../snapshots/<rev>`` links into ``.../blobs``)."""
    real, root = path.resolve(), folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append((root.parent.parent / "blobs").resolve())
    return any(real == r or r in real.parents for r in roots)


def support_files(base_model: Path, *, tokenizer_source: Path | None = None) -> list[tuple[Path, str]]:
    """``(source file, name in OUT)`` of the config and tokenizer files to copy.

    A file that is a symlink resolving outside its model folder is refused (ModelLoadError): a
    downloaded folder must not make the merge copy another file of this machine (``tokenizer.json
    -> ~/.ssh/id_rsa``) into an output that may be published. The planner calls this up front.
    """
    base = Path(base_model)
    tok = Path(tokenizer_source) if tokenizer_source is not None else base
    for folder, what in ((base, "base model"), (tok, "tokenizer source")):
        if not folder.is_dir():
            raise ModelLoadError(f"{what} path '{folder}' does not exist or is not a directory")
    found: list[tuple[Path, str]] = []
    for folder, name in [(base, n) for n in CONFIG_FILES] + [(tok, n) for n in TOKENIZER_FILES]:
        src = folder / name
        if not src.is_file():
            continue
        if src.is_symlink() and not _inside(src, folder):
            raise ModelLoadError(
                f"model '{folder}': '{name}' is a symlink resolving outside the model folder "
                f"(to '{src.resolve()}'); refusing to copy it"
            )
        found.append((src, name))
    return found


def copy_support_files(
    base_model: Path,
    out_dir: Path,
    *,
    tokenizer_source: Path | None = None,
) -> list[str]:
    """Copy config / generation config from ``base_model`` and tokenizer files
    from ``tokenizer_source`` (default ``base_model``); return the copied names.

    Only regular files are copied; symlinks are followed when they stay inside the model folder
    (or its hub cache), else refused (see :func:`support_files`).
    """
    out = Path(out_dir)
    copied: list[str] = []
    for src, name in support_files(base_model, tokenizer_source=tokenizer_source):
        try:
            fsrc = open(src, "rb")
        except OSError as e:
            raise ModelLoadError(f"cannot read '{src}': {e.strerror or e}") from None
        with fsrc:
            try:
                with open(out / name, "wb") as fdst:
                    while True:
                        try:
                            chunk = fsrc.read(1 << 20)
                        except OSError as e:
                            raise ModelLoadError(f"cannot read '{src}': {e.strerror or e}") from None
                        if not chunk:
                            break
                        fdst.write(chunk)
            except OSError as e:
                raise _write_error(out, e) from None
        copied.append(name)
    return copied
