"""The systems: how each is started, how a request for it is built, and how its answer reads.

Every system serves one model per start and binds 127.0.0.1 only. Answers are turned into one plain form,
the one ``common.Pipeline.postprocess`` returns, so they can be compared with Optic's field by field.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadgen import Transport

from optic.proto.optic.v1 import vision_pb2 as vpb

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OPTIC = ROOT / ".venv" / "bin" / "optic"
PEERS_BIN = Path(sys.executable).parent  # the peers' venv: this runner runs in it
SYSTEMS = ("optic", "litserve", "bentoml", "ray", "grpcio")
FRAMEWORKS = ("litserve", "bentoml", "ray")  # the peers the goal compares with; grpcio is the floor, not a peer
GRPC = ("optic", "grpcio")  # speak optic.v1.Vision over gRPC: the same request bytes, the same answer fields
BOUNDARY = "optic-peer-bench-boundary"
RPC = {"classifier": "Classify", "detector": "Detect"}

Answer = list[dict[str, Any]]


def multipart(field_name: str, data: bytes) -> bytes:
    """One JPEG as a ``multipart/form-data`` file field, as a browser or ``requests`` would send it."""
    head = (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"image.jpg\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


@dataclass(frozen=True)
class System:
    name: str
    transport: str  # what the load generator speaks to it

    def command(self, model: str, port: int, extra: tuple[str, ...] = ()) -> list[str]:
        """The server's command line (started pinned, in its own session, by the runner)."""
        py = str(PEERS_BIN / "python")
        if self.name == "optic":
            # One intra-op thread, as every peer's session has. Left at 0, onnxruntime sizes its pool by the
            # machine's cores and pins each pool thread to one of them, ignoring the process's own affinity:
            # Optic's inference would spill onto the load generator's core. `extra` comes last and wins.
            return [
                str(OPTIC), "serve", "--model-repo", str(ROOT / "model_repo"), "--host", "127.0.0.1",
                "--grpc-port", str(port), "--metrics-port", "0", "--intra-op-threads", "1", *extra,
            ]  # fmt: skip
        if self.name == "litserve":
            return [py, str(HERE / "litserve_server.py"), "--port", str(port)]
        if self.name == "bentoml":
            return [
                str(PEERS_BIN / "bentoml"), "serve", "bentoml_service:VisionService", "--working-dir", str(HERE),
                "--host", "127.0.0.1", "--port", str(port),
            ]  # fmt: skip
        if self.name == "ray":
            return [py, str(HERE / "ray_server.py"), "--port", str(port)]
        if self.name == "grpcio":
            return [py, str(HERE / "grpc_server.py"), "--port", str(port)]
        raise ValueError(self.name)

    @property
    def stop_signal(self) -> int:
        """LitServe 0.2.19 stops on Ctrl-C (SIGINT) only: on SIGTERM its workers stay up (seen here)."""
        return signal.SIGINT if self.name == "litserve" else signal.SIGTERM

    def env(self, model: str, scratch: Path) -> dict[str, str]:
        """Variables for the server: the model, and BentoML's and Ray's usage reporting off (LitServe has none)."""
        return {
            "PEER_MODEL": model,
            "BENTOML_DO_NOT_TRACK": "True",
            "BENTOML_HOME": str(scratch / "bentoml"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
        }

    def transport_for(self, model: str, port: int) -> Transport:
        if self.name in GRPC:
            return Transport("grpc", f"127.0.0.1:{port}", method=f"/optic.v1.Vision/{RPC[model]}")
        url = f"http://127.0.0.1:{port}/predict"
        if self.name == "ray":
            return Transport("http", url, headers={"Content-Type": "image/jpeg"})
        return Transport("http", url, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})

    def payload(self, model: str, image: bytes) -> bytes:
        """The whole request body for one image."""
        if self.name in GRPC:
            request = (vpb.ClassifyRequest if model == "classifier" else vpb.DetectRequest)(
                model=model, images=[vpb.Image(data=image)]
            )
            return request.SerializeToString()
        if self.name == "litserve":
            return multipart("image", image)
        if self.name == "bentoml":
            return multipart("images", image)  # a batchable API takes a list: a list of one
        return image  # ray: the body is the JPEG

    def answer(self, model: str, body: bytes) -> Answer:
        """One answer in the common plain form."""
        if self.name in GRPC:
            if model == "classifier":
                result = vpb.ClassifyResponse.FromString(body).results[0]
                return [{"class_id": c.class_id, "label": c.label, "score": c.score} for c in result.classes]
            found = vpb.DetectResponse.FromString(body).results[0]
            return [
                {
                    "box": [d.box.x1, d.box.y1, d.box.x2, d.box.y2],
                    "score": d.score,
                    "class_id": d.class_id,
                    "label": d.label,
                }
                for d in found.detections
            ]
        value = json.loads(body)
        if self.name == "bentoml":
            return value[0]
        return value["result"]


def system_named(name: str) -> System:
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; expected some of {', '.join(SYSTEMS)}")
    return System(name, "grpc" if name in GRPC else "http")


def compare(reference: list[Answer], got: list[Answer], score_tol: float = 1e-4, box_tol: float = 1e-2) -> str:
    """'' when ``got`` equals ``reference`` image by image (labels and class ids identical, scores and box
    corners within the tolerances), else the first difference, in words."""
    if len(got) != len(reference):
        return f"{len(got)} answers for {len(reference)} images"
    for i, (ref, ans) in enumerate(zip(reference, got, strict=True)):
        if len(ans) != len(ref):
            return f"image {i}: {len(ans)} results, Optic {len(ref)}"
        for j, (r, a) in enumerate(zip(ref, ans, strict=True)):
            where = f"image {i} result {j}"
            if a.get("class_id") != r["class_id"] or a.get("label") != r["label"]:
                return f"{where}: class {a.get('class_id')} {a.get('label')!r}, Optic {r['class_id']} {r['label']!r}"
            if abs(float(a["score"]) - float(r["score"])) > score_tol:
                return f"{where}: score {a['score']:.6f}, Optic {r['score']:.6f}"
            if "box" in r:
                worst = max(abs(float(x) - float(y)) for x, y in zip(a["box"], r["box"], strict=True))
                if worst > box_tol:
                    return f"{where}: box {a['box']} differs from Optic's {r['box']} by {worst:.4f} px"
    return ""
