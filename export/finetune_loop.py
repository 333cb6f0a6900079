"""The two-phase training loop of ``optic export train``: checkpoints every epoch, early stopping, resume.

Phase ``head`` trains the new head on frozen pretrained modules; phase ``finetune`` unfreezes everything at a
lower learning rate; without pretrained weights there is one phase, ``scratch``, of both phases' epochs. Each
epoch's batches, order and augmentation come from generators seeded by (seed, epoch), so a run resumed from its
last checkpoint (model, optimiser, history, best weights) ends in the same bytes as one never interrupted.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from optic.export.finetune_data import Batches
from optic.export.finetune_eval import METRIC_WORDS
from optic.export.finetune_net import loss, modules_used, precise_batchnorm, set_frozen, trainable
from optic.export.models import ShapeNet
from optic.export.report import EpochRecord

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "optic-train-checkpoint/1"
FINAL_LR = 0.05  # the cosine schedule ends each phase at this share of its learning rate


@dataclass(frozen=True)
class Plan:
    """What the loop does; ``fingerprint`` ties a checkpoint to the run it came from."""

    task: str
    size: int
    batch_size: int
    lr: float
    head_epochs: int
    epochs: int
    finetune_lr_factor: float
    weight_decay: float
    patience: int
    seed: int
    ignore: int
    pretrained: bool
    fingerprint: str

    def phases(self) -> list[tuple[str, int, float]]:
        """(name, epochs, learning rate) of each phase that has epochs."""
        if not self.pretrained:
            phases = [("scratch", self.head_epochs + self.epochs, self.lr)]
        else:
            phases = [("head", self.head_epochs, self.lr), ("finetune", self.epochs, self.lr * self.finetune_lr_factor)]
        return [p for p in phases if p[1] > 0]


class Interrupted(Exception):
    """Ctrl-C during training: the last checkpoint (``epoch`` epochs done) resumes the run."""

    def __init__(self, epoch: int, total: int, path: Path) -> None:
        super().__init__(f"interrupted after epoch {epoch} of {total}; checkpoint {path}")
        self.epoch, self.total, self.path = epoch, total, path


@dataclass
class State:
    phase: int = 0  # index into plan.phases()
    phase_epoch: int = 0  # epochs done in that phase
    epoch: int = 0  # epochs done in all
    bad: int = 0  # epochs since the phase's best
    history: list[EpochRecord] | None = None
    best_metric: float = -math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    seconds: float = 0.0


def save(path: Path, plan: Plan, model: nn.Module, state: State) -> None:
    """Atomically: a Ctrl-C while saving leaves the previous checkpoint whole."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": plan.fingerprint,
        "model": model.state_dict(),
        **{k: v for k, v in asdict(state).items() if k != "history"},
        "history": [asdict(r) for r in state.history or []],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load(path: Path, plan: Plan, model: nn.Module) -> State:
    """The checkpoint's state, its weights loaded into ``model``; ValueError when it is another run's."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an optic export train checkpoint")
    if payload["fingerprint"] != plan.fingerprint:
        raise ValueError(f"{path}: the checkpoint is of another run (different data, task, model or flags); "
                         "run without --resume to start over")  # fmt: skip
    model.load_state_dict(payload["model"])
    fields = {k: payload[k] for k in State.__dataclass_fields__ if k in payload and k != "history"}
    return State(**fields, history=[EpochRecord(**r) for r in payload["history"]])


def _lr(base: float, step: int, steps: int) -> float:
    return base * (FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))


def train(
    net: ShapeNet,
    frozen: list[nn.Module],
    plan: Plan,
    batches: Batches,
    n_train: int,
    validate: Callable[[], float],
    work: Path,
    resume: State | None,
    progress: bool,
    say: Callable[[str], None],
) -> State:
    """Run (or finish) the plan's phases; returns the final state, the best epoch's weights loaded into ``net``."""
    used = modules_used(net, plan.task)
    state = resume or State(history=[])
    history = state.history if state.history is not None else []
    state.history = history
    phases = plan.phases()
    steps = max(1, n_train // plan.batch_size + (n_train % plan.batch_size > 1))
    total_epochs = sum(n for _, n, _ in phases)
    done_steps = sum(n for _, n, _ in phases[: state.phase]) * steps + state.phase_epoch * steps
    ckpt = work / CHECKPOINT
    if resume is None:
        save(ckpt, plan, used, state)  # epoch 0: even an interrupt in the first epoch leaves a checkpoint
    saved = state.epoch  # what the checkpoint on disk holds
    bar = tqdm(total=total_epochs * steps, initial=done_steps, desc=f"train {plan.task}", unit="batch",
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    metric_words = METRIC_WORDS.get(_metric_name(plan.task), "val")
    note = bar.write if progress else say  # lines above the bar, not through it
    try:
        while state.phase < len(phases):
            name, n_epochs, base_lr = phases[state.phase]
            set_frozen(frozen, name == "head")
            opt = torch.optim.AdamW(trainable(net, plan.task), lr=base_lr, weight_decay=plan.weight_decay)
            if state.optimizer is not None:
                opt.load_state_dict(state.optimizer)
            while state.phase_epoch < n_epochs and state.bad < plan.patience:
                started = time.monotonic()
                epoch = state.epoch + 1
                g = torch.Generator().manual_seed(plan.seed * 100_003 + epoch)
                torch.manual_seed(plan.seed * 100_003 + epoch)
                order = np.random.default_rng([plan.seed, epoch]).permutation(n_train)
                used.train()
                set_frozen(frozen, name == "head")
                running = 0.0
                for s in range(steps):
                    idx = order[s * plan.batch_size : (s + 1) * plan.batch_size]
                    if len(idx) < 2:
                        continue  # BatchNorm needs two samples
                    for group in opt.param_groups:
                        group["lr"] = _lr(base_lr, state.phase_epoch * steps + s, n_epochs * steps)
                    value = loss(net, plan.task, batches(idx, g), plan.size, plan.ignore)
                    opt.zero_grad(set_to_none=True)
                    value.backward()
                    nn.utils.clip_grad_norm_(trainable(net, plan.task), 10.0)
                    opt.step()
                    running += float(value.detach()) * len(idx)
                    bar.update(1)
                    mean = running / min(n_train, (s + 1) * plan.batch_size)
                    bar.set_postfix_str(f"{name} {epoch}/{total_epochs} loss {mean:.3f}", refresh=False)
                precise_batchnorm(net, plan.task, batches, n_train, plan.batch_size)
                used.eval()
                metric = validate()
                seconds = time.monotonic() - started
                state.seconds += seconds
                state.epoch, state.phase_epoch = epoch, state.phase_epoch + 1
                record = EpochRecord(epoch, name, running / n_train, metric, base_lr, round(seconds, 2))
                history.append(record)
                better = metric > state.best_metric
                if better:
                    state.best_metric, state.best_epoch, state.bad = metric, epoch, 0
                    state.best_state = copy.deepcopy(used.state_dict())
                else:
                    state.bad += 1
                state.optimizer = opt.state_dict()
                save(ckpt, plan, used, state)
                saved = state.epoch
                line = (f"epoch {epoch}/{total_epochs} {name}: loss {record.train_loss:.4f}, val {metric_words} "
                        f"{metric:.4f}{' (best)' if better else ''}, {seconds:.1f}s")  # fmt: skip
                note(line)
            if state.bad >= plan.patience and state.phase_epoch < n_epochs:
                note(f"early stop: no better val {metric_words} for {plan.patience} epochs ({name} phase)")
            state.phase, state.phase_epoch, state.bad, state.optimizer = state.phase + 1, 0, 0, None
            save(ckpt, plan, used, state)
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(saved, total_epochs, ckpt) from None
    if bar.total is not None and bar.n < bar.total:  # stopped early: the bar ends full, not stuck part-way
        bar.total = bar.n
        bar.refresh()
    bar.close()
    if state.best_state is not None:
        used.load_state_dict(state.best_state)
    used.eval()
    return state


def _metric_name(task: str) -> str:
    from optic.export.finetune_eval import METRIC

    return METRIC[task]
