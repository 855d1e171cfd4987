"""Cache of calibration statistics as safetensors files.

Layout: ``<cache_dir>/<kind>/<key>.safetensors``, where ``key`` is a sha256 over everything the
statistic depends on (model fingerprint, data fingerprint, every setting; see :meth:`StatsStore.key`).
Files are written atomically (temp file in the same folder, flush + fsync, ``os.replace``, fsync
of the folder), so a killed run leaves either the old state or a complete file, never a partial
file under the final name. Metadata (``str -> str``) records at least ``kind``, ``key`` and
``model_fingerprint``; :meth:`StatsStore.open` refuses a file computed for another model, and a
file whose header or data section is truncated or inconsistent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from mergekit_bico.dtypes import TAGS, torch, torch_dtype

from mergekit_bico.errors import CalibrationError

logger = logging.getLogger(__name__)

__all__ = ["StatsStore", "StatsFile", "default_cache_dir", "CACHE_DIR_NAME", "STORE_FORMAT"]

CACHE_DIR_NAME = ".mergekit_bico_cache"
STORE_FORMAT = "mergekit-bico-stats-v1"
_MAX_HEADER = 100_000_000
_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def default_cache_dir(out_path: str | Path) -> Path:
    """The default statistics cache: ``<OUT parent>/.mergekit_bico_cache`` (beside the output)."""
    return Path(out_path).expanduser().resolve().parent / CACHE_DIR_NAME


def _canonical(value: Any) -> Any:
    """JSON-able canonical form of a key part (paths as strings, tuples as lists, pydantic models dumped)."""
    if hasattr(value, "model_dump"):
        return _canonical(value.model_dump())
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    raise TypeError(f"cache key part of type {type(value).__name__} is not supported")


def _validate_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header: sizes, offsets, contiguity, file length."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CalibrationError(f"stats file '{path}' is truncated (no header)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise CalibrationError(f"stats file '{path}' is truncated or corrupt (header length {n}, file {size} bytes)")
            raw = f.read(n)
    except OSError as err:
        raise CalibrationError(f"cannot read stats file '{path}': {err.strerror or err}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CalibrationError(f"stats file '{path}' has a corrupt header (not JSON)") from None
    if not isinstance(header, dict):
        raise CalibrationError(f"stats file '{path}' has a corrupt header (not a JSON object)")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for d in shape:
                numel *= int(d)
            expected = numel * _DTYPE_SIZES[dtype]
        except (KeyError, TypeError, ValueError):
            raise CalibrationError(f"stats file '{path}' has a corrupt header entry for tensor '{name}'") from None
        if not (0 <= begin <= end) or end - begin != expected:
            raise CalibrationError(f"stats file '{path}': tensor '{name}' has inconsistent offsets {begin}..{end}")
        spans.append((begin, end, name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise CalibrationError(f"stats file '{path}': tensor '{name}' data does not follow the previous tensor")
        cursor = end
    if 8 + n + cursor != size:
        what = "truncated" if 8 + n + cursor > size else "followed by trailing bytes"
        raise CalibrationError(f"stats file '{path}' is {what} (data needs {8 + n + cursor} bytes, file has {size})")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CalibrationError(f"stats file '{path}' has corrupt metadata")
    header["__data_start__"] = 8 + n
    return header


_PREAD_TAGS = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"})
# pread straight into a fresh tensor (little-endian data, POSIX): nothing is mapped, so reading a
# whole stats file tensor by tensor does not leave its pages in the process's RSS
_PREAD = sys.byteorder == "little" and hasattr(os, "preadv")


class StatsFile:
    """A validated stats file; tensors are read lazily (mmap), one at a time.

    ``.keys()`` (tensor names), ``.get(name) -> Tensor`` (a fresh tensor), ``name in file``,
    ``.metadata`` (``dict[str, str]``), ``.path``. Usable as a context manager.
    """

    def __init__(self, path: str | Path, *, model_fingerprint: Optional[str] = None):
        self.path = Path(path)
        header = _validate_header(self.path)
        self.metadata: dict[str, str] = dict(header.get("__metadata__") or {})
        self._names = [k for k in header if not k.startswith("__")]
        self._shapes = {k: tuple(header[k]["shape"]) for k in self._names}
        start = header["__data_start__"]
        self._spans = {k: (start + header[k]["data_offsets"][0], header[k]["data_offsets"][1] - header[k]["data_offsets"][0],
                           header[k]["dtype"]) for k in self._names}
        self._fd: Optional[int] = None
        recorded = self.metadata.get("model_fingerprint")
        if model_fingerprint is not None and recorded != model_fingerprint:
            model = self.metadata.get("model_path", "?")
            raise CalibrationError(
                f"stats file '{self.path}' belongs to another model ('{model}', fingerprint "
                f"{str(recorded)[:12]}..., expected {model_fingerprint[:12]}...); delete it or fix the cache path"
            )
        self._handle = None

    def _open(self):
        if self._handle is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as err:  # noqa: BLE001 - safetensors' error type is not stable
                raise CalibrationError(f"cannot open stats file '{self.path}': {' '.join(str(err).split())}") from None
        return self._handle

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            raise CalibrationError(f"stats file '{self.path}' has no tensor '{name}'")
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise CalibrationError(f"stats file '{self.path}' has no tensor '{name}'")
        try:
            offset, nbytes, tag = self._spans[name]
            if _PREAD and tag in _PREAD_TAGS:
                return self._pread(offset, nbytes).view(torch_dtype(TAGS[tag][0])).reshape(self._shapes[name])
            return self._open().get_tensor(name).clone()
        except CalibrationError:
            raise
        except Exception as err:  # noqa: BLE001
            raise CalibrationError(f"cannot read tensor '{name}' from stats file '{self.path}': {' '.join(str(err).split())}") from None

    def _pread(self, offset: int, nbytes: int) -> torch.Tensor:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < nbytes:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise CalibrationError(f"stats file '{self.path}' is shorter than its header says (truncated while in use?)")
            done += n
        return buf

    def close(self) -> None:
        self._handle = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> "StatsFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StatsFile('{self.path}', {len(self._names)} tensors)"


class StatsStore:
    """Statistics cache rooted at ``cache_dir`` (created on first save)."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir).expanduser()

    def key(self, kind: str, **parts: Any) -> str:
        """sha256 (hex, 40 chars) of ``kind``, the store format and every ``parts`` value (JSON-canonical:
        sorted keys; paths, dtypes, pydantic models allowed)."""
        blob = json.dumps({"format": STORE_FORMAT, "kind": kind, "parts": _canonical(parts)}, sort_keys=True,
                          separators=(",", ":"), allow_nan=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:40]

    def path_for(self, kind: str, key: str) -> Path:
        if not kind.replace("_", "").replace("-", "").isalnum() or not key.isalnum():
            raise CalibrationError(f"invalid statistics kind/key {kind!r}/{key!r}")
        return self.cache_dir / kind / f"{key}.safetensors"

    def lookup(self, kind: str, key: str) -> Optional[Path]:
        """The cached file for ``(kind, key)`` or None (also None, with a warning, for a corrupt one)."""
        path = self.path_for(kind, key)
        if not path.is_file():
            return None
        try:
            _validate_header(path)
        except CalibrationError as err:
            logger.warning("ignoring unusable cached statistics: %s", err)
            return None
        return path

    def save(self, kind: str, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
        """Write ``tensors`` (stored contiguous, on cpu, no shared memory) with ``metadata`` atomically."""
        from safetensors.torch import save_file

        path = self.path_for(kind, key)
        meta = {str(k): str(v) for k, v in metadata.items()}
        meta.setdefault("format", STORE_FORMAT)
        meta["kind"] = kind
        meta["key"] = key
        data = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(path.parent)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{key}.{os.getpid()}.", suffix=".tmp", dir=str(path.parent))
            os.close(fd)
        except OSError as err:
            raise CalibrationError(f"cannot write statistics cache '{self.cache_dir}': {err.strerror or err}") from None
        tmp = Path(tmp_name)
        try:
            save_file(data, str(tmp), metadata=meta)
            with tmp.open("rb+") as f:
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise CalibrationError(f"cannot write stats file '{path}': {err.strerror or err}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def open(self, path: str | Path, *, model_fingerprint: Optional[str]) -> StatsFile:
        """Validate and open a stats file; refuse one recorded for another model fingerprint."""
        return StatsFile(path, model_fingerprint=model_fingerprint)


_TEMP_RE = re.compile(r"^\.[0-9a-f]+\.(\d+)\..+\.tmp$")


def _remove_stale_temps(folder: Path) -> None:
    """Delete the temp files of writers that died (SIGKILL, power loss) before their rename.

    They were never under a final name, so nothing ever reads them; removing them only gives the
    disk space back. Temp files of live processes (another run writing now) are kept.
    """
    from mergekit_bico.io.writer import _pid_alive

    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m and entry.is_file(follow_symlinks=False) and not _pid_alive(int(m.group(1))):
            try:
                os.unlink(entry.path)
                logger.info("removed the partial statistics file '%s' of an interrupted run", entry.path)
            except OSError:
                pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
