"""A small supervised training loop shared by the recipes: CPU, deterministic, with a progress bar."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Same seed, same thread count -> the same weights, run after run on CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05


def train_classifier(
    model: nn.Module,
    epoch_data: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps_per_epoch: int,
    config: TrainConfig,
    evaluate: Callable[[nn.Module], float] | None = None,
    progress: bool = True,
) -> list[float]:
    """Train on fresh data each epoch (``epoch_data(epoch)``); returns the held-out score per epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.epochs * steps_per_epoch)
    history: list[float] = []
    bar = tqdm(total=config.epochs * steps_per_epoch, desc="classifier", unit="step", disable=not progress)
    for epoch in range(config.epochs):
        x, y = epoch_data(epoch)
        model.train()
        perm = torch.randperm(len(x))
        for step in range(steps_per_epoch):
            idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx], label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        if evaluate is not None:
            history.append(evaluate(model))
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", heldout=f"{history[-1]:.4f}")
    bar.close()
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()
