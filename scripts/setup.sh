#!/usr/bin/env bash
# Sets up a fresh machine (Debian/Ubuntu, Python >= 3.11): etcd, redis, Node.js and Chromium
# from apt, then a virtualenv in .venv with agentmesh installed (editable, with dev extras),
# then the Node client's modules (clients/node/node_modules, as package-lock.json pins them).
#   bash scripts/setup.sh           all three
#   bash scripts/setup.sh system    apt packages only
#   bash scripts/setup.sh python    .venv only
#   bash scripts/setup.sh node      clients/node/node_modules only (npm ci)
# Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    echo "need root (or sudo) to run: $*" >&2
    exit 1
  fi
}

system_packages() {
  local -a extra=()
  # Debian's python3 ships venv/ensurepip in a separate package.
  python3 -c 'import ensurepip, venv' 2>/dev/null || extra+=(python3-venv)
  # Node.js runs clients/node and its integration test. Debian 12 ships Node 18 and npm 9,
  # which the client supports; a Node that is already on PATH (a newer one) is kept.
  command -v node >/dev/null || extra+=(nodejs)
  command -v npm >/dev/null || extra+=(npm)
  # Chromium (headless) runs the dashboard's browser test. Without recommends it is about
  # 81 MB to download and 290 MB installed (Debian 12, chromium 156); the recommends add
  # ~100 packages of desktop integration a headless test does not use.
  local browser=()
  command -v chromium >/dev/null || browser+=(chromium)
  if command -v etcd >/dev/null && command -v redis-server >/dev/null && [[ ${#extra[@]} -eq 0 && ${#browser[@]} -eq 0 ]]; then
    echo "etcd, redis-server, node, npm and chromium already installed; skipping apt-get"
  else
    as_root apt-get update
    # redis-server is only for `agentmesh loadtest --compare celery`
    as_root apt-get install -y etcd-server redis-server "${extra[@]}"
    if [[ ${#browser[@]} -gt 0 ]]; then
      as_root apt-get install -y --no-install-recommends chromium fonts-liberation
    fi
  fi
  echo "python3: $(python3 --version 2>&1) at $(command -v python3)"
  echo "etcd:    $(etcd --version 2>&1 | head -n 1) at $(command -v etcd)"
  echo "node:    $(node --version) at $(command -v node), npm $(npm --version)"
  # Debian's wrapper script prints a shell warning on some machines: keep only the version
  echo "chromium: $(chromium --version 2>/dev/null | head -n 1) at $(command -v chromium)"
}

python_env() {
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet --progress-bar off -e '.[dev,compare]'
  echo "installed: $(.venv/bin/agentmesh --help >/dev/null && echo 'agentmesh OK')"
}

node_modules() {
  # exactly the versions package-lock.json pins (clients/node/.npmrc: no install scripts)
  npm ci --prefix clients/node --no-audit --no-fund
  echo "node client: @grpc/grpc-js $(node -p "require('./clients/node/node_modules/@grpc/grpc-js/package.json').version")"
}

case "${1:-all}" in
  system) system_packages ;;
  python) python_env ;;
  node) node_modules ;;
  all) system_packages; python_env; node_modules ;;
  *) echo "usage: bash scripts/setup.sh [system|python|node|all]" >&2; exit 2 ;;
esac
