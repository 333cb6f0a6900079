"""onnxruntime sessions: provider choice, threading, tensor specs, warm-up.

Knows nothing of gRPC or images; ``run`` is called from a worker thread
(onnxruntime releases the GIL while it computes).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from optic.server.errors import InvalidArgument, Unavailable
from optic.server.tensors import DATATYPES, ORT_DATATYPES

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe v2 name
    shape: tuple[int, ...]  # -1 where the model leaves the size open


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "cpu"
    intra_op_threads: int = 0  # 0: ``cores``
    cores: int = 0  # cores this process's sessions share (a worker's share of them); 0: default_threads()
    inter_op_threads: int = 0
    spin_wait: bool = False
    cuda_options: tuple[tuple[str, str], ...] = ()  # CUDAExecutionProvider options, e.g. ("device_id", "0")
    io_binding: bool | None = None  # None: on when the model runs on CUDA

    def run_threads(self) -> int:
        """Intra-op threads a run gets: ``intra_op_threads``, else ``cores``, else the cores this process may use."""
        return self.intra_op_threads or self.cores or default_threads()


Provider = str | tuple[str, dict[str, str]]


def providers_for(device: str, cuda_options: tuple[tuple[str, str], ...] = ()) -> list[Provider]:
    """Execution providers for ``--device``; ``cuda`` without CUDA is an error, ``auto`` falls back."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", dict(cuda_options)), "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(
            "--device cuda: this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu"
        )
    log.warning("--device auto: CUDAExecutionProvider not available, running on CPU")
    return ["CPUExecutionProvider"]


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = ORT_DATATYPES.get(arg.type)
    if datatype is None:
        raise ValueError(f"tensor {arg.name!r} has type {arg.type}, which Optic cannot serve")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


_arena_lock = threading.Lock()
_arena_registered: bool | None = None  # None: not tried yet


def shared_cpu_arena() -> bool:
    """Register, once per process, the CPU arena every CPU session allocates from; False if it cannot be.

    Each session's own arena grows to its largest batch and keeps it: a model's narrow lane would hold a second
    copy of the wide session's working memory (detector, warmed up at batch 32: +273 MB for one session, +544 MB
    for two, +321 MB for two sharing one arena). Sharing also lets models reuse each other's idle memory. The
    arena never shrinks: what an unloaded model used stays in it for the next load, not given back to the system.
    """
    global _arena_registered
    with _arena_lock:
        if _arena_registered is None:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            try:
                ort.create_and_register_allocator(info, None)
                _arena_registered = True
            except Exception as exc:  # onnxruntime raises its own types; each session then keeps its own arena
                log.warning("shared CPU arena unavailable (%s): each session keeps its own", exc)
                _arena_registered = False
        return _arena_registered


