"""Generated code is current, and our KServe proto is wire-compatible with Triton's client."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from tritonclient.grpc import model_config_pb2, service_pb2

from optic.proto.codegen import PROTO_SRC, generate, generated_files

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current(tmp_path):
    generate(tmp_path)
    committed = PROTO_SRC
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    existing = sorted(p.relative_to(committed) for p in generated_files(committed))
    assert fresh == existing, "protos/ has stale or missing generated files: run `make protos`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, committed / p, shallow=False)]
    assert not stale, f"stale generated code {stale}: run `make protos`"


def _our_file(tmp_path: Path, proto: str) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "set.pb"
    assert protoc.main(["protoc", f"-I{PROTO_SRC}", f"--descriptor_set_out={out}", proto]) == 0
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


@pytest.mark.parametrize(
    ("proto", "triton", "at_least"),
    [("inference/grpc_service.proto", service_pb2, 90), ("inference/model_config.proto", model_config_pb2, 40)],
)
def test_kserve_messages_match_tritons(tmp_path, proto, triton, at_least):
    file = _our_file(tmp_path, proto)
    ours = _messages(file)
    checked = 0
    for enum in file.enum_type:
        theirs_enum = triton.DESCRIPTOR.enum_types_by_name[enum.name]
        assert {v.name: v.number for v in enum.value} == {v.name: v.number for v in theirs_enum.values}
    for name, ours_msg in ours.items():
        if ours_msg.options.map_entry:
            continue
        theirs = triton.DESCRIPTOR.message_types_by_name.get(name.split(".")[0])
        for part in name.split(".")[1:]:
            theirs = theirs.nested_types_by_name[part] if theirs else None
        assert theirs is not None, f"Triton's proto has no message {name}"
        for field in ours_msg.field:
            their_field = theirs.fields_by_name.get(field.name)
            assert their_field is not None, f"{name}.{field.name} is not in Triton's proto"
            assert their_field.number == field.number, f"{name}.{field.name}: number differs"
            assert their_field.type == field.type, f"{name}.{field.name}: type differs"
            if field.type_name:
                their_type = (their_field.message_type or their_field.enum_type).full_name
                assert field.type_name.lstrip(".") == their_type, f"{name}.{field.name}: type name differs"
            checked += 1
        for enum in ours_msg.enum_type:
            theirs_enum = theirs.enum_types_by_name[enum.name]
            assert {v.name: v.number for v in enum.value} == {v.name: v.number for v in theirs_enum.values}
    assert checked > at_least
    if not file.service:
        return
    (service,) = file.service
    theirs_service = service_pb2.DESCRIPTOR.services_by_name[service.name]
    assert f"{file.package}.{service.name}" == theirs_service.full_name == "inference.GRPCInferenceService"
    for method in service.method:
        theirs = theirs_service.methods_by_name[method.name]
        assert method.input_type.lstrip(".") == theirs.input_type.full_name
        assert method.output_type.lstrip(".") == theirs.output_type.full_name
        assert (method.client_streaming, method.server_streaming) == (theirs.client_streaming, theirs.server_streaming)
    assert len(service.method) >= 12


def test_server_never_imports_torch_or_onnx():
    """Serving needs neither (torch and onnx come with the export extra)."""
    code = (
        "import sys, optic.server.app, optic.server.cli, optic.server.api.vision; "
        "sys.exit(any(m.split('.')[0] in ('torch', 'onnx') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
