"""The typed results of reading a dataset, its one error type, and what every format shares: counting, splitting.

Readers only collect samples and note problems; :func:`finish` makes the split, refuses empty splits and builds the
report, so every format splits, counts and words its summary the same way.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Generic, TypeVar

import numpy as np

SPLITS = ("train", "val")
_EXAMPLES = 3  # file names kept per counted problem: enough to find the files, short enough for a terminal line
_CLASS_LINE_WIDTH = 100
NO_TRAINING_EXAMPLES = "class with no training examples"


class DatasetError(ValueError):
    """A dataset that cannot be trained on. The message is one line that names the file or folder and the fault,
    so the CLI can print it as is, without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", message).strip())


@dataclass(frozen=True)
class ClassificationSample:
    path: Path
    label: int


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields has no single truth value
class DetectionSample:
    """Boxes are x1, y1, x2, y2 in pixels of the image as :func:`read_image` returns it (EXIF orientation applied)."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (K, 4) float32
    classes: np.ndarray  # (K,) int64

    def __post_init__(self) -> None:
        # Own read-only copies in the documented dtypes: the sample is frozen all the way down.
        boxes = np.array(self.boxes, dtype=np.float32).reshape(-1, 4)
        classes = np.array(self.classes, dtype=np.int64).reshape(-1)
        if len(boxes) != len(classes):
            raise ValueError(f"{self.path}: {len(boxes)} boxes but {len(classes)} classes")
        boxes.setflags(write=False)
        classes.setflags(write=False)
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "classes", classes)


@dataclass(frozen=True)
class SegmentationSample:
    path: Path
    mask_path: Path
    width: int
    height: int


@dataclass(frozen=True)
class CaptionSample:
    path: Path
    captions: tuple[str, ...]


Sample = ClassificationSample | DetectionSample | SegmentationSample | CaptionSample
S = TypeVar("S", ClassificationSample, DetectionSample, SegmentationSample, CaptionSample)


@dataclass(frozen=True)
class Issue:
    """One kind of problem, counted: how often, and the first few files it was seen in."""

    reason: str
    count: int
    examples: tuple[str, ...]

    def line(self) -> str:
        shown = ", ".join(self.examples)
        more = self.count - len(self.examples)
        return f"{self.count} × {self.reason}" + (f": {shown}" if shown else "") + (f" (+{more} more)" if more else "")


@dataclass(frozen=True)
class DatasetReport:
    """What was read: sizes per split and class, files skipped and warnings, each counted by reason.

    ``class_counts[split][i]`` counts class ``names[i]`` in ``class_unit`` (images, instances or pixels);
    ``instances[split]`` is the split's total of boxes, labelled pixels or captions.
    """

    task: str
    format: str
    source: Path
    names: tuple[str, ...]
    split: str  # how train/val came about, in words
    images: Mapping[str, int]
    instances: Mapping[str, int]
    instance_unit: str
    class_counts: Mapping[str, tuple[int, ...]]
    class_unit: str
    skipped: tuple[Issue, ...] = ()
    warnings: tuple[Issue, ...] = ()
    vocab_size: int | None = None  # captioning: the vocabulary's size, specials included

    @property
    def skipped_files(self) -> int:
        return sum(issue.count for issue in self.skipped)

    def count(self, reason: str) -> int:
        """How many times ``reason`` was noted, as a skipped file or a warning (0 if never)."""
        return sum(issue.count for issue in (*self.skipped, *self.warnings) if issue.reason == reason)

    def summary(self) -> list[str]:
        """Lines for a person at a terminal: what was read, the split, per-class counts, then every problem."""
        unit = self.instance_unit
        what = f"{len(self.names)} classes" if self.names else f"{self.instances['train']} training {unit}"
        lines = [f"{self.format} {self.source}: {self.task}, {what}"]
        sizes = ", ".join(
            f"{s} {self.images[s]} images" + (f" / {self.instances[s]} {unit}" if unit else "") for s in SPLITS
        )
        lines.append(f"split: {self.split}; {sizes}")
        if self.names and self.class_counts:
            train, val = self.class_counts["train"], self.class_counts["val"]
            per_class = ", ".join(f"{name} {train[i]}/{val[i]}" for i, name in enumerate(self.names))
            lines += textwrap.wrap(
                f"{self.class_unit} per class (train/val): {per_class}", _CLASS_LINE_WIDTH, subsequent_indent="  "
            )
        if self.vocab_size is not None:
            lines.append(f"vocabulary: {self.vocab_size} tokens (specials included), from the train split")
        if self.skipped:
            lines.append(f"skipped {self.skipped_files} file(s):")
            lines += [f"  {issue.line()}" for issue in self.skipped]
        lines += [f"warning: {issue.line()}" for issue in self.warnings]
        return lines

    def __str__(self) -> str:
        return "\n".join(self.summary())


@dataclass(frozen=True)
class Dataset(Generic[S]):
    """A dataset ready to train on: samples reference their files, which are decoded later (:func:`read_image`).

    ``names`` are the class names by class id (captioning: none); ``vocab`` is the captioner's vocabulary, built from
    the training split only, specials first.
    """

    task: str
    names: tuple[str, ...]
    train: tuple[S, ...]
    val: tuple[S, ...]
    report: DatasetReport
    vocab: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def summary(self) -> list[str]:
        return self.report.summary()


def read_lines(path: Path) -> list[str]:
    """A text file's non-blank lines, stripped (UTF-8, with or without a byte-order mark)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass
