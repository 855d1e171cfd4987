"""Calibration data: read samples, tokenize them into fixed batches, fingerprint the data.

Formats of ``calibration.data``:

* ``.txt``: one sample a line (blank lines skipped), no labels;
* ``.jsonl``: one JSON object a line with ``cfg.text_field`` (a string) and optionally
  ``cfg.label_field`` (an integer class index);
* a folder written by ``datasets.Dataset.save_to_disk`` (read with ``pyarrow`` directly, so the
  ``datasets`` package is not needed; a ``DatasetDict`` folder uses its ``train`` split).

Selection is deterministic: the rows are shuffled by ``random.Random(cfg.seed)`` and the first
``cfg.samples`` are kept, in that order. Batches keep that order too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mergekit_bico.config import CalibrationConfig
from mergekit_bico.errors import CalibrationError

logger = logging.getLogger(__name__)

Sample = tuple[str, Optional[int]]

__all__ = ["Sample", "load_samples", "make_batches", "data_fingerprint", "read_rows"]


# ---------------------------------------------------------------------------------------------
# Reading rows


def _label_value(value: Any, where: str, field: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise CalibrationError(f"{where}: '{field}' must be an integer class index, got {value!r}")
    if value < 0:
        raise CalibrationError(f"{where}: '{field}' must be a non-negative class index, got {value!r}")
    return int(value)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationError(f"calibration data '{path}' is not UTF-8 text: {err.reason} at byte {err.start}") from None
    except OSError as err:
        raise CalibrationError(f"cannot read calibration data '{path}': {err.strerror or err}") from None


def _rows_txt(path: Path) -> list[Sample]:
    return [(line, None) for line in _read_text(path).splitlines() if line.strip()]


def _rows_jsonl(path: Path, cfg: CalibrationConfig) -> list[Sample]:
    rows: list[Sample] = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"calibration data '{path}' line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{where}: bad JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise CalibrationError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if cfg.text_field not in obj:
            raise CalibrationError(f"{where}: missing text field '{cfg.text_field}' (set calibration.text_field)")
        text = obj[cfg.text_field]
        if not isinstance(text, str):
            raise CalibrationError(f"{where}: text field '{cfg.text_field}' must be a string, got {type(text).__name__}")
        rows.append((text, _label_value(obj.get(cfg.label_field), where, cfg.label_field)))
    return rows


def _arrow_files(folder: Path) -> list[Path]:
    """The arrow files of a ``save_to_disk`` folder, in the order ``state.json`` lists them."""
    if (folder / "dataset_dict.json").is_file() and not (folder / "state.json").is_file():
        train = folder / "train"
        if not train.is_dir():
            try:
                splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
            except (OSError, ValueError):
                splits = []
            raise CalibrationError(
                f"calibration data '{folder}' is a DatasetDict without a 'train' split "
                f"(splits: {', '.join(map(str, splits)) or 'none'}); point calibration.data at one split folder"
            )
        folder = train
    state = folder / "state.json"
    if state.is_file():
        try:
            files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CalibrationError(f"calibration data '{folder}': unreadable state.json ({err})") from None
    else:
        files = sorted(folder.glob("*.arrow"))
    if not files:
        raise CalibrationError(
            f"calibration data '{folder}' is a folder without .arrow files; expected a folder written by "
            "datasets' save_to_disk, or give a .txt / .jsonl file"
        )
    for f in files:
        if not f.is_file():
            raise CalibrationError(f"calibration data '{folder}': listed arrow file '{f.name}' is missing")
    return files


def _rows_arrow_folder(folder: Path, cfg: CalibrationConfig) -> list[Sample]:
    files = _arrow_files(folder)
    try:
        import pyarrow as pa  # type: ignore[import-not-found]
    except ImportError:
        raise CalibrationError(
            f"reading the save_to_disk folder '{folder}' needs pyarrow: pip install pyarrow (or datasets), "
            "or export the data as .jsonl"
        ) from None
    rows: list[Sample] = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    source.seek(0)
                    table = pa.ipc.open_file(source).read_all()
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise CalibrationError(f"calibration data '{f}': unreadable arrow file ({err})") from None
        names = table.column_names
        if cfg.text_field not in names:
            raise CalibrationError(
                f"calibration data '{f}': no column '{cfg.text_field}' (columns: {', '.join(names)}); set calibration.text_field"
            )
        texts = table.column(cfg.text_field).to_pylist()
        labels = table.column(cfg.label_field).to_pylist() if cfg.label_field in names else [None] * len(texts)
        for i, (text, label) in enumerate(zip(texts, labels)):
            where = f"calibration data '{f}' row {i}"
            if not isinstance(text, str):
                raise CalibrationError(f"{where}: column '{cfg.text_field}' must hold strings, got {type(text).__name__}")
            rows.append((text, _label_value(label, where, cfg.label_field)))
    return rows


def read_rows(cfg: CalibrationConfig) -> list[Sample]:
    """Every row of ``cfg.data`` in file order, as ``(text, label or None)``."""
    path = Path(cfg.data)
    if not path.exists():
        raise CalibrationError(f"calibration data '{path}' does not exist")
    if path.is_dir():
        return _rows_arrow_folder(path, cfg)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _rows_txt(path)
    if suffix in (".jsonl", ".ndjson"):
        return _rows_jsonl(path, cfg)
    raise CalibrationError(
        f"calibration data '{path}': unsupported format '{suffix or '(no suffix)'}'; use .txt, .jsonl or a save_to_disk folder"
    )


def load_samples(cfg: CalibrationConfig, *, need_labels: bool) -> list[Sample]:
    """Read ``cfg.data``, shuffle it with ``random.Random(cfg.seed)`` and keep the first ``cfg.samples``.

    Returns ``[(text, label or None), ...]``. Raises :class:`CalibrationError` for a missing,
    unreadable or empty file, a bad JSON line (with its number), or, when ``need_labels``, a row
    without a label. Fewer rows than requested is a warning, not an error.
    """
    rows = read_rows(cfg)
    if not rows:
        raise CalibrationError(f"calibration data '{cfg.data}' is empty (no non-blank samples)")
    if need_labels:
        for index, (_, label) in enumerate(rows):
            if label is None:
                kind = "line" if Path(cfg.data).is_file() else "row"
                number = _source_line(cfg, index) if kind == "line" else index
                raise CalibrationError(
                    f"calibration data '{cfg.data}' {kind} {number}: missing label field '{cfg.label_field}' "
                    "(this loss / estimator needs labels)"
                )
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    if len(rows) < cfg.samples:
        logger.warning(
            "calibration data '%s' has %d samples, fewer than the %d requested; using all of them",
            cfg.data, len(rows), cfg.samples,
        )
    return [rows[i] for i in order[: cfg.samples]]


def _source_line(cfg: CalibrationConfig, row_index: int) -> int:
    """1-based line number of the ``row_index``-th non-blank line of a text file."""
    seen = -1
    for number, line in enumerate(_read_text(Path(cfg.data)).splitlines(), start=1):
        if line.strip():
            seen += 1
            if seen == row_index:
                return number
    return row_index + 1


# ---------------------------------------------------------------------------------------------
# Batches


def ensure_pad_token(tokenizer: Any) -> None:
    """Give ``tokenizer`` a pad token: its own, else its eos token; CalibrationError if neither."""
    if getattr(tokenizer, "pad_token", None) is not None:
        return
    eos = getattr(tokenizer, "eos_token", None)
    if eos is None:
        raise CalibrationError(
            f"tokenizer '{getattr(tokenizer, 'name_or_path', '?')}' has neither a pad token nor an eos token to pad with"
        )
    tokenizer.pad_token = eos


def make_batches(
    samples: Sequence[Sample],
    tokenizer: Any,
    cfg: CalibrationConfig,
    *,
    causal_lm: bool,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize ``samples`` in order into batches of ``cfg.batch_size``, right-padded to the longest
    in the batch, truncated to ``cfg.max_length``.

    Each batch has ``input_ids`` and ``attention_mask`` (``[B, T]``, long) and ``labels``:
    for a causal LM ``input_ids`` with ``-100`` at padding (the model shifts them), otherwise
    ``[B]`` class indices (left out when no sample has a label; an error when only some have).
    The pad token falls back to eos. Padding positions have ``attention_mask == 0`` and never carry a label.
    """
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    batches: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(samples), cfg.batch_size):
        chunk = samples[start : start + cfg.batch_size]
        texts = [text for text, _ in chunk]
        enc = tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=cfg.max_length,
            return_tensors="pt",
        )
        input_ids = enc["input_ids"].long()
        attention_mask = enc.get("attention_mask")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in enc:
            batch["token_type_ids"] = enc["token_type_ids"].long()
        if causal_lm:
            labels = input_ids.clone()
            labels[attention_mask == 0] = -100
            batch["labels"] = labels
        else:
            labels_list = [label for _, label in chunk]
            have = [label is not None for label in labels_list]
            if all(have):
                batch["labels"] = torch.tensor(labels_list, dtype=torch.long)
            elif any(have):
                missing = start + have.index(False)
                raise CalibrationError(
                    f"calibration data '{cfg.data}' sample {missing}: missing label field '{cfg.label_field}' "
                    "while other samples have one"
                )
        batches.append(batch)
    return batches


# ---------------------------------------------------------------------------------------------
# Fingerprint


def data_fingerprint(cfg: CalibrationConfig) -> str:
    """sha256 of the data's bytes (a folder: every file's relative path and bytes, sorted).

    The path itself is not part of it: moving or renaming the file keeps cached statistics valid.
    """
    path = Path(cfg.data)
    if not path.exists():
        raise CalibrationError(f"calibration data '{path}' does not exist")
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        try:
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        except OSError as err:
            raise CalibrationError(f"cannot read calibration data '{f}': {err.strerror or err}") from None
        h.update(b"\0")
    return h.hexdigest()
