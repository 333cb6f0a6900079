"""The model repository: Triton's layout, versions, and the load / unload / poll lifecycle.

``<repo>/<name>/<version>/model.onnx`` with an optional ``<repo>/<name>/config.pbtxt``.
Loading builds every selected version completely (session, warm-up, batcher)
off the event loop, then swaps the model's version table in one assignment,
so requests see either the old versions or the new ones, never a mix or a
gap. Replaced versions finish what they hold before their batchers close. A
load that fails leaves whatever was serving untouched and records the reason
for RepositoryIndex and the log.

Request fields are only ever compared with names found by listing the
repository, never joined onto a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from optic.proto.inference import model_config_pb2 as mc
from optic.server import config as cfgmod
from optic.server.errors import NotFound, OpticError, Unavailable
from optic.server.metadata import MODEL_NAME, ModelMeta
from optic.server.metrics import MODEL_LOAD_FAILURES, MODEL_READY, ModelStats
from optic.server.outputs import OutputMismatch, check_outputs
from optic.server.overrides import LoadOverride
from optic.server.runtime import OnnxModel, RuntimeOptions, TensorSpec
from optic.server.scheduler import BatchingConfig, DynamicBatcher, SlotExecutor, Tensors
from optic.server.tensors import DATATYPES

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CONTROL_MODES = ("none", "explicit", "poll")
_PLAIN_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION = re.compile(r"^[0-9]{1,18}$")


class LoadFailed(OpticError):
    code = "INVALID_ARGUMENT"  # Triton's status for a model that cannot be loaded


class LoadTimeout(RuntimeError):
    """A load (session creation and warm-up) that outlived --model-load-timeout."""


class _Ticket:
    """One load's sessions, so an abandoned load can stop their runs from the event loop."""

    def __init__(self) -> None:
        self.cancelled = False
        self._models: list[OnnxModel] = []
        self._lock = threading.Lock()

    def track(self, model: OnnxModel) -> OnnxModel:
        with self._lock:
            self._models.append(model)
            if self.cancelled:
                model.terminate()
        return model

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            for model in self._models:
                model.terminate()


def _queue_size(batcher: DynamicBatcher) -> Callable[[], int]:
    """The queue-size gauge's reading, holding the batcher weakly: prometheus-client keeps a gauge's function in a
    reference cycle of its own (the child's bound ``_child_samples``), so a removed gauge kept the unloaded model's
    batcher, and through it its onnxruntime sessions, alive until a full collection."""
    ref = weakref.ref(batcher)

    def size() -> int:
        alive = ref()
        return 0 if alive is None else alive.queued

    return size


def _discard(work: asyncio.Future[dict[str, ServedModel]]) -> None:
    """An abandoned load that finished after all: drop what it built."""
    if work.cancelled() or work.exception() is not None:
        return
    for model in work.result().values():
        model.executor.shutdown(wait=False)


@dataclass(eq=False)  # identity: versions are kept in sets while they retire
class ServedModel:
    name: str
    version: str
    runtime: OnnxModel
    meta: ModelMeta
    config: mc.ModelConfig  # the effective configuration
    batching: BatchingConfig
    batcher: DynamicBatcher
    executor: SlotExecutor = field(repr=False)
    stats: ModelStats = field(repr=False)
    queue_timeout: float | None = None  # the queue policy's default timeout, seconds
    reject_on_timeout: bool = True
    holders: int = 0  # requests that got this version and may still queue on it
    released: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # set while holders == 0

    def __post_init__(self) -> None:
        self.released.set()

    @property
    def max_batch_size(self) -> int:
        return self.batching.max_batch_size

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.runtime.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.runtime.outputs

    async def infer(self, inputs: Tensors, client_timeout: float | None, queue_timeout: float | None = None) -> Tensors:
        """Queue on this version's batcher under the tighter of the client's deadline and the queue timeout.

        ``queue_timeout`` (a request's own, where the policy allows overriding)
        replaces the policy's default timeout.
        """
        timeout = client_timeout
        policy = queue_timeout if queue_timeout is not None else self.queue_timeout
        if policy is not None and self.reject_on_timeout:
            timeout = policy if timeout is None else min(timeout, policy)
        started = time.monotonic()
        samples = next(iter(inputs.values())).shape[0] if self.max_batch_size and inputs else 1
        try:
            outputs = await self.batcher.infer(inputs, timeout)
        except (OpticError, asyncio.CancelledError):
            self.stats.observe_request(False, samples, time.monotonic() - started)
            raise
        self.stats.observe_request(True, samples, time.monotonic() - started)
        return outputs


