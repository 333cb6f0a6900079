"""Triton's ``config.pbtxt``: parsed into our ``inference.ModelConfig`` subset, then completed from the model.

The text is read by protobuf's own text-format parser (Triton's field names
and numbers, see ``protos/inference/model_config.proto``). Fields Triton knows
and we do not (``optimization``, ``sequence_batching``...) or misspelt ones
are skipped and named in a warning, never fatal. What the file leaves out is
derived from the ONNX model and the server's command-line defaults, and that
*effective* configuration is what the ModelConfig RPC returns.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from optic.proto.inference import model_config_pb2 as mc
from optic.server.runtime import TensorSpec
from optic.server.scheduler import BatchingConfig
from optic.server.tensors import TRITON_TYPES

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
TYPE_OF = {d: mc.DataType.Value(name) for d, name in TRITON_TYPES.items()}  # KServe datatype -> enum


class ConfigError(ValueError):
    """The model's configuration cannot be used; the message says which field and why."""


def unknown_fields(text: str, descriptor: Any) -> list[str]:
    """``Message.field`` for every field of ``text`` that ``descriptor``'s message does not have.

    protobuf's text-format parser can skip unknown fields but names none of them
    publicly, so this walks the text with its public ``Tokenizer`` (after a
    successful parse, so the syntax is known to be valid).
    """
    skipped: list[str] = []
    tokens = text_format.Tokenizer(text.split("\n"))
    _walk_message(tokens, descriptor, skipped, top=True)
    return skipped


def _walk_message(tokens: text_format.Tokenizer, desc: Any, skipped: list[str], top: bool) -> None:
    while not tokens.AtEnd():
        if not top and (tokens.TryConsume("}") or tokens.TryConsume(">")):
            return
        name = tokens.ConsumeIdentifierOrNumber()
        known = desc.fields_by_name.get(name) if desc is not None else None
        if desc is not None and known is None:
            skipped.append(f"{desc.name}.{name}")
        sub = known.message_type if known is not None else None
        tokens.TryConsume(":")
        if tokens.TryConsume("["):
            while not tokens.TryConsume("]"):
                _walk_value(tokens, sub, skipped)
                tokens.TryConsume(",")
        else:
            _walk_value(tokens, sub, skipped)
        if not tokens.TryConsume(","):
            tokens.TryConsume(";")


def _walk_value(tokens: text_format.Tokenizer, sub: Any, skipped: list[str]) -> None:
    if tokens.TryConsume("{") or tokens.TryConsume("<"):
        _walk_message(tokens, sub, skipped, top=False)
    elif tokens.token[:1] in ("'", '"'):
        tokens.ConsumeString()  # adjacent string literals are one value
    else:
        tokens.NextToken()


@dataclass
class FileConfig:
    """What ``config.pbtxt`` said."""

    config: mc.ModelConfig = field(default_factory=mc.ModelConfig)
    ignored: list[str] = field(default_factory=list)  # fields skipped, as Message.field
    sets_max_batch_size: bool = False  # proto3 cannot tell an explicit 0 from absence


def parse(text: str, source: str = CONFIG_FILE) -> FileConfig:
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config, allow_unknown_field=True)
    except text_format.ParseError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    explicit = re.search(r"^\s*max_batch_size\s*:", text, re.MULTILINE) is not None
    return FileConfig(config, unknown_fields(text, config.DESCRIPTOR), explicit)


def read(model_dir: Path) -> FileConfig:
    """The model directory's ``config.pbtxt``, or an empty one when there is none."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return FileConfig()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    return parse(text, str(path))


def select_versions(config: mc.ModelConfig, available: list[int]) -> list[int]:
    """Versions to serve under the config's ``version_policy`` (Triton's default: the latest one)."""
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return sorted(available)
    if choice == "specific":
        missing = sorted(set(policy.specific.versions) - set(available))
        if missing:
            raise ConfigError(f"version_policy names version(s) {missing} that are not on disk (found {available})")
        return sorted(set(policy.specific.versions))
    count = policy.latest.num_versions if choice == "latest" and policy.latest.num_versions else 1
    return sorted(available)[-count:]


@dataclass(frozen=True)
class Defaults:
    """The server's command-line defaults, used where a config says nothing."""

    batching: BatchingConfig = field(default_factory=BatchingConfig)
    queue_timeout: float | None = None  # seconds; None: only the client's deadline applies


