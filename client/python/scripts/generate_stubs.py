"""Generates the gRPC stubs shipped in warden_client/_proto from proto/.

    python scripts/generate_stubs.py            # rewrite the shipped stubs
    python scripts/generate_stubs.py --out DIR  # write them elsewhere (tests)

Needs grpcio-tools and mypy-protobuf (the "dev" extra). The generated
imports are rewritten to live under warden_client._proto.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "warden_client" / "_proto"
PROTO_ROOT = HERE.parent.parent.parent / "proto"
FILES = ["warden/v1/warden.proto", "warden/v1/admin.proto"]


def generate(out: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        # protoc-gen-mypy lives next to the interpreter in a virtualenv.
        env_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        os.environ["PATH"] = env_path
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            *FILES,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        for src in Path(tmp).rglob("*"):
            if src.is_dir():
                continue
            rel = src.relative_to(tmp)
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            text = src.read_text()
            text = re.sub(r"^from warden\.v1 import", "from warden_client._proto.warden.v1 import", text, flags=re.M)
            text = re.sub(r"^import warden\.v1\.", "import warden_client._proto.warden.v1.", text, flags=re.M)
            dest.write_text(text)
    for pkg in [out, out / "warden", out / "warden" / "v1"]:
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from proto/ by scripts/generate_stubs.py; do not edit."""\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PACKAGE)
    args = parser.parse_args()
    if args.out == PACKAGE and PACKAGE.exists():
        shutil.rmtree(PACKAGE)
    args.out.mkdir(parents=True, exist_ok=True)
    generate(args.out)
    print(f"stubs written to {args.out}")


if __name__ == "__main__":
    main()
