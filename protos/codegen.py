"""Regenerate the Python modules in ``protos/`` (``optic.proto``) from the ``.proto`` files beside them.

Run as ``python -m optic.proto.codegen`` (``make protos``).

protoc names generated imports after the proto's include path (``from inference
import ...``); we rewrite them to live under ``optic.proto`` so the generated
code needs no entry on ``sys.path`` and no top-level packages besides ours.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_SRC = ROOT / "protos"
PROTO_FILES = ("inference/grpc_service.proto", "inference/model_config.proto", "optic/v1/vision.proto")
PACKAGE = "optic.proto"
_GENERATED = re.compile(r"_pb2(_grpc)?\.pyi?$")
_DEFAULT_POOL = "_descriptor_pool.Default()"
_POOL_IMPORT = "from google.protobuf import descriptor_pool as _descriptor_pool"
_OUR_POOL = f"from {PACKAGE} import pool as _pool"
_IMPORT = re.compile(r"^from (inference|optic\.v1|optic) import ", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules (and ``__init__.py`` files) under ``out_dir``."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_SRC}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *PROTO_FILES,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            rel = src.relative_to(tmp)
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            text = _IMPORT.sub(rf"from {PACKAGE}.\1 import ", src.read_text())
            if src.name.endswith("_pb2.py"):  # register in our own pool (see pool.py)
                text = text.replace(_DEFAULT_POOL, "_pool.POOL").replace(_POOL_IMPORT, f"{_POOL_IMPORT}\n{_OUR_POOL}")
            dst.write_text(text)
            written.append(dst)
    for pkg in {out_dir, *(p.parent for p in written)}:
        while pkg != out_dir.parent:
            init = pkg / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated from protos/ by optic.proto.codegen; do not edit."""\n')
                written.append(init)
            pkg = pkg.parent
    return sorted(set(written))


def generated_files(root: Path) -> list[Path]:
    """The files under ``root`` that :func:`generate` writes (sources and this script excluded)."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and (p.name == "__init__.py" or _GENERATED.search(p.name))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_SRC)
    args = parser.parse_args(argv)
    if args.out.exists():
        for stale in generated_files(args.out):
            stale.unlink()
    for path in generate(args.out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