def effective(
    file: FileConfig,
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    batchable: bool,
    defaults: Defaults,
) -> mc.ModelConfig:
    """The config as served: the file's fields, checked against the model, the rest filled in."""
    config = file.config
    cfg = mc.ModelConfig()
    cfg.CopyFrom(config)
    if cfg.name and cfg.name != name:
        raise ConfigError(f"config.pbtxt names the model {cfg.name!r}, but its directory is {name!r}")
    cfg.name = name
    if cfg.platform and cfg.platform != PLATFORM:
        raise ConfigError(f"platform {cfg.platform!r} is not served here; Optic runs {PLATFORM!r}")
    if cfg.backend and cfg.backend != BACKEND:
        raise ConfigError(f"backend {cfg.backend!r} is not served here; Optic runs {BACKEND!r}")
    cfg.platform, cfg.backend = PLATFORM, BACKEND
    if cfg.max_batch_size < 0:
        raise ConfigError(f"max_batch_size must be 0 or more, not {cfg.max_batch_size}")
    if not file.sets_max_batch_size:
        cfg.max_batch_size = defaults.batching.max_batch_size if batchable else 0
    if cfg.max_batch_size > 0 and not batchable:
        raise ConfigError(f"max_batch_size is {cfg.max_batch_size}, but the model has no dynamic batch axis")
    _tensors(cfg.input, inputs, "input", cfg.max_batch_size)
    _tensors(cfg.output, outputs, "output", cfg.max_batch_size)
    if cfg.max_batch_size > 0:
        db = cfg.dynamic_batching
        if not config.HasField("dynamic_batching") or not db.max_queue_delay_microseconds:
            db.max_queue_delay_microseconds = round(defaults.batching.max_queue_delay * 1e6)
        above = [b for b in db.preferred_batch_size if b > cfg.max_batch_size]
        if above and not file.sets_max_batch_size:
            # The maximum is the server's (--max-batch-size), not the file's: a smaller server cap is the operator's
            # memory bound, so it wins over the model's hint, with a word (at load, so at most once per load).
            log.warning(
                "%s: preferred_batch_size %s is above --max-batch-size %d; ignored", name, above, cfg.max_batch_size
            )
            kept = [b for b in db.preferred_batch_size if b <= cfg.max_batch_size]
            del db.preferred_batch_size[:]
            db.preferred_batch_size.extend(kept)
        bad = [b for b in db.preferred_batch_size if not 1 <= b <= cfg.max_batch_size]
        if bad:
            raise ConfigError(f"preferred_batch_size {bad} outside 1..max_batch_size ({cfg.max_batch_size})")
        policy = db.default_queue_policy
        if not policy.max_queue_size:
            policy.max_queue_size = defaults.batching.max_queue_size
        if not policy.default_timeout_microseconds and defaults.queue_timeout:
            policy.default_timeout_microseconds = round(defaults.queue_timeout * 1e6)
    if not cfg.instance_group:
        cfg.instance_group.add(count=defaults.batching.instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    for group in cfg.instance_group:
        if group.count < 0 or group.count > 64:
            raise ConfigError(f"instance_group count must be 1 to 64, not {group.count}")
        group.count = group.count or 1
    total = sum(g.count for g in cfg.instance_group)
    if total > 64:  # one slot thread each: a config sent with RepositoryModelLoad must not ask for thousands
        raise ConfigError(f"instance_group counts add up to {total}; a model may run at most 64 batches at once")
    if not cfg.version_policy.WhichOneof("policy_choice"):
        cfg.version_policy.latest.num_versions = 1
    for warm in cfg.model_warmup:
        unknown = sorted(set(warm.inputs) - {t.name for t in inputs})
        if unknown:
            raise ConfigError(f"model_warmup {warm.name!r} names input(s) {unknown} the model does not have")
        if cfg.max_batch_size and warm.batch_size > cfg.max_batch_size:
            raise ConfigError(f"model_warmup {warm.name!r} batch_size {warm.batch_size} > max_batch_size")
    return cfg


def intra_op_threads(config: mc.ModelConfig, name: str, cap: int) -> int:
    """Threads each run of the model uses, from Triton's onnxruntime-backend parameter ``intra_op_thread_count``
    (0 or absent: the server's choice). Capped at ``cap``, the threads the server would give a run (its cores, or
    ``--intra-op-threads``), with a word: a repository written on a bigger machine still serves, and a config
    (one a client sent with RepositoryModelLoad too) cannot make a run spawn more threads than the server would."""
    if "intra_op_thread_count" not in config.parameters:
        return 0
    text = config.parameters["intra_op_thread_count"].string_value.strip()
    if not re.fullmatch(r"[0-9]{1,6}", text):
        raise ConfigError(f"parameters intra_op_thread_count must be a whole number of threads, not {text[:32]!r}")
    threads = int(text)
    if threads > cap:
        log.warning("%s: parameters intra_op_thread_count %d is above this server's %d; %d used", name, threads, cap,
                    cap)  # fmt: skip
        return cap
    return threads


def batching_of(cfg: mc.ModelConfig) -> tuple[BatchingConfig, float | None, bool]:
    """Scheduler settings from an effective config: (batching, queue timeout in s or None, reject on timeout)."""
    db = cfg.dynamic_batching
    policy = db.default_queue_policy
    batching = BatchingConfig(
        max_batch_size=cfg.max_batch_size,
        max_queue_delay=db.max_queue_delay_microseconds / 1e6,
        max_queue_size=policy.max_queue_size or BatchingConfig.max_queue_size,
        instances=sum(g.count for g in cfg.instance_group),
        preferred_batch_sizes=tuple(sorted(set(db.preferred_batch_size))),
    )
    timeout = policy.default_timeout_microseconds / 1e6 if policy.default_timeout_microseconds else None
    return batching, timeout, policy.timeout_action == mc.ModelQueuePolicy.REJECT


def _tensors(declared, actual: list[TensorSpec], kind: str, max_batch_size: int) -> None:  # noqa: ANN001
    """Check declared inputs/outputs against the ONNX graph; declare the undeclared ones."""
    by_name = {t.name: t for t in actual}
    for d in declared:
        spec = by_name.get(d.name)
        if spec is None:
            raise ConfigError(f"{kind} {d.name!r} is not in the model; it has {', '.join(by_name)}")
        if d.data_type != mc.TYPE_INVALID and d.data_type != TYPE_OF[spec.datatype]:
            raise ConfigError(
                f"{kind} {d.name!r} is declared {mc.DataType.Name(d.data_type)}, the model has "
                f"{mc.DataType.Name(TYPE_OF[spec.datatype])}"
            )
        shape = list(spec.shape[1:] if max_batch_size > 0 else spec.shape)
        dims = list(d.dims)
        differs = len(dims) != len(shape) or any(a != b and -1 not in (a, b) for a, b in zip(dims, shape, strict=False))
        if dims and differs:
            raise ConfigError(f"{kind} {d.name!r} has dims {dims}; the model's are {shape} (batch axis excluded)")
    named = {d.name for d in declared}
    for spec in actual:
        if spec.name not in named:
            declared.add(
                name=spec.name,
                data_type=TYPE_OF[spec.datatype],
                dims=spec.shape[1:] if max_batch_size > 0 else spec.shape,
            )
        else:
            d = next(d for d in declared if d.name == spec.name)
            d.data_type = TYPE_OF[spec.datatype]
            if not d.dims:
                d.dims.extend(spec.shape[1:] if max_batch_size > 0 else spec.shape)
