"""``optic export``: build models into a repository. Imports torch, so the server never loads this."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MODELS = ("classifier",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=[*MODELS, "all"], help="which model to build")
    parser.add_argument("--out", type=Path, default=Path("model_repo"), help="model repository to write into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="override the recipe's epoch count")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    try:
        from export import classifier
    except ImportError as exc:  # torch and tqdm come with the extra, not with the server
        print(f"optic export needs the export extra (pip install -e '.[export]'): {exc}", file=sys.stderr)
        return 2

    recipe = classifier.ClassifierRecipe(seed=args.seed)
    if args.epochs:
        recipe = replace(recipe, epochs=args.epochs)
    report = classifier.build(args.out, recipe, progress=not args.no_progress)
    print(report.summary())
    return 0 if report.written else 1
