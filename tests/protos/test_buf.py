"""`buf lint` and `buf breaking` (against protos-baseline/, the released API) over
protos/, with the @bufbuild/buf npm package (a prebuilt binary in the package; works
offline). Also: protos/ alone is enough for a generator (no googleapis path)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.npm_cache import installed

ROOT = Path(__file__).resolve().parents[2]
BUF_MANIFEST = json.dumps({"private": True, "dependencies": {"@bufbuild/buf": "1.75.0"}},
                          indent=2).encode()


@pytest.fixture(scope="module")
def buf() -> Path:
    path = installed(BUF_MANIFEST) / ".bin" / "buf"
    assert path.exists(), path
    return path


def _buf(buf: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(buf), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def test_buf_lint_passes(buf: Path) -> None:
    out = _buf(buf, "lint")
    assert out.returncode == 0, out.stdout + out.stderr


def test_buf_breaking_against_the_released_protos(buf: Path) -> None:
    out = _buf(buf, "breaking", "--against", "protos-baseline")
    assert out.returncode == 0, out.stdout + out.stderr


def test_buf_breaking_catches_a_renumbered_field(buf: Path, tmp_path: Path) -> None:
    # The check can fail: a copy of the tree with one field renumbered is rejected.
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", work / "protos")
    shutil.copytree(ROOT / "protos-baseline", work / "protos-baseline")
    shutil.copy2(ROOT / "buf.yaml", work / "buf.yaml")
    common = work / "protos" / "sessiond" / "v1" / "common.proto"
    text = common.read_text()
    assert "int64 total = 9;" in text
    common.write_text(text.replace("int64 total = 9;", "int64 total = 10;"))
    out = _buf(buf, "breaking", "--against", "protos-baseline", cwd=work)
    assert out.returncode != 0
    assert 'field "9" with name "total"' in out.stdout


def test_every_sessiond_proto_has_the_language_options() -> None:
    wanted = ("go_package", "java_package", "java_multiple_files", "java_outer_classname",
              "csharp_namespace", "php_namespace", "ruby_package", "objc_class_prefix")
    for proto in sorted((ROOT / "protos" / "sessiond" / "v1").glob("*.proto")):
        options = set(re.findall(r"^option (\w+) =", proto.read_text(), re.M))
        assert set(wanted) <= options, (proto.name, set(wanted) - options)


def test_protos_dir_alone_is_enough_for_protoc(tmp_path: Path) -> None:
    # Only -I protos plus protoc's own well-known types: every import resolves.
    import grpc_tools

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    files = [str(p.relative_to(ROOT / "protos"))
             for p in sorted((ROOT / "protos").rglob("*.proto"))]
    assert "google/rpc/status.proto" in files
    out = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
                          f"-I{well_known}", f"--descriptor_set_out={tmp_path / 'all.pb'}",
                          *files], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert (ROOT / "protos" / "google" / "LICENSE").read_text().startswith(
        "\n                                 Apache License")
