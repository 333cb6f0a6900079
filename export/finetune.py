"""``optic export train TASK --data PATH --out REPO --name NAME``: a user's dataset to a gated, served model.

The dataset is read and checked by :mod:`optic.export.datasets` (one-line errors, counted skips); the network is
our trunk's backbone and pyramid (``--from optic``: the ``trunk.pt`` that ``optic export all`` writes), a
torchvision backbone with the user's weights, or a fresh one, with the task's head from
:mod:`optic.export.models`; it trains in two phases (:mod:`optic.export.finetune_loop`), is exported with the same
wrappers, parity check, metadata and gate as the default models (:func:`optic.export.recipe.finish`), scored on the
validation split through the server's own pre- and post-processing, and written only if it passes. The report
(learning curves and the task's figures) goes beside it, in ``REPO/NAME/report/``, a folder the server ignores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DEFAULT_SIZE = {"classify": 128, "detect": 256, "segment": 192, "caption": 128}
DEFAULT_GATE = {"classify": None, "detect": 0.10, "segment": 0.25, "caption": 0.05}  # classify: 1.5 / classes
MAX_TOKENS = 32  # caption length cap, <bos> and <eos> included
TRUNK_NAMES = ("optic", "trunk", "classifier", "detector", "segmenter", "captioner")
TASK_CHOICES = ("classify", "detect", "segment", "caption", "classification", "detection", "segmentation",
                "captioning")  # fmt: skip
EXIT_INTERRUPTED = 130


def add_parser(sub: Any) -> None:
    """Register ``optic export train`` (argparse only: torch loads when the command runs)."""
    p = sub.add_parser("train", help="train on your own dataset (ImageFolder, Ultralytics YAML, COCO, VOC) and "
                       "write the gated model into a repository")  # fmt: skip
    p.add_argument("task", choices=TASK_CHOICES, metavar="TASK", help="classify, detect, segment or caption")
    p.add_argument("--data", type=Path, required=True, help="the dataset: an ImageFolder folder, an Ultralytics "
                   "data.yaml, a COCO instances/captions .json, a VOC (or images/ + masks/) folder")
    p.add_argument("--out", type=Path, default=Path("model_repo"), help="model repository to write into")
    p.add_argument("--name", required=True, help="the model's name in the repository (captioning: NAME_encoder "
                   "and NAME_decoder, called as NAME)")
    g = p.add_argument_group("starting point")
    g.add_argument("--from", dest="source", metavar="MODEL|ARCH|PATH|none", help="optic (or a default model's "
                   "name): the trunk REPO/trunk.pt; a trunk.pt path; a torchvision backbone (resnet18, resnet34, "
                   "resnet50, mobilenet_v3_large, mobilenet_v3_small, efficientnet_b0) with --weights; none: from "
                   "scratch (default: REPO/trunk.pt when present, else none)")
    g.add_argument("--weights", type=Path, help="the torchvision architecture's state_dict (nothing is downloaded)")
    g.add_argument("--width", type=int, default=16, help="--from none: backbone width (default 16)")
    g.add_argument("--depth", type=int, default=2, help="--from none: blocks per middle stage (default 2)")
    g.add_argument("--neck", type=int, default=64, help="--from none/torchvision: pyramid channels (default 64)")
    g = p.add_argument_group("training")
    g.add_argument("--head-epochs", type=int, default=3, help="phase 1: backbone frozen, head trained (default 3)")
    g.add_argument("--epochs", type=int, default=10, help="phase 2: everything fine-tuned (default 10); from "
                   "scratch: one phase of head-epochs + epochs")
    g.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of phase 1 and scratch (2e-3)")
    g.add_argument("--finetune-lr-factor", type=float, default=0.1, help="phase 2 learning rate = lr x this (0.1)")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--size", type=int, help="square letterboxed input side, a multiple of 32 (default: classify "
                   "128, detect 256, segment 192, caption 128)")
    g.add_argument("--patience", type=int, default=5, help="early stop a phase after this many epochs without a "
                   "better val metric (default 5)")
    g.add_argument("--seed", type=int, default=0, help="split, initialisation, order and augmentation")
    g.add_argument("--threads", type=int, help="CPU threads (default: up to 2; results depend on it)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    g.add_argument("--work-dir", type=Path, help="checkpoints and the report (default REPO/.train/NAME)")
    g.add_argument("--resume", action="store_true", help="continue from the work dir's last checkpoint")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--gate", type=float, help="least val metric to write the model: accuracy / mAP@0.5 / mIoU / "
                   "BLEU-4 (default: classify 1.5 / classes, detect 0.10, segment 0.25, caption 0.05)")
    g = p.add_argument_group("dataset")
    g.add_argument("--strict", action="store_true", help="refuse a dataset with unreadable files (default: skip "
                   "and count them)")
    g.add_argument("--val-fraction", type=float, default=0.2, help="val share drawn when the dataset has no val "
                   "split (default 0.2)")
    g.add_argument("--names", help="segmentation: class names file (one per line, id 0 first) or a comma list")
    g.add_argument("--ignore-index", type=int, default=255, help="segmentation: unlabelled mask value (255)")
    g.add_argument("--min-word-count", type=int, default=2, help="captioning: vocabulary frequency cut (2)")
    g.add_argument("--images", type=Path, help="COCO: the images folder, when not beside the JSON")


def _fail(message: str) -> int:
    print(f"optic export: error: {message}", file=sys.stderr)
    return 2


@dataclass(frozen=True)
class Options:
    task: str
    size: int
    gate: float
    work: Path
    entries: tuple[str, ...]


def run(args: argparse.Namespace) -> int:
    """The command: exit 0 written, 1 refused by a gate (nothing written), 2 a user error, 130 interrupted."""
    from optic.export.datasets import DatasetError
    from optic.export.finetune_loop import Interrupted
    from optic.export.importer import ExportError

    try:
        return _run(args)
    except (DatasetError, ExportError) as exc:
        return _fail(str(exc))
    except Interrupted as exc:
        print(f"\noptic export: interrupted after epoch {exc.epoch} of {exc.total}; the checkpoint is "
              f"{exc.path}: add --resume to continue", file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # reading the dataset, or exporting (the model files are written atomically, last)
        print("\noptic export: interrupted outside the training epochs; run again (with --resume once a "
              "checkpoint exists)", file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED


def _check_flags(args: argparse.Namespace, task: str) -> Options:
    from optic.export.importer import ExportError, check_name

    name = check_name(args.name)
    entries = (f"{name}_encoder", f"{name}_decoder") if task == "caption" else (name,)
    for entry in entries:
        check_name(entry)
    size = args.size or DEFAULT_SIZE[task]
    if size % 32 or not 64 <= size <= 1024:
        raise ExportError(f"--size {size} must be a multiple of 32 from 64 to 1024")
    for flag in ("epochs", "head_epochs", "patience", "batch_size", "width", "depth", "neck"):
        low = 2 if flag == "batch_size" else 1 if flag in ("patience", "width", "depth", "neck") else 0
        if getattr(args, flag) < low:
            raise ExportError(f"--{flag.replace('_', '-')} must be at least {low}")
    if args.epochs + args.head_epochs < 1:
        raise ExportError("--epochs and --head-epochs are both 0: nothing to train")
    if not (args.lr > 0 and args.finetune_lr_factor > 0):
        raise ExportError("--lr and --finetune-lr-factor must be positive")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ExportError("--device cuda: no CUDA device is available to torch")
    if args.gate is not None and not 0 <= args.gate <= 1:
        raise ExportError(f"--gate {args.gate} must be in [0, 1]")
    work = args.work_dir or args.out / ".train" / name
    return Options(task, size, args.gate if args.gate is not None else -1.0, work, entries)


def resolve_source(args: argparse.Namespace) -> Any:
    """``--from`` (and ``--weights``) -> :class:`optic.export.finetune_net.Source`."""
    from optic.export.finetune_net import TORCHVISION_BACKBONES, Source
    from optic.export.importer import ExportError

    trunk = args.out / "trunk.pt"
    choice = args.source
    if choice is None:
        choice = "optic" if trunk.is_file() else "none"
    if args.weights is not None and choice not in TORCHVISION_BACKBONES:
        raise ExportError(f"--weights is for a torchvision --from ({', '.join(TORCHVISION_BACKBONES)})")
    if choice in ("none", "scratch"):
        return Source("none", "none")
    if choice in TRUNK_NAMES:
        if not trunk.is_file():
            raise ExportError(f"--from {choice}: {trunk} does not exist (`optic export all` writes it); pass a "
                              "trunk.pt path, a torchvision backbone with --weights, or --from none")  # fmt: skip
        return Source("optic", choice, trunk)
    if choice in TORCHVISION_BACKBONES:
        if args.weights is None:
            raise ExportError(f"--from {choice} needs --weights PATH (a state_dict; nothing is downloaded)")
        if not args.weights.is_file():
            raise ExportError(f"--weights {args.weights}: no such file")
        return Source("torchvision", choice, args.weights)
    path = Path(choice)
    if path.is_file():
        return Source("optic", path.name, path)
    raise ExportError(f"--from {choice}: not optic/a default model name, a trunk.pt file, a torchvision backbone "
                      f"({', '.join(TORCHVISION_BACKBONES)}) or none")  # fmt: skip


def _names_arg(value: str | None) -> Any:
    if value is None:
        return None
    return value if Path(value).is_file() or "," not in value else [n.strip() for n in value.split(",") if n.strip()]


def _fingerprint(ds: Any, source: Any, args: argparse.Namespace, opts: Options) -> str:
    """What makes a run this run: resuming another's checkpoint is refused."""
    h = hashlib.sha256()
    for s in (*ds.train, *ds.val):
        h.update(str(s.path).encode())
    flags = {k: v for k, v in vars(args).items() if k in ("head_epochs", "epochs", "lr", "finetune_lr_factor",
             "weight_decay", "batch_size", "seed", "width", "depth", "neck", "ignore_index", "patience")}  # fmt: skip
    h.update(json.dumps([opts.task, opts.size, list(ds.names), list(ds.vocab or ()), source.kind, source.name,
                         flags], sort_keys=True).encode())  # fmt: skip
    if source.path is not None:
        h.update(hashlib.sha256(source.path.read_bytes()).digest())
    return h.hexdigest()[:24]