@dataclass
class ModelState:
    """What the repository knows about one model directory, loaded or not."""

    signature: tuple = ()  # files last attempted (path, mtime, size), for polling
    error: str = ""  # the last load's failure, "" when it succeeded
    failed_versions: tuple[str, ...] = ()
    reason: str = ""  # why nothing is loaded (unloaded, not requested)
    override: LoadOverride | None = None  # the RepositoryModelLoad overrides the serving versions came from


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str  # READY, UNAVAILABLE
    reason: str = ""


class ModelRepository:
    """Versions of every model under ``root``, handed out by name and version."""

    def __init__(
        self,
        root: Path,
        runtime: RuntimeOptions,
        batching: BatchingConfig,
        *,
        control_mode: str = "none",
        startup_models: tuple[str, ...] = ("*",),
        poll_seconds: float = 5.0,
        queue_timeout: float | None = None,
        load_timeout: float = 120.0,
        load_threads: int = 2,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if control_mode not in CONTROL_MODES:
            raise ValueError(f"model control mode {control_mode!r}; expected one of {', '.join(CONTROL_MODES)}")
        self.root = root
        self.runtime_options = runtime
        self.defaults = cfgmod.Defaults(batching, queue_timeout)
        self.control_mode = control_mode
        self.startup_models = startup_models
        self.poll_seconds = poll_seconds
        self.versions: dict[str, dict[str, ServedModel]] = {}
        self.states: dict[str, ModelState] = {}
        self.started = False  # the start-up set has been attempted (ready is false until then)
        self.load_timeout = load_timeout  # seconds for a load (sessions + warm-up) before it is abandoned
        # Loads run in a pool: one model that takes long never holds the others (nor explicit loads) back.
        self._loader = ThreadPoolExecutor(max_workers=max(1, load_threads), thread_name_prefix="model-loader")
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._retired: set[ServedModel] = set()  # retired, still finishing what they hold
        self._tickets: set[_Ticket] = set()  # loads in progress
        self._poller: asyncio.Task[None] | None = None
        self._poll_loads: dict[str, asyncio.Task[None]] = {}  # loads a scan started, by model name
        # Called on the event loop, at most once per turn of it, after the start-up set, after a load swapped versions
        # in or failed, after an abandoned build finished and after a retired version was released (the server
        # settles its heap there: app.settle_heap); never while closing.
        self._on_change = on_change
        self._change_pending = False
        self._closing = False

    # ------------------------------------------------------------------ discovery

    def model_dirs(self) -> dict[str, Path]:
        """Model directories by name, found by listing ``root`` (the only source of paths)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        found = {}
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if MODEL_NAME.match(d.name):
                found[d.name] = d
            else:
                log.warning("skipping %s: not a valid model name", d)
        return found

    @staticmethod
    def _version_files(model_dir: Path, filename: str) -> dict[int, Path]:
        """Version directories: ASCII digits only, as Triton (``str.isdigit`` also takes "²", which ``int`` does
        not); any other directory is ignored."""
        return {
            int(v.name): v / filename
            for v in model_dir.iterdir()
            if _VERSION.match(v.name) and (v / filename).is_file()
        }

    def _signature(self, model_dir: Path) -> tuple:
        files = [model_dir / cfgmod.CONFIG_FILE, *sorted(model_dir.glob("[0-9]*/*.onnx"))]
        sig = []
        for f in files:
            with contextlib.suppress(OSError):
                st = f.stat()
                sig.append((str(f.relative_to(model_dir)), st.st_mtime_ns, st.st_size))
        return tuple(sig)

    # ------------------------------------------------------------------ building (worker thread)

    def _build(
        self, name: str, model_dir: Path, ticket: _Ticket, file: cfgmod.FileConfig | None = None
    ) -> dict[str, ServedModel]:
        file = file or cfgmod.read(model_dir)
        if file.ignored:
            log.warning("%s/config.pbtxt: ignoring fields Optic does not support: %s", name, ", ".join(file.ignored))
        filename = file.config.default_model_filename or MODEL_FILE
        if not _PLAIN_FILE.match(filename):
            raise cfgmod.ConfigError(f"default_model_filename {filename!r} must be a plain file name")
        available = self._version_files(model_dir, filename)
        if not available:
            raise cfgmod.ConfigError(f"no <version>/{filename} inside {model_dir}")
        built: dict[str, ServedModel] = {}
        try:
            for number in cfgmod.select_versions(file.config, sorted(available)):
                built[str(number)] = self._build_version(name, str(number), available[number], file, model_dir, ticket)
        except Exception:
            for model in built.values():
                model.executor.shutdown(wait=False)
            raise
        return built

    def _build_version(
        self, name: str, version: str, path: Path, file: cfgmod.FileConfig, model_dir: Path, ticket: _Ticket
    ) -> ServedModel:
        options = self.runtime_options
        threads = cfgmod.intra_op_threads(file.config, name, options.run_threads())
        defaults = self.defaults
        if threads:
            options = replace(options, intra_op_threads=threads)
            # As with --intra-op-threads: one batch at a time unless the file says otherwise, since two runs on
            # one session of N threads would oversubscribe the cores.
            defaults = replace(defaults, batching=replace(defaults.batching, instances=1))
        runtime = ticket.track(OnnxModel(path, options))
        effective = cfgmod.effective(file, name, runtime.inputs, runtime.outputs, runtime.batchable, defaults)
        batching, timeout, reject = cfgmod.batching_of(effective)
        batching = replace(batching, adaptive=self.defaults.batching.adaptive)  # a server policy, not in config.pbtxt
        meta = ModelMeta.from_props(runtime.metadata_props)
        spec = meta.input
        image_hw = (spec.size, spec.layout == "NHWC") if spec is not None else (None, False)
        # Warm-up runs at the model's real input size, and its outputs must fit what the metadata says.
        shapes = self._warm_up(runtime, effective, model_dir, image_hw)
        try:
            layout = check_outputs(meta, shapes, f"model {name!r}")
        except OutputMismatch as exc:
            raise cfgmod.ConfigError(str(exc)) from None
        if options.intra_op_threads == 0 and batching.instances > 1:
            # A batch alone runs on all the cores; batches that run beside it share them (runtime.open_narrow_lane).
            for lane in runtime.open_narrow_lane(max(1, runtime.threads // batching.instances), batching.instances):
                self._warm_up(ticket.track(lane), effective, model_dir, image_hw)
        if layout != meta.output_layout:
            meta = replace(meta, output_layout=layout)
        executor = SlotExecutor(batching.instances, f"ort-{name}")
        stats = ModelStats(name, version)
        runtime.on_lane = stats.observe_lane
        batcher = DynamicBatcher(f"{name}:{version}", runtime.run, batching, executor, stats)
        return ServedModel(name, version, runtime, meta, effective, batching, batcher, executor, stats, timeout, reject)

    @staticmethod
    def _warm_up(
        runtime: OnnxModel, config: mc.ModelConfig, model_dir: Path, image_hw: tuple[tuple[int, int] | None, bool]
    ) -> list[tuple[int, ...]]:
        """The configured ``model_warmup`` samples, or zeros at batch 1 and the maximum batch; returns the
        output shapes of the first run."""
        if not config.model_warmup:
            mbs = config.max_batch_size
            return runtime.warmup([1] + ([mbs] if mbs > 1 else []), *image_hw)
        shapes: list[tuple[int, ...]] = []
        rng = np.random.default_rng(0)
        specs = {s.name: s for s in runtime.inputs}
        for warm in config.model_warmup:
            feeds = {}
            for spec in runtime.inputs:
                given = warm.inputs.get(spec.name)
                dims = list(given.dims) if given and given.dims else [d if d > 0 else 1 for d in spec.shape[1:]]
                shape = ([max(1, warm.batch_size)] if config.max_batch_size else []) + dims
                if not config.max_batch_size and not (given and given.dims):
                    shape = [d if d > 0 else 1 for d in spec.shape]
                dtype = DATATYPES[specs[spec.name].datatype]
                source = given.WhichOneof("input_data_type") if given else "zero_data"
                if source == "random_data":
                    feeds[spec.name] = (rng.random(shape) * 2 - 1).astype(dtype)
                elif source == "input_data_file" and given is not None:
                    feeds[spec.name] = _warmup_file(model_dir, given.input_data_file, dtype, shape)
                else:
                    feeds[spec.name] = np.zeros(shape, dtype)
            for _ in range(max(1, warm.count)):
                outputs = runtime.run(feeds)
                shapes = shapes or [tuple(outputs[t.name].shape) for t in runtime.outputs]
        return shapes

    # ------------------------------------------------------------------ lifecycle (event loop)

    async def load(self, name: str, override: LoadOverride | None = None) -> None:
        """(Re)load ``name`` from disk (or from ``override``'s files and config) and swap it in; on failure the
        serving versions stay."""
        try:
            await self._load(name, override)
        except BaseException:
            if override is not None:
                override.discard()
            raise

    async def _load(self, name: str, override: LoadOverride | None) -> None:
        if override is not None and override.directory is not None:
            model_dir = override.directory
        else:
            dirs = await asyncio.to_thread(self.model_dirs)
            found = dirs.get(name)
            if found is None:
                known = ", ".join(dirs) or "nothing"
                raise NotFound(f"no model {printable(name)} in the repository; it has: {known}")
            model_dir = found
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            state = self.states.setdefault(name, ModelState())
            state.signature = self._signature(model_dir)
            started = time.monotonic()
            ticket = _Ticket()
            self._tickets.add(ticket)
            file = override.config if override is not None else None
            work = asyncio.get_running_loop().run_in_executor(self._loader, self._build, name, model_dir, ticket, file)
            try:
                built = await asyncio.wait_for(asyncio.shield(work), self.load_timeout)
            except asyncio.CancelledError:  # the server is stopping: stop the load's runs too
                ticket.cancel()
                work.add_done_callback(_discard)
                raise
            except Exception as exc:  # onnxruntime raises its own types for a bad file
                # The failure's traceback holds the half-built sessions in a cycle: settle once it is dropped.
                self._change_soon()
                if isinstance(exc, TimeoutError):
                    # The build is abandoned: its runs are stopped (a warm-up that never ends frees its thread),
                    # and whatever it still produces is discarded.
                    ticket.cancel()
                    work.add_done_callback(_discard)
                    work.add_done_callback(lambda _: self._change_soon())
                    exc = LoadTimeout(f"loading (session and warm-up) took over {self.load_timeout:g} s; abandoned")
                state.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError | ValueError) else str(exc)
                state.failed_versions = tuple(str(v) for v in sorted(self._version_files(model_dir, MODEL_FILE)))
                MODEL_LOAD_FAILURES.labels(name).inc()
                kept = ", ".join(self.versions.get(name, {})) or "none"
                log.error("failed to load %s (still serving version(s): %s): %s", name, kept, exc)
                raise LoadFailed(f"failed to load model {name!r}: {exc}") from None
            finally:
                self._tickets.discard(ticket)
            for model in built.values():
                model.batcher.start()
                model.stats.track_queue(_queue_size(model.batcher))
            old = self.versions.get(name, {})
            self.versions[name] = built  # the swap: one assignment
            state.error, state.failed_versions, state.reason = "", (), ""
            if state.override is not None and state.override is not override:
                state.override.discard()
            state.override = override
            for version in built:
                MODEL_READY.labels(name, version).set(1)
            log.info(
                "loaded %s version(s) %s in %.2fs (%s)",
                name,
                ", ".join(built),
                time.monotonic() - started,
                ", ".join(next(iter(built.values())).runtime.providers),
            )
            for version, model in old.items():
                self._retire(model, keep_ready=version in built)
            self._change_soon()

    def _change_soon(self) -> None:
        """``on_change`` on a later turn of the loop, once however many changes ask for it meanwhile."""
        if self._on_change is None or self._change_pending or self._closing:
            return
        self._change_pending = True
        asyncio.get_running_loop().call_soon(self._changed)

    def _changed(self) -> None:
        self._change_pending = False
        if self._on_change is None or self._closing:
            return
        try:
            self._on_change()
        except Exception:  # the swap is done and stays done
            log.exception("after a model change: on_change failed")

    async def unload(self, name: str) -> None:
        if name not in self.versions:
            if name in self.states or name in self.model_dirs():
                return  # already not loaded: nothing to do, as Triton
            raise NotFound(f"no model {printable(name)} to unload")
        old = self.versions.pop(name)
        state = self.states.setdefault(name, ModelState())
        state.reason = "unloaded"
        if state.override is not None:
            state.override.discard()
            state.override = None
        for model in old.values():
            self._retire(model, keep_ready=False)
        log.info("unloaded %s", name)

    def _retire(self, model: ServedModel, keep_ready: bool) -> None:
        self._retired.add(model)

        async def drain() -> None:
            await model.released.wait()
            await model.batcher.close()
            model.executor.shutdown(wait=False)
            self._retired.discard(model)
            # Its series are shared with any live version of the same number: one loaded again while this one
            # drained (an unload, then a load, while a request held it) keeps them.
            if not keep_ready and model.version not in self.versions.get(model.name, {}):
                model.stats.retire()
                MODEL_READY.labels(model.name, model.version).set(0)

        task = asyncio.get_running_loop().create_task(drain())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        # On a later turn of the loop: by then the finished drain holds the model no more.
        task.add_done_callback(lambda _: self._change_soon())

    async def start(self) -> None:
        """Load the start-up set (all, or ``startup_models`` in explicit mode); failures are logged, not fatal."""
        dirs = self.model_dirs()
        wanted = list(dirs) if self.control_mode != "explicit" or "*" in self.startup_models else []
        if self.control_mode == "explicit":
            wanted += [m for m in self.startup_models if m != "*" and m not in wanted]
        for name in dirs:
            self.states.setdefault(name, ModelState(reason="not loaded (explicit mode)"))

        async def quietly(name: str) -> None:
            with contextlib.suppress(OpticError):
                await self.load(name)

        await asyncio.gather(*(quietly(name) for name in wanted))
        self.started = True
        self._change_soon()  # one more, joined with the last load's: also when nothing loaded (start-up's own objects)
        if self.control_mode == "poll":
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever(), name="repository-poll")

    async def poll_once(self, wait: bool = True) -> None:
        """Load new or changed models, unload removed ones.

        Each load runs on its own, so a model whose load hangs (until ``load_timeout``) holds back neither the
        others nor the next scans; a model still loading from an earlier scan is left to finish. ``wait``: return
        only when this scan's loads are done (the poller itself does not wait)."""
        dirs = await asyncio.to_thread(self.model_dirs)
        started: list[asyncio.Task[None]] = []
        for name, model_dir in dirs.items():
            if name in self._poll_loads:
                continue
            state = self.states.get(name)
            if state is None or state.signature != self._signature(model_dir):
                task = asyncio.get_running_loop().create_task(self._quiet_load(name), name=f"poll-load-{name}")
                self._poll_loads[name] = task
                task.add_done_callback(functools.partial(self._poll_done, name))
                started.append(task)
        for name in [n for n in self.versions if n not in dirs and n not in self._poll_loads]:
            await self.unload(name)
            self.states.pop(name, None)
        if wait and started:
            await asyncio.gather(*started)

    def _poll_done(self, name: str, _: asyncio.Task[None]) -> None:
        self._poll_loads.pop(name, None)

    async def _quiet_load(self, name: str) -> None:
        with contextlib.suppress(OpticError):  # the failure is in the model's state and the log
            await self.load(name)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.poll_once(wait=False)
            except Exception:  # a broken repository must not stop polling
                log.exception("polling %s failed", self.root)

    def terminate(self) -> None:
        """Stop every run now (loads in progress, serving and retiring versions): the end of a drain that
        outlived its grace period."""
        for ticket in list(self._tickets):
            ticket.cancel()
        for model in [*self._retired, *(m for vs in self.versions.values() for m in vs.values())]:
            model.runtime.terminate()

    async def close(self) -> None:
        self._closing = True  # the process is ending: no collection per retired version
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for task in list(self._poll_loads.values()):
            task.cancel()
        await asyncio.gather(*self._poll_loads.values(), return_exceptions=True)
        for name in list(self.versions):
            for model in self.versions.pop(name).values():
                self._retire(model, keep_ready=False)
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for state in self.states.values():
            if state.override is not None:
                state.override.discard()
        self._loader.shutdown(wait=False)

    # ------------------------------------------------------------------ lookups

    @property
    def models(self) -> dict[str, ServedModel]:
        """The default version of every loaded model."""
        return {name: self._default(vs) for name, vs in self.versions.items() if vs}

    @property
    def errors(self) -> list[tuple[str, str]]:
        return [(n, s.error) for n, s in self.states.items() if s.error]

    @property
    def ready(self) -> bool:
        """Every model asked for is serving (Triton's server readiness): false while the start-up loads run, so a
        client that waits for readiness never meets a model that is still loading."""
        failed = any(s.error and n not in self.versions for n, s in self.states.items())
        return self.started and not failed and (bool(self.versions) or self.control_mode == "explicit")

    @staticmethod
    def _default(versions: dict[str, ServedModel]) -> ServedModel:
        return versions[max(versions, key=int)]

    def get(self, name: str, version: str = "") -> ServedModel:
        versions = self.versions.get(name)
        if not versions:
            state = self.states.get(name)
            if state is not None and state.error:
                raise Unavailable(f"model {name!r} failed to load: {state.error}")
            if state is not None and state.reason:
                raise Unavailable(f"model {name!r} is {state.reason}")
            known = ", ".join(sorted(self.versions)) or "none"
            raise NotFound(f"unknown model {printable(name)}; this server has: {known}")
        if not version:
            return self._default(versions)
        model = versions.get(version)
        if model is None:
            raise NotFound(
                f"model {name!r} has no version {printable(version)}; serving version(s) {', '.join(versions)}"
            )
        return model

    @contextlib.contextmanager
    def use(self, name: str, version: str = "") -> Iterator[ServedModel]:
        """Hold a version for one request, so a swap waits for it instead of failing it."""
        model = self.get(name, version)
        model.holders += 1
        model.released.clear()
        try:
            yield model
        finally:
            model.holders -= 1
            if not model.holders:
                model.released.set()

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except OpticError:
            return False
        return True

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries = []
        names = sorted(set(self.states) | set(self.versions))
        for name in names:
            loaded = self.versions.get(name, {})
            entries += [IndexEntry(name, v, "READY") for v in sorted(loaded, key=int)]
            if ready_only:
                continue
            state = self.states.get(name, ModelState())
            if state.error:
                tried = [v for v in state.failed_versions if v not in loaded] or [""]
                entries += [IndexEntry(name, v, "UNAVAILABLE", state.error) for v in tried]
            elif not loaded:
                entries.append(IndexEntry(name, "", "UNAVAILABLE", state.reason or "not loaded"))
        return entries

    def metric_label(self, name: str) -> str:
        """``name`` if it is a loaded model, else "" (bounded label cardinality)."""
        return name if name in self.versions else ""


def _warmup_file(model_dir: Path, name: str, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    """Raw little-endian tensor bytes from ``<model>/warmup/<name>`` (Triton's convention)."""
    if not _PLAIN_FILE.match(name):
        raise cfgmod.ConfigError(f"model_warmup input_data_file {name!r} must be a plain file name in warmup/")
    data = (model_dir / "warmup" / name).read_bytes()
    array: np.ndarray = np.frombuffer(data, dtype=dtype)
    if array.size != int(np.prod(shape)):
        raise cfgmod.ConfigError(f"warm-up file {name!r} holds {array.size} values, {shape} needs {np.prod(shape)}")
    return array.reshape(shape)


def printable(text: str, limit: int = 64) -> str:
    """Quote a client-supplied string safely for messages and logs."""
    return repr(text[:limit] + ("…" if len(text) > limit else ""))
