"""Regenerate the Python code in clients/sessiond/v1 from protos/.

Usage: python tools/gen_protos.py [--check]

--check regenerates into a temporary directory and exits 1 when the committed
files differ (tests/test_codegen.py runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = ROOT / "clients" / "sessiond" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _include_dirs() -> list[str]:
    # protos/ is self-contained (google/rpc/*.proto are vendored there); only the
    # google/protobuf well-known types come from grpc_tools. Only sessiond/v1 is
    # generated: the Python code imports google.rpc.status_pb2 from
    # googleapis-common-protos, built from the same files.
    import grpc_tools

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    return [str(PROTO_ROOT), str(well_known)]


def generate(out_root: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.glob("sessiond/v1/*.proto"))
    rel = [str(p.relative_to(PROTO_ROOT)) for p in protos]
    args = ["grpc_tools.protoc"]
    args += [f"-I{d}" for d in _include_dirs()]
    args += [
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *rel,
    ]
    plugin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    env["PATH"] = f"{plugin_dir}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-m", *args], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"protoc failed:\n{proc.stderr}")
    out_dir = out_root / "sessiond" / "v1"
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when generated code drifts")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        produced = generate(Path(tmp))
        if ns.check:
            committed = sorted(
                p for p in OUT_PACKAGE.iterdir() if p.name.endswith(GENERATED_SUFFIXES)
            )
            drift = {p.name for p in produced} ^ {p.name for p in committed}
            for p in produced:
                target = OUT_PACKAGE / p.name
                if target.exists() and not filecmp.cmp(p, target, shallow=False):
                    drift.add(p.name)
            if drift:
                print("generated code drifted from protos/: " + ", ".join(sorted(drift)))
                print("run: python tools/gen_protos.py")
                return 1
            print("generated code matches protos/")
            return 0
        for p in OUT_PACKAGE.iterdir():
            if p.name.endswith(GENERATED_SUFFIXES):
                p.unlink()
        for p in produced:
            shutil.copy2(p, OUT_PACKAGE / p.name)
        print(f"wrote {len(produced)} files to {OUT_PACKAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
