"""The client package on its own: what it imports, what it depends on, and stubs that match the protos."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

CLIENTS = Path(__file__).resolve().parents[2] / "clients"
STUBS = CLIENTS / "rwkvd" / "v1"

# Runs in a fresh interpreter from the repository root, where service/ and kernels/ would be importable.
ISOLATED = """
import asyncio, pkgutil, sys

HEAVY = {"torch", "triton", "numpy", "service", "kernels"}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            raise ImportError(f"the client must not import {name}")
        return None

sys.meta_path.insert(0, Refuse())

import rwkvd
import rwkvd.v1
for module in pkgutil.iter_modules(rwkvd.v1.__path__, "rwkvd.v1."):
    __import__(module.name)

rwkvd.Client("127.0.0.1:1").close()

async def main():
    async with rwkvd.AsyncClient("127.0.0.1:1", api_key="k", tls=True):
        pass

asyncio.run(main())
print(sorted(m for m in sys.modules if m.partition(".")[0] in HEAVY))
"""


def test_imports_nothing_of_the_server() -> None:
    result = subprocess.run(
        [sys.executable, "-c", ISOLATED], cwd=CLIENTS.parent, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_runtime_dependencies_are_grpc_and_protobuf_only() -> None:
    project = tomllib.loads((CLIENTS / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower() for spec in project["dependencies"]}
    assert names == {"grpcio", "protobuf", "googleapis-common-protos"}
    assert "optional-dependencies" not in project


def _build_stubs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_stubs", CLIENTS / "build_stubs.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fresh_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stubs generated now from proto/, in a temporary directory."""
    out = tmp_path_factory.mktemp("stubs")
    _build_stubs().generate(out)
    return out / "rwkvd" / "v1"


def _stale(fresh: Path, package: Path) -> list[str]:
    """Names of stub files in `package` that differ from (or are missing in, or extra to) `fresh`."""
    made = {p.name: p for p in fresh.iterdir() if "_pb2" in p.name}
    shipped = {p.name: p for p in package.iterdir() if "_pb2" in p.name and p.suffix in (".py", ".pyi")}
    names = made.keys() | shipped.keys()
    return sorted(
        n for n in names if n not in made or n not in shipped or made[n].read_bytes() != shipped[n].read_bytes()
    )


def test_stubs_match_the_protos(fresh_stubs: Path) -> None:
    assert len(list(fresh_stubs.glob("*_pb2*.py*"))) == 4 * len(
        list((CLIENTS.parent / "proto/rwkvd/v1").glob("*.proto"))
    )
    stale = _stale(fresh_stubs, STUBS)
    assert not stale, f"stale stubs {stale}: run `python clients/build_stubs.py`"


def test_a_stale_stub_is_detected(fresh_stubs: Path, tmp_path: Path) -> None:
    for stub in STUBS.glob("*_pb2*"):
        (tmp_path / stub.name).write_bytes(stub.read_bytes())
    edited = tmp_path / "common_pb2.pyi"
    edited.write_bytes(edited.read_bytes() + b"\n")
    (tmp_path / "removed_pb2.py").write_text("")
    assert _stale(fresh_stubs, tmp_path) == ["common_pb2.pyi", "removed_pb2.py"]
