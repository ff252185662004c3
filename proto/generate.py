"""Regenerate the committed Python stubs from proto/loradrop/v1/*.proto (`make proto`).

protoc writes imports as `from loradrop.v1 import x_pb2`, the proto package's path; here the
stubs live in the Python package `loradrop.proto.v1`, so those imports are rewritten.
tests/test_proto_stubs.py calls `generate()` and fails when the committed files differ.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
SOURCES = PROTO_ROOT / "loradrop" / "v1"
STUBS = PROTO_ROOT / "v1"
STUB_PACKAGE = "loradrop.proto.v1"


def generate() -> dict[str, str]:
    """The stub files' names and texts, as they should be committed."""
    from grpc_tools import protoc

    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in SOURCES.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(argv) != 0:
            raise SystemExit(f"protoc failed on {', '.join(protos)}")
        out = Path(tmp) / "loradrop" / "v1"
        files = {p.name: _rewrite_imports(p.read_text()) for p in sorted(out.iterdir()) if p.is_file()}
    files["__init__.py"] = (
        '"""Generated from proto/loradrop/v1/*.proto by proto/generate.py; do not edit."""\n'
    )
    return files


def _rewrite_imports(text: str) -> str:
    return re.sub(r"^from loradrop\.v1 import ", f"from {STUB_PACKAGE} import ", text, flags=re.MULTILINE)


def main() -> int:
    files = generate()
    STUBS.mkdir(exist_ok=True)
    for stale in STUBS.glob("*.py*"):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (STUBS / name).write_text(text)
    print(f"wrote {len(files)} files to {STUBS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