class _Tally:
    count: int = 0
    examples: list[str] = field(default_factory=list)


class Notes:
    """Counts skipped files and warnings while a reader runs. ``strict`` turns a skipped file into an error,
    for users who would rather fix the dataset than train on part of it."""

    def __init__(self, root: Path, strict: bool) -> None:
        self.root = root if root.is_dir() else root.parent
        self.strict = strict
        self._skipped: dict[str, _Tally] = {}
        self._warnings: dict[str, _Tally] = {}

    def name(self, path: Path) -> str:
        """A file's name as the summary shows it: relative to the dataset (or the folder above, where COCO keeps
        its images beside ``annotations/``) when inside it."""
        for base in (self.root, self.root.parent):
            if path.is_relative_to(base):
                return str(path.relative_to(base))
        return str(path)

    def skip(self, reason: str, path: Path, detail: str = "") -> None:
        if self.strict:
            why = f"{reason} ({detail})" if detail else reason
            raise DatasetError(f"{path}: {why}; refused because strict mode is on (without it the file is skipped)")
        self._add(self._skipped, reason, path, 1)

    def warn(self, reason: str, path: Path | str, count: int = 1) -> None:
        self._add(self._warnings, reason, path, count)

    def _add(self, table: dict[str, _Tally], reason: str, path: Path | str, count: int) -> None:
        tally = table.setdefault(reason, _Tally())
        tally.count += count
        shown = self.name(path) if isinstance(path, Path) else path
        if len(tally.examples) < _EXAMPLES and shown not in tally.examples:
            tally.examples.append(shown)

    def issues(self) -> tuple[tuple[Issue, ...], tuple[Issue, ...]]:
        def freeze(table: dict[str, _Tally]) -> tuple[Issue, ...]:
            return tuple(Issue(reason, t.count, tuple(t.examples)) for reason, t in table.items())

        return freeze(self._skipped), freeze(self._warnings)


@dataclass
class Collected(Generic[S]):
    """What a reader found, before the split: ``val`` is None when the dataset has no validation split of its own.

    ``counts(sample)`` gives a sample's per-class counts (length ``len(names)``) in ``class_unit``; ``strata``
    (classification) keeps every class's share when the split is drawn.
    """

    format: str
    source: Path
    names: tuple[str, ...]
    train: list[S]
    val: list[S] | None
    counts: Callable[[S], np.ndarray] | None = None
    class_unit: str = ""
    instance_unit: str = ""
    instances: Callable[[S], int] | None = None
    strata: Callable[[S], int] | None = None
    split_note: str = "train/val as given"


