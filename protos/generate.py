"""Regenerate the Python gRPC code from optserve.proto.

    python protos/generate.py          # rewrite protos/optserve_pb2*.py
    python protos/generate.py --check  # exit 1 if the checked-in code is stale

The .proto is compiled as ``optserve/protos/optserve.proto`` so that the
generated modules import each other as ``optserve.protos.*``.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
PROTO = "optserve.proto"
OUTPUTS = ("optserve_pb2.py", "optserve_pb2.pyi", "optserve_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp, "src")
        (src / "optserve" / "protos").mkdir(parents=True)
        shutil.copy(HERE / PROTO, src / "optserve" / "protos" / PROTO)
        gen = pathlib.Path(tmp, "gen")
        gen.mkdir()
        args = [
            "protoc",
            f"-I{src}",
            f"--python_out={gen}",
            f"--pyi_out={gen}",
            f"--grpc_python_out={gen}",
            f"optserve/protos/{PROTO}",
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        for name in OUTPUTS:
            shutil.copy(gen / "optserve" / "protos" / name, out_dir / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    if not args.check:
        generate(HERE)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        stale = [n for n in OUTPUTS if (HERE / n).read_bytes() != pathlib.Path(tmp, n).read_bytes()]
    if stale:
        print("stale generated code: " + ", ".join(stale) + "; run: python protos/generate.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
