"""The training report written beside a model ``optic export train`` made: what a person checks before serving it.

Learning curves for every run, then what the task's metric hides: the confusion matrix (classification), the
precision-recall curve per class (detection), the IoU per class (segmentation), sample captions against their
references (captioning). Everything is also in ``report.json`` for tools; ``report.md`` links the pictures.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of training: ``phase`` is ``head`` (backbone frozen), ``finetune`` or ``scratch``."""

    epoch: int
    phase: str
    train_loss: float
    val_metric: float
    lr: float
    seconds: float


@dataclass
class Evaluation:
    """The task's final evaluation on the validation split (only the fields of its task are set)."""

    metric_name: str
    metric: float
    extra: dict[str, float] = field(default_factory=dict)  # e.g. mAP@0.5:0.95, BLEU-4
    confusion: list[list[int]] | None = None  # [true][predicted]
    pr_curves: dict[str, tuple[list[float], list[float]]] | None = None  # class -> (recall, precision) at IoU 0.5
    class_iou: dict[str, float] | None = None
    captions: list[tuple[str, str, str]] | None = None  # (image, predicted, one reference)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: Sequence[EpochRecord], metric_name: str, path: Path) -> Path:
    plt = _plt()
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = [r.epoch for r in history]
    loss_ax.plot(epochs, [r.train_loss for r in history], marker="o", ms=3)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="loss")
    metric_ax.plot(epochs, [r.val_metric for r in history], marker="o", ms=3, color="tab:green")
    metric_ax.set(xlabel="epoch", ylabel=metric_name, title=f"validation {metric_name}")
    for ax in (loss_ax, metric_ax):
        for before, after in itertools.pairwise(history):
            if after.phase != before.phase:  # where the backbone was unfrozen
                ax.axvline(before.epoch + 0.5, color="grey", ls="--", lw=1)
                ax.text(before.epoch + 0.6, ax.get_ylim()[1], after.phase, va="top", fontsize=8, color="grey")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix(matrix: Sequence[Sequence[int]], names: Sequence[str], path: Path) -> Path:
    plt = _plt()
    m = np.asarray(matrix, dtype=np.int64)
    rows = m.sum(1, keepdims=True).clip(min=1)
    side = max(3.5, 0.55 * len(names) + 1.5)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(m / rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion (row-normalised; counts in cells)")
    for i in range(len(names)):
        for j in range(len(names)):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] / rows[i, 0] > 0.5 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pr_curves(curves: dict[str, tuple[list[float], list[float]]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, (recall, precision) in curves.items():
        ap = float(np.mean(precision)) if precision else 0.0
        ax.plot(recall, precision, label=f"{name} (AP {ap:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="precision-recall at IoU 0.5")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def class_iou(iou: dict[str, float], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(iou) + 2), 3.6))
    names = list(iou)
    ax.bar(names, [iou[n] for n in names], color="tab:purple")
    for i, n in enumerate(names):
        ax.text(i, iou[n] + 0.01, f"{iou[n]:.2f}", ha="center", fontsize=8)
    ax.set(ylim=(0, 1.08), ylabel="IoU", title=f"IoU per class (mean {np.mean(list(iou.values())):.3f})")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    out: Path,
    *,
    title: str,
    names: Sequence[str],
    history: Sequence[EpochRecord],
    evaluation: Evaluation,
    summary: Sequence[str],
) -> list[Path]:
    """Write the report into ``out`` (created); returns the files written, ``report.md`` first."""
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = []
    if history:
        figures.append(("Learning curves", learning_curves(history, evaluation.metric_name, out / "curves.png")))
    if evaluation.confusion is not None:
        figures.append(("Confusion matrix", confusion_matrix(evaluation.confusion, names, out / "confusion.png")))
    if evaluation.pr_curves:
        figures.append(("Precision-recall", pr_curves(evaluation.pr_curves, out / "pr.png")))
    if evaluation.class_iou:
        figures.append(("IoU per class", class_iou(evaluation.class_iou, out / "iou.png")))
    lines = [f"# {title}", "", *summary, ""]
    lines += [f"Validation {evaluation.metric_name}: **{evaluation.metric:.4f}**"]
    lines += [f"{k}: {v:.4f}" for k, v in evaluation.extra.items()]
    lines.append("")
    if history:
        head = "| epoch | phase | train loss | val " + evaluation.metric_name + " | lr | s |"
        lines += [head, "|---|---|---|---|---|---|"]
        lines += [
            f"| {r.epoch} | {r.phase} | {r.train_loss:.4f} | {r.val_metric:.4f} | {r.lr:.2g} | {r.seconds:.1f} |"
            for r in history
        ]
        lines.append("")
    for caption, path in figures:
        lines += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
    if evaluation.captions:
        lines += ["## Sample captions", "", "| image | predicted | a reference |", "|---|---|---|"]
        lines += [f"| {img} | {pred} | {ref} |" for img, pred, ref in evaluation.captions]
        lines.append("")
    md = out / "report.md"
    md.write_text("\n".join(lines))
    data = {"title": title, "names": list(names), "history": [asdict(r) for r in history],
            "evaluation": asdict(evaluation), "summary": list(summary)}  # fmt: skip
    js = out / "report.json"
    js.write_text(json.dumps(data, indent=1))
    return [md, js, *(p for _, p in figures)]
