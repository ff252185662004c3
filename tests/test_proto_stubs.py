"""The committed stubs in proto/v1 are what `make proto` makes from proto/loradrop/v1/*.proto."""

from __future__ import annotations

import pytest

from loradrop.proto import generate


def test_committed_stubs_match_the_proto_files():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) generates the stubs")
    expected = generate.generate()
    committed = {
        p.name: p.read_text() for p in generate.STUBS.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")
    }
    stale = sorted(
        name for name in expected.keys() | committed.keys() if expected.get(name) != committed.get(name)
    )
    assert not stale, f"proto/v1 is stale ({', '.join(stale)}); run `make proto` and commit the result"


def test_stub_imports_work_inside_the_package():
    from loradrop.proto.v1 import loradrop_pb2, loradrop_pb2_grpc

    assert loradrop_pb2_grpc.loradrop_dot_v1_dot_loradrop__pb2 is loradrop_pb2
    assert loradrop_pb2.DESCRIPTOR.services_by_name["Loradrop"].full_name == "loradrop.v1.Loradrop"
