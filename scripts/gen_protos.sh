#!/usr/bin/env bash
# Regenerates the committed Python code for protos/ssd/v1/*.proto into ssd-client/ssd_protos/
# (it ships in the client distribution, which the server distribution depends on).
#
# Usage: scripts/gen_protos.sh [OUT_ROOT]    (writes OUT_ROOT/ssd_protos; default OUT_ROOT: ssd-client/)
#        PYTHON=/path/to/python scripts/gen_protos.sh
#
# Layout: the .proto files keep their canonical names (ssd/v1/*.proto, package ssd.v1), so other
# languages, grpcurl and server reflection see `ssd/v1/generation.proto`. protoc's Python plugin
# has no import-prefix option and writes `from ssd.v1 import generation_pb2`, which only resolves
# with ssd_protos/ itself on sys.path. Instead of that (or of renaming the proto files after the
# Python package), we generate under ssd_protos/ and rewrite exactly that import prefix to
# `from ssd_protos.ssd.v1 import ...`: one anchored substitution, checked by
# tests/test_protos_current.py, which runs this script into a temp dir and diffs the result.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_root="${1:-$repo/ssd-client}"
python="${PYTHON:-python3}"
out="$out_root/ssd_protos"

mkdir -p "$out"
rm -f "$out"/ssd/v1/*_pb2.py "$out"/ssd/v1/*_pb2.pyi "$out"/ssd/v1/*_pb2_grpc.py

"$python" -m grpc_tools.protoc -I "$repo/protos" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$repo"/protos/ssd/v1/*.proto

"$python" - "$out/ssd/v1" <<'PY'
import pathlib, re, sys

for path in sorted(pathlib.Path(sys.argv[1]).glob("*_pb2*.py*")):
    text = path.read_text()
    fixed = re.sub(r"^from ssd\.v1 import ", "from ssd_protos.ssd.v1 import ", text, flags=re.M)
    if fixed != text:
        path.write_text(fixed)
PY
