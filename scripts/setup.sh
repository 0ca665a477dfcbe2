#!/usr/bin/env bash
# Sets up a fresh machine (Debian/Ubuntu, Python >= 3.11): etcd and redis from apt,
# then a virtualenv in .venv with agentmesh installed (editable, with dev extras).
#   bash scripts/setup.sh           both
#   bash scripts/setup.sh system    apt packages only
#   bash scripts/setup.sh python    .venv only
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
  if command -v etcd >/dev/null && command -v redis-server >/dev/null && [[ ${#extra[@]} -eq 0 ]]; then
    echo "etcd and redis-server already installed; skipping apt-get"
  else
    as_root apt-get update
    # redis-server is only for `agentmesh loadtest --compare celery`
    as_root apt-get install -y etcd-server redis-server "${extra[@]}"
  fi
  echo "python3: $(python3 --version 2>&1) at $(command -v python3)"
  echo "etcd:    $(etcd --version 2>&1 | head -n 1) at $(command -v etcd)"
}

python_env() {
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet --progress-bar off -e '.[dev,compare]'
  echo "installed: $(.venv/bin/agentmesh --help >/dev/null && echo 'agentmesh OK')"
}

case "${1:-all}" in
  system) system_packages ;;
  python) python_env ;;
  all) system_packages; python_env ;;
  *) echo "usage: bash scripts/setup.sh [system|python|all]" >&2; exit 2 ;;
esac
