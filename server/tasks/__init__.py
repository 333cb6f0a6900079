"""One module per task, each owning its whole life (see ``base.Task``); this is their registry.

The Vision API finds a model's task here by the model's ``optic.task``; the
client side (``optic infer``, the typed client, ``optic bench``) finds it by
name. Short and long names are both accepted (``detect`` and ``detection``).
"""

from __future__ import annotations

from optic.server.metadata import ModelMeta, task_short_name
from optic.server.tasks import caption, classify, detect, instances, segment
from optic.server.tasks.base import Task

TASKS: dict[str, Task] = {t.name: t for t in (classify.TASK, detect.TASK, segment.TASK, instances.TASK, caption.TASK)}


def task_named(name: str) -> Task:
    """The task by its short or long name; KeyError names the known ones."""
    short = task_short_name(name)
    if short not in TASKS:
        raise KeyError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[short]


def task_of(meta: ModelMeta) -> Task | None:
    """The task a model declares, or None for a plain tensor model."""
    return TASKS.get(task_short_name(meta.task)) if meta.task else None


def tasks_of_rpc(rpc: str) -> list[Task]:
    return [t for t in TASKS.values() if t.rpc == rpc]