class OnnxModel:
    """One ONNX file loaded into one onnxruntime session, and optionally a narrow lane (see ``open_narrow_lane``)."""

    def __init__(self, path: Path, options: RuntimeOptions | None = None) -> None:
        options = options or RuntimeOptions()
        self.path = path
        self.options = options
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # onnxruntime's own default counts the machine's physical cores, ignoring affinity and CPU quotas.
        self.threads = options.run_threads()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = options.inter_op_threads
        so.log_severity_level = 3
        # Idle intra-op threads spin-wait by default, burning the cores that gRPC and image
        # decoding need between batches; in a server, sleeping threads win.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0" if options.spin_wait is False else "1")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0" if options.spin_wait is False else "1")
        providers = providers_for(options.device, options.cuda_options)
        if providers == ["CPUExecutionProvider"] and shared_cpu_arena():
            so.add_session_config_entry("session.use_env_allocators", "1")
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.providers: list[str] = self.session.get_providers()
        on_cuda = self.providers[0] == "CUDAExecutionProvider"
        # I/O binding lets onnxruntime copy inputs to the device once and write outputs straight into
        # host memory it allocates, instead of staging both through extra buffers per run.
        self.io_binding = on_cuda if options.io_binding is None else options.io_binding
        self.inputs = [_spec(a) for a in self.session.get_inputs()]
        self.outputs = [_spec(a) for a in self.session.get_outputs()]
        self.metadata_props: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.terminated = False
        self._running: set[ort.RunOptions] = set()
        self._lock = threading.Lock()
        self.narrow: list[OnnxModel] = []  # the narrow lane's sessions (open_narrow_lane)
        self._narrow_busy: list[int] = []  # runs in flight on each of them
        self._active = 0  # runs in flight here and on the narrow lane
        self.on_lane: Callable[[str], None] | None = None  # told the lane of every run (metrics)

    def open_narrow_lane(self, threads: int, runs: int) -> list[OnnxModel]:
        """Open the model again with ``threads`` intra-op threads, for runs that start while another is running.

        On CPU one run on all the cores answers soonest, but runs side by side on a few threads each finish more
        images per second: intra-op threads wait for each other at every kernel, side-by-side runs do not (this
        machine, 2 cores, detector: 117 images/s one at a time on 2 threads, 167 as two runs on 1 thread each).
        So a run starts wide when it is alone and narrow when it has company. Up to ``runs`` run at once: with one
        thread each they share one session (a run computes on its caller's thread), with more each gets its own
        session, so their pools do not contend. None (no lane, []) on CUDA, or when ``threads`` would be no
        narrower. Each session holds its own copy of the weights; working memory comes from the arena all CPU
        sessions share (``shared_cpu_arena``).
        """
        if threads >= self.threads or self.providers[0] != "CPUExecutionProvider":
            return []
        sessions = 1 if threads == 1 else max(1, runs)
        self.narrow = [OnnxModel(self.path, replace(self.options, intra_op_threads=threads)) for _ in range(sessions)]
        self._narrow_busy = [0] * sessions
        if self.terminated:
            self.terminate()
        return self.narrow

    @property
    def batchable(self) -> bool:
        """Axis 0 of every input and output is open, so requests can be stacked along it."""
        return all(t.shape and t.shape[0] == -1 for t in (*self.inputs, *self.outputs))

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run on this session, or on the least busy narrow one when another run is in flight (``open_narrow_lane``)."""
        with self._lock:
            index = -1
            if self.narrow and self._active:
                index = min(range(len(self.narrow)), key=self._narrow_busy.__getitem__)
                self._narrow_busy[index] += 1
            self._active += 1
        try:
            result = (self if index < 0 else self.narrow[index])._run(feeds, outputs)
        finally:
            with self._lock:
                self._active -= 1
                if index >= 0:
                    self._narrow_busy[index] -= 1
        if self.on_lane is not None:  # runs that answered: not one refused during an unload, nor a rejected input
            self.on_lane("wide" if index < 0 else "narrow")
        return result

    def _run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs else [t.name for t in self.outputs]
        options = ort.RunOptions()
        with self._lock:  # checked under the lock terminate() takes: a run cannot slip in between
            if self.terminated:
                raise Unavailable(f"model {self.path.parent.parent.name!r} is being unloaded")
            self._running.add(options)
        try:
            if self.io_binding:
                values = self._run_bound(feeds, names, options)
            else:
                values = self.session.run(names, dict(feeds), options)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ValueError) as exc:
            raise InvalidArgument(f"model {self.path.parent.parent.name!r} rejected the input: {exc}") from exc
        finally:
            with self._lock:
                self._running.discard(options)
        return dict(zip(names, values, strict=True))

    def terminate(self) -> None:
        """Stop every run in progress (onnxruntime checks the flag between kernels, loops included) and refuse
        new ones: how a load that takes too long, or a shutdown past its grace, gets its thread back."""
        self.terminated = True
        with self._lock:
            for options in self._running:
                options.terminate = True
        for lane in self.narrow:
            lane.terminate()

    def _run_bound(
        self, feeds: Mapping[str, np.ndarray], names: list[str], options: ort.RunOptions
    ) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding, options)
        return binding.copy_outputs_to_cpu()

    def warmup(
        self, batch_sizes: Sequence[int] = (1,), image_hw: tuple[int, int] | None = None, nhwc: bool = False
    ) -> list[tuple[int, ...]]:
        """Run zeros through the graph so the first real request pays no lazy initialisation; returns the output
        shapes of the first run. Open height and width of an image input take ``image_hw`` (the model's input
        size: a YOLO graph needs multiples of its stride), other open dimensions 1."""
        shapes: list[tuple[int, ...]] = []
        for n in batch_sizes:
            feeds = {}
            for spec in self.inputs:
                dims = [n if i == 0 and self.batchable else (d if d > 0 else 1) for i, d in enumerate(spec.shape)]
                if image_hw is not None and len(dims) == 4:
                    h_axis, w_axis = (1, 2) if nhwc else (2, 3)
                    for axis, value in ((h_axis, image_hw[0]), (w_axis, image_hw[1])):
                        if spec.shape[axis] < 0:
                            dims[axis] = value
                feeds[spec.name] = np.zeros(dims, dtype=DATATYPES[spec.datatype])
            outputs = self.run(feeds)
            shapes = shapes or [tuple(outputs[t.name].shape) for t in self.outputs]
        return shapes


def default_instances(cores: int, gpu: bool = False) -> int:
    """Batches a model may run at once when neither ``--instances`` nor its config says: two on 2+ CPU cores
    (a wide run when alone, narrow ones beside it: ``OnnxModel.open_narrow_lane``), one on a GPU or one core."""
    return 1 if gpu or cores < 2 else 2


def default_threads() -> int:
    """Cores this process may use, for sizing thread pools: its CPU affinity, capped by a cgroup CPU quota.

    A Kubernetes CPU limit is a CFS quota, not an affinity: a pod limited to 2 CPUs on a 32-core node sees 32
    cores in ``sched_getaffinity``, and 32 threads per pool would only contend for its 2 CPUs' worth of time
    (and raise the memory the worker pools may hold, see docs/operations.md).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup may use (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``); None: no limit."""
    try:
        fields = (root / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
