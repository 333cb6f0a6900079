"""ONNX files without torch: metadata, a CPU session to check them, atomic writes into a repository.

A model file is replaced atomically, so a serving process polling the
repository never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def set_metadata(proto: onnx.ModelProto, props: Mapping[str, str], doc: str = "") -> None:
    del proto.metadata_props[:]
    for key in sorted(props):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, props[key]
    proto.producer_name = "optic-export"
    proto.doc_string = doc


def session(proto: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_predict(sess: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def write_atomically(proto: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".model-", suffix=".onnx.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString(deterministic=True))
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; servers often run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