def val_count(n: int, val_fraction: float) -> int:
    """Validation items drawn from ``n``: at least one and never all of them, once there are two."""
    if val_fraction <= 0 or n < 2:
        return 0
    return min(max(round(n * val_fraction), 1), n - 1)


def split_indices(strata: Sequence[int] | None, n: int, val_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the items drawn for validation: per stratum when ``strata`` is given, from one
    ``np.random.default_rng(seed)`` so the same seed gives the same split on every machine."""
    rng = np.random.default_rng(seed)
    if strata is None:
        groups = [np.arange(n)]
    else:
        keys = np.asarray(strata)
        groups = [np.flatnonzero(keys == k) for k in np.unique(keys)]
    is_val = np.zeros(n, dtype=bool)
    for group in groups:
        is_val[rng.permutation(group)[: val_count(len(group), val_fraction)]] = True
    return is_val


def finish(
    task: str,
    found: Collected[S],
    notes: Notes,
    *,
    seed: int,
    val_fraction: float,
    vocab: Callable[[list[S]], tuple[str, ...]] | None = None,
) -> Dataset[S]:
    """Split (when the dataset has no val split), refuse empty splits, and count everything for the report.

    ``vocab``, when given, is called with the training samples: the vocabulary must see the training split only.
    """
    if not found.train:
        dropped = notes.issues()[0]
        why = "; skipped " + "; ".join(issue.line() for issue in dropped) if dropped else ""
        raise DatasetError(f"{found.source}: no usable training images{why}")
    if found.val is None:
        strata = [found.strata(s) for s in found.train] if found.strata else None
        is_val = split_indices(strata, len(found.train), val_fraction, seed)
        train = [s for s, v in zip(found.train, is_val, strict=True) if not v]
        val = [s for s, v in zip(found.train, is_val, strict=True) if v]
        how = "stratified per class, " if strata is not None else ""
        split = f"val drawn from train ({how}seed {seed}, val_fraction {val_fraction:g})"
        if not val and val_fraction > 0:
            raise DatasetError(
                f"{found.source}: {len(found.train)} usable image(s) is too few to draw a validation split from"
            )
    else:
        train, val, split = found.train, found.val, found.split_note
        if not val:
            raise DatasetError(f"{found.source}: the val split has no usable images")
    train.sort(key=lambda s: str(s.path))
    val.sort(key=lambda s: str(s.path))

    k = len(found.names)
    class_counts: dict[str, tuple[int, ...]] = {}
    for name, items in zip(SPLITS, (train, val), strict=True):
        total = np.zeros(k, dtype=np.int64)
        if found.counts is not None:
            for sample in items:
                total += found.counts(sample)
        class_counts[name] = tuple(int(c) for c in total)
    if found.counts is not None:
        for name, c in zip(found.names, class_counts["train"], strict=True):
            if c == 0:
                notes.warn(NO_TRAINING_EXAMPLES, name)
    instances = {
        name: sum(found.instances(s) for s in items) if found.instances else 0
        for name, items in zip(SPLITS, (train, val), strict=True)
    }
    if found.instances is not None and not instances["train"]:
        raise DatasetError(f"{found.source}: the training split has no {found.instance_unit}")
    words = vocab(train) if vocab is not None else None
    skipped, warnings = notes.issues()
    report = DatasetReport(
        task=task,
        format=found.format,
        source=found.source,
        names=found.names,
        split=split,
        images=MappingProxyType({"train": len(train), "val": len(val)}),
        instances=MappingProxyType(instances),
        instance_unit=found.instance_unit,
        class_counts=MappingProxyType(class_counts),
        class_unit=found.class_unit,
        skipped=skipped,
        warnings=warnings,
        vocab_size=len(words) if words is not None else None,
    )
    return Dataset(
        task=task,
        names=found.names,
        train=tuple(train),
        val=tuple(val),
        report=report,
        vocab=words,
    )
