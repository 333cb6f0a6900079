"""RepositoryModelLoad with overrides, as Triton takes them: a JSON ``config`` and ``file:<version>/<name>`` bytes.

``tritonclient.grpc.InferenceServerClient.load_model(name, config=..., files=...)``
sends these. The config replaces the model's ``config.pbtxt`` for this load;
files are written into a private temporary directory (their paths are checked
to be ``<digits>/<plain file name>``, never joined onto the repository), and
the model is loaded from there. Anything else is refused, never ignored.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from optic.proto.inference import model_config_pb2 as mc
from optic.server.config import FileConfig
from optic.server.errors import InvalidArgument

_FILE = re.compile(r"^file:([0-9]{1,18})/([A-Za-z0-9][A-Za-z0-9_.-]{0,127})$")


@dataclass
class LoadOverride:
    config: FileConfig | None  # replaces config.pbtxt for this load
    directory: Path | None = None  # private copy of the override files (and the config), when files were sent

    def discard(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory.parent, ignore_errors=True)


def _config(text: str) -> FileConfig:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"RepositoryModelLoad 'config' is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgument("RepositoryModelLoad 'config' must be a JSON object (a model configuration)")
    config = mc.ModelConfig()
    try:
        json_format.ParseDict(document, config, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise InvalidArgument(f"RepositoryModelLoad 'config': {str(exc)[:300]}") from None
    known = {f.name for f in config.DESCRIPTOR.fields} | {f.json_name for f in config.DESCRIPTOR.fields}
    ignored = [f"ModelConfig.{k}" for k in document if k not in known]
    explicit = any(k in document for k in ("max_batch_size", "maxBatchSize"))
    return FileConfig(config, ignored, explicit)


def parse(name: str, parameters: Mapping[str, Any]) -> LoadOverride | None:
    """The request's overrides (None when it has none); INVALID_ARGUMENT for anything Optic cannot apply."""
    config: FileConfig | None = None
    files: dict[tuple[str, str], bytes] = {}
    for key, value in parameters.items():
        kind = value.WhichOneof("parameter_choice")
        if key == "config":
            if kind != "string_param":
                raise InvalidArgument("RepositoryModelLoad 'config' must be a string of JSON")
            config = _config(value.string_param)
            continue
        match = _FILE.match(key)
        if match is None:
            raise InvalidArgument(
                f"RepositoryModelLoad parameter {key[:80]!r} is not one Optic applies: it takes 'config' (JSON) "
                "and 'file:<version>/<file name>' (bytes)"
            )
        if kind != "bytes_param":
            raise InvalidArgument(f"RepositoryModelLoad {key[:80]!r} must carry bytes")
        files[(match.group(1), match.group(2))] = value.bytes_param
    if not files and config is None:
        return None
    if files and config is None:
        raise InvalidArgument("RepositoryModelLoad file overrides need a 'config' too (as Triton requires)")
    directory = None
    if files:
        directory = Path(tempfile.mkdtemp(prefix="optic-load-")) / name
        for (version, filename), data in files.items():
            (directory / version).mkdir(parents=True, exist_ok=True)
            (directory / version / filename).write_bytes(data)
    return LoadOverride(config, directory)
