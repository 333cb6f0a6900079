"""The model repository: Triton's layout, discovered at start-up.

``<repo>/<name>/<version>/model.onnx``; the highest numeric version is served.
Everything the server needs is read from the ONNX file itself (inputs,
outputs, whether axis 0 is a batch axis, ``metadata_props``). Request fields
are only ever used as dictionary keys here, never to build a path.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from server.errors import NotFound, Unavailable
from server.metadata import MetadataError, ModelMeta
from server.metrics import MODEL_READY, ModelMetrics
from server.runtime import OnnxModel, RuntimeOptions, TensorSpec
from server.scheduler import BatchingConfig, DynamicBatcher

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass
class ServedModel:
    name: str
    version: str
    runtime: OnnxModel
    meta: ModelMeta
    batching: BatchingConfig
    batcher: DynamicBatcher
    executor: ThreadPoolExecutor = field(repr=False)

    @property
    def max_batch_size(self) -> int:
        return self.batching.max_batch_size

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.runtime.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.runtime.outputs


@dataclass(frozen=True)
class LoadError:
    name: str
    version: str
    message: str


class ModelRepository:
    """Loads every model under ``root`` and hands them out by name (and optional version)."""

    def __init__(self, root: Path, runtime: RuntimeOptions, batching: BatchingConfig) -> None:
        self.root = root
        self.runtime_options = runtime
        self.batching = batching
        self.models: dict[str, ServedModel] = {}
        self.errors: list[LoadError] = []

    def discover(self) -> list[tuple[str, str, Path]]:
        """(name, version, path) of the version to serve for each model directory."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        found = []
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not MODEL_NAME.match(model_dir.name):
                log.warning("skipping %s: not a valid model name", model_dir)
                continue
            versions = sorted(
                (int(v.name) for v in model_dir.iterdir() if v.name.isdigit() and (v / MODEL_FILE).is_file()),
            )
            if not versions:
                log.warning("skipping %s: no <version>/%s inside", model_dir, MODEL_FILE)
                continue
            version = str(versions[-1])
            found.append((model_dir.name, version, model_dir / version / MODEL_FILE))
        return found

    def load_all(self) -> None:
        """Load what :meth:`discover` finds; a model that fails is logged and skipped, not fatal."""
        for name, version, path in self.discover():
            try:
                self.models[name] = self._load(name, version, path)
                MODEL_READY.labels(name, version).set(1)
                log.info("loaded %s version %s (%s)", name, version, ", ".join(self.models[name].runtime.providers))
            except (MetadataError, ValueError, RuntimeError, OSError) as exc:
                self.errors.append(LoadError(name, version, f"{path}: {exc}"))
                log.error("failed to load %s version %s from %s: %s", name, version, path, exc)

    def _load(self, name: str, version: str, path: Path) -> ServedModel:
        runtime = OnnxModel(path, self.runtime_options)
        meta = ModelMeta.from_props(runtime.metadata_props)
        batching = self.batching if runtime.batchable else replace(self.batching, max_batch_size=0)
        warm = [1] + ([batching.max_batch_size] if batching.max_batch_size > 1 else [])
        runtime.warmup(warm)
        executor = ThreadPoolExecutor(max_workers=max(1, batching.instances), thread_name_prefix=f"ort-{name}")
        batcher = DynamicBatcher(name, runtime.run, batching, executor, ModelMetrics(name))
        return ServedModel(name, version, runtime, meta, batching, batcher, executor)

    def start(self) -> None:
        for model in self.models.values():
            model.batcher.start()

    async def close(self) -> None:
        for model in self.models.values():
            await model.batcher.close()
            model.executor.shutdown(wait=True)
            MODEL_READY.labels(model.name, model.version).set(0)

    @property
    def ready(self) -> bool:
        """Every model found on disk loaded (Triton's meaning of server readiness)."""
        return bool(self.models) and not self.errors

    def get(self, name: str, version: str = "") -> ServedModel:
        model = self.models.get(name)
        if model is None:
            failed = next((e for e in self.errors if e.name == name), None)
            if failed is not None:
                raise Unavailable(f"model {name!r} failed to load: {failed.message}")
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"unknown model {_printable(name)}; this server has: {known}")
        if version and version != model.version:
            raise NotFound(f"model {name!r} has no version {_printable(version)}; serving version {model.version}")
        return model

    def metric_label(self, name: str) -> str:
        """``name`` if it is a loaded model, else "" (bounded label cardinality)."""
        return name if name in self.models else ""


def _printable(text: str, limit: int = 64) -> str:
    """Quote a client-supplied string safely for messages and logs."""
    return repr(text[:limit] + ("…" if len(text) > limit else ""))
