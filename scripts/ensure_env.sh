#!/usr/bin/env bash
# Source this file: makes sure the project's virtual environment exists and matches the pinned
# requirements, installs lib/ in editable mode, and installs Debian's Fashion-MNIST where apt and
# root are available. Then puts the environment first on PATH.
#   ADV_VENV   where the environment lives (default: <repo>/.venv)
#   PYTHON     interpreter used to create it (default: python3.11, else python3)
set -euo pipefail
ADV_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ADV_VENV="${ADV_VENV:-$ADV_REPO/.venv}"

if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[env] installing Debian's dataset-fashion-mnist"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "[env] warning: could not install dataset-fashion-mnist; the quick profile will report Fashion-MNIST as unavailable"
fi
# Debian's chromium for the explorer's browser test (Playwright drives it; no browser download).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[env] installing Debian's chromium (browser test)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "[env] warning: could not install chromium; tests/test_browser.py will skip"
fi

# pip output goes to a log, shown only when pip fails.
pip_logged() { "$ADV_VENV/bin/python" -m pip "$@" >>"$ADV_VENV/pip.log" 2>&1 || { tail -n 40 "$ADV_VENV/pip.log"; return 1; }; }
stamp_of() { cat "$ADV_REPO"/requirements*.txt "$ADV_REPO/pyproject.toml" | sha256sum | cut -c1-16; }
want="$(stamp_of)"
if [ ! -x "$ADV_VENV/bin/python" ]; then
  py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  echo "[env] creating virtual environment $ADV_VENV with $py"
  "$py" -m venv "$ADV_VENV"
  pip_logged install -q --upgrade pip setuptools wheel
fi
if [ "$(cat "$ADV_VENV/.requirements-stamp" 2>/dev/null)" != "$want" ]; then
  echo "[env] installing pinned requirements (first time: several minutes, torch is large)"
  pip_logged install -q -r "$ADV_REPO/requirements.txt" -r "$ADV_REPO/requirements-dev.txt"
  pip_logged install -q --no-deps -r "$ADV_REPO/requirements-oracles.txt"
  echo "$want" > "$ADV_VENV/.requirements-stamp"
fi
# Editable install of lib/, pointed at this checkout (cheap; keeps a shared environment honest).
pip_logged install -q --no-deps --no-build-isolation -e "$ADV_REPO"
export PATH="$ADV_VENV/bin:$PATH"
export ADV_VENV ADV_REPO
