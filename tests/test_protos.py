"""Generated code is current, and our KServe proto is wire-compatible with Triton's client."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from tritonclient.grpc import service_pb2

from server.codegen import PROTO_FILES, PROTO_SRC, generate

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current(tmp_path):
    generate(tmp_path)
    committed = ROOT / "server" / "proto"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    existing = sorted(
        p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == existing, "server/proto has stale or missing files: run `make protos`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, committed / p, shallow=False)]
    assert not stale, f"stale generated code {stale}: run `make protos`"


def _our_kserve_file(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "set.pb"
    assert protoc.main(["protoc", f"-I{PROTO_SRC}", f"--descriptor_set_out={out}", PROTO_FILES[0]]) == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (file,) = fds.file
    return file


def _messages(file: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(msgs, prefix: str) -> None:
        for m in msgs:
            found[prefix + m.name] = m
            walk(m.nested_type, prefix + m.name + ".")

    walk(file.message_type, "")
    return found


def test_kserve_messages_match_tritons(tmp_path):
    file = _our_kserve_file(tmp_path)
    ours = _messages(file)
    checked = 0
    for name, ours_msg in ours.items():
        if ours_msg.options.map_entry:
            continue
        theirs = service_pb2.DESCRIPTOR.message_types_by_name.get(name.split(".")[0])
        for part in name.split(".")[1:]:
            theirs = theirs.nested_types_by_name[part] if theirs else None
        assert theirs is not None, f"Triton's proto has no message {name}"
        for field in ours_msg.field:
            their_field = theirs.fields_by_name.get(field.name)
            assert their_field is not None, f"{name}.{field.name} is not in Triton's proto"
            assert their_field.number == field.number, f"{name}.{field.name}: number differs"
            assert their_field.type == field.type, f"{name}.{field.name}: type differs"
            checked += 1
    assert checked > 40
    (service,) = file.service
    theirs_service = service_pb2.DESCRIPTOR.services_by_name[service.name]
    assert f"{file.package}.{service.name}" == theirs_service.full_name == "inference.GRPCInferenceService"
    for method in service.method:
        theirs = theirs_service.methods_by_name[method.name]
        assert method.input_type.lstrip(".") == theirs.input_type.full_name
        assert method.output_type.lstrip(".") == theirs.output_type.full_name
    assert len(service.method) >= 6


def test_server_never_imports_torch():
    code = "import sys, server.app, server.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