def _run(args: argparse.Namespace) -> int:
    from optic.export.datasets import load_dataset
    from optic.server.metadata import task_short_name

    started = time.monotonic()
    task = task_short_name(args.task)
    opts = _check_flags(args, task)
    source = resolve_source(args)
    ds = load_dataset(task, args.data, seed=args.seed, val_fraction=args.val_fraction, strict=args.strict,
                      names=_names_arg(args.names), ignore_index=args.ignore_index,
                      min_word_count=args.min_word_count, images_dir=args.images)  # fmt: skip
    for line in ds.summary():
        print(line, flush=True)
    if task == "segment" and len(ds.names) < 2:
        raise _error(f"{args.data}: segmentation needs at least 2 class names (background first)")
    if task != "caption" and len(ds.names) < 2:
        raise _error(f"{args.data}: {len(ds.names)} class; training needs at least 2")
    return _train_and_write(args, opts, source, ds, started)


def _error(message: str) -> Exception:
    from optic.export.importer import ExportError

    return ExportError(message)


def _train_and_write(args: argparse.Namespace, opts: Options, source: Any, ds: Any, started: float) -> int:
    import numpy as np
    import torch

    from optic.export import finetune_data as fd
    from optic.export import finetune_export as fe
    from optic.export import finetune_loop as fl
    from optic.export.finetune_eval import METRIC_WORDS, Evaluator, torch_predictor
    from optic.export.finetune_net import IMAGENET_MEAN, IMAGENET_STD, build_net
    from optic.export.train import seed_everything
    from optic.server.metadata import InputSpec

    task = opts.task
    seed_everything(args.seed, args.threads)
    spec = InputSpec(size=(opts.size, opts.size), resize="letterbox", scale=1.0 / 255.0)
    if source.kind == "torchvision":
        spec = replace(spec, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    vocab = tuple(ds.vocab or ())
    max_tokens = 0
    if task == "caption":
        from optic.export.datasets import tokenize

        longest = max(len(tokenize(c)) for s in ds.train for c in s.captions)
        max_tokens = min(MAX_TOKENS, longest + 2)
    net, frozen = build_net(task, ds.names, vocab, source, args.width, args.depth, args.neck, args.seed)
    progress = not args.no_progress
    train = fd.load_split(ds, "train", spec, args.ignore_index, max_tokens, progress)
    val = fd.load_split(ds, "val", spec, args.ignore_index, max_tokens, progress)
    aug = fd.AUGMENT[task]
    if task == "caption":
        aug = replace(aug, swap=fd.caption_swaps(vocab))
    batches = fd.Batches(task, train, spec, args.ignore_index, spec.pad_value, aug)
    evaluator = Evaluator(task, ds.names, spec, val, ds.val, args.ignore_index, vocab, max(1, max_tokens - 1))
    models = fe.wrappers(net, task, spec)
    plan = fl.Plan(task, opts.size, args.batch_size, args.lr, args.head_epochs, args.epochs,
                   args.finetune_lr_factor, args.weight_decay, args.patience, args.seed, args.ignore_index,
                   source.pretrained, _fingerprint(ds, source, args, opts))  # fmt: skip
    gate = opts.gate
    if gate < 0:
        gate = DEFAULT_GATE[task] or min(1.0, 1.5 / len(ds.names))
    phases = ", ".join(f"{n} {e} epochs at lr {lr:.2g}" for n, e, lr in plan.phases())
    print(f"from: {source.label}; {phases}; input "
          f"{opts.size}x{opts.size} letterbox; gate: val {METRIC_WORDS[evaluator.metric]} >= {gate:.2f}", flush=True)
    ckpt = opts.work / fl.CHECKPOINT
    resume = None
    if args.resume:
        if not ckpt.is_file():
            raise _error(f"--resume: no checkpoint at {ckpt}; run without --resume to start")
        try:
            resume = fl.load(ckpt, plan, fl.modules_used(net, task))
        except ValueError as exc:
            raise _error(str(exc)) from None
        print(f"resuming after epoch {resume.epoch} (best val {resume.best_metric:.4f} at epoch "
              f"{resume.best_epoch})", flush=True)  # fmt: skip
    elif ckpt.is_file():
        print(f"note: starting over; {ckpt} is replaced (--resume continues a run)", flush=True)

    def validate() -> float:
        return evaluator.score(torch_predictor(*models)).metric

    device = torch.device(args.device)
    if device.type != "cpu":
        net.to(device)
        batches = _OnDevice(batches, device)  # type: ignore[assignment]
        validate = _on_cpu(net, validate)
    state = fl.train(net, frozen, plan, batches, len(train), validate, opts.work, resume, progress,
                     lambda s: print(s, flush=True))  # fmt: skip
    net.cpu().eval()
    history = state.history or []
    print(f"trained {state.epoch} epochs ({state.seconds:.0f}s); best val {METRIC_WORDS[evaluator.metric]} "
          f"{state.best_metric:.4f} at epoch {state.best_epoch}", flush=True)  # fmt: skip
    sample = torch.from_numpy(np.random.default_rng(args.seed).uniform(0, 1, (2, 3, *spec.size)).astype(np.float32))
    report, evaluation = fe.export(args, opts, ds, spec, net, models, evaluator, gate, sample, source, state,
                                 phases, started)  # fmt: skip
    from optic.export.report import write_report

    summary = [*ds.summary(), "", f"from: {source.label}; {phases}; input {opts.size}x{opts.size}; "
               f"{state.epoch} epochs, best at epoch {state.best_epoch}; seed {args.seed}",
               report.summary()]  # fmt: skip
    files = write_report(opts.work / "report", title=f"{args.name}: {task} trained on {args.data}", names=ds.names,
                         history=history, evaluation=evaluation, summary=summary)  # fmt: skip
    print(report.summary(), flush=True)
    if not report.written:
        print(f"report: {files[0]} (nothing written into {args.out})")
        return 1
    target = args.out / opts.entries[0] / "report"
    shutil.copytree(opts.work / "report", target, dirs_exist_ok=True)
    print(f"report: {target / 'report.md'} ({', '.join(p.name for p in files[2:])})")
    return 0


class _OnDevice:
    """Batches moved to the training device."""

    def __init__(self, inner: Any, device: Any) -> None:
        self.inner, self.device = inner, device

    def __call__(self, *a: Any, **k: Any) -> dict[str, Any]:
        return {key: v.to(self.device) for key, v in self.inner(*a, **k).items()}


def _on_cpu(net: Any, fn: Any) -> Any:
    """Validation runs on CPU (the served path); the net goes back to the device afterwards."""

    def run() -> float:
        device = next(net.parameters()).device
        net.cpu()
        try:
            return float(fn())
        finally:
            net.to(device)

    return run
