#!/usr/bin/env bash
# Regenerates the Python modules for protos/agentmesh/v1/*.proto.
# The .proto files import each other as "agentmesh/v1/x.proto" (the path any
# other language uses); the generated Python lives in the package
# protos.agentmesh.v1, so the imports are rewritten to that package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
out=protos/agentmesh/v1
rm -f "$out"/*_pb2*.py "$out"/*_pb2*.pyi
"$PY" -m grpc_tools.protoc -I protos \
  --python_out=protos --pyi_out=protos --grpc_python_out=protos \
  protos/agentmesh/v1/*.proto
sed -i -E 's/^from agentmesh\.v1 import /from protos.agentmesh.v1 import /' "$out"/*_pb2*.py "$out"/*_pb2*.pyi
