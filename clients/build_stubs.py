"""Generates the typed Python stubs of rwkvd's protos into rwkvd/v1/ (the only way they are made).

Used three ways: as the hatch build hook of the client package (so `pip install` and wheel builds
generate them), by hand (`python clients/build_stubs.py`), and by the staleness test, which generates
into a temporary directory and compares. Needs grpcio-tools and mypy-protobuf (build requirements).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PACKAGE_DIR = HERE / "rwkvd" / "v1"


def proto_root() -> Path:
    """The proto tree: inside the project when built from an sdist, else the repository's proto/."""
    for candidate in (HERE / "proto", HERE.parent / "proto"):
        if (candidate / "rwkvd" / "v1").is_dir():
            return candidate
    raise FileNotFoundError(f"no proto/rwkvd/v1 beside or above {HERE}")


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # imported here: only the build needs grpcio-tools

    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    code = protoc.main(["grpc_tools.protoc", f"-I{include}", *args])
    if code != 0:
        raise RuntimeError(f"protoc failed ({code}): {' '.join(args)}")


def _plugin(directory: Path, name: str, entry: str) -> str:
    """A protoc plugin launcher running mypy-protobuf's `entry` with this interpreter.

    The console scripts of mypy-protobuf are not next to sys.executable inside pip's isolated build
    environment (they are on its PYTHONPATH only), so protoc gets launchers that import them.
    """
    path = directory / name
    path.write_text(f"#!{sys.executable}\nimport sys\nfrom mypy_protobuf.main import {entry}\nsys.exit({entry}())\n")
    path.chmod(0o755)
    return f"--plugin={name}={path}"


def generate(out_root: Path, root: Path | None = None) -> list[Path]:
    """Writes rwkvd/v1/*_pb2.py, *_pb2_grpc.py and their .pyi under out_root; returns the files."""
    root = root or proto_root()
    protos = sorted(str(p.relative_to(root)) for p in (root / "rwkvd" / "v1").glob("*.proto"))
    out_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as plugin_dir:
        _protoc(
            [
                f"-I{root}",
                f"-I{root / 'third_party'}",
                _plugin(Path(plugin_dir), "protoc-gen-mypy", "main"),
                _plugin(Path(plugin_dir), "protoc-gen-mypy_grpc", "grpc"),
                f"--python_out={out_root}",
                f"--grpc_python_out={out_root}",
                f"--mypy_out=quiet:{out_root}",
                f"--mypy_grpc_out=quiet:{out_root}",
                *protos,
            ]
        )
    out_dir = out_root / "rwkvd" / "v1"
    return sorted(p for p in out_dir.iterdir() if p.name.endswith((".py", ".pyi")) and "_pb2" in p.name)


def generate_in_tree() -> list[Path]:
    """Regenerates the stubs inside clients/rwkvd/v1/ (via a temporary directory, then a copy)."""
    with tempfile.TemporaryDirectory() as tmp:
        made = generate(Path(tmp))
        for stale in PACKAGE_DIR.glob("*_pb2*"):
            stale.unlink()
        return [Path(shutil.copy2(f, PACKAGE_DIR / f.name)) for f in made]


try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # running by hand or from the test, without hatchling
    BuildHookInterface = object


class StubBuildHook(BuildHookInterface):  # type: ignore[misc,valid-type]
    """Hatch hook: generate before every build, ship the (git-ignored) files as artifacts."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        made = generate_in_tree()
        build_data.setdefault("artifacts", []).extend(str(p.relative_to(HERE)) for p in made)


if __name__ == "__main__":
    for path in generate_in_tree():
        print(path.relative_to(HERE.parent))
