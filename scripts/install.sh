#!/usr/bin/env bash
# Install Assistant Axis Lab into ./.venv (Python 3.11, CPU). `--dev` adds the test tools and,
# when run as root on Debian, Chromium for the browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/pip --disable-pip-version-check -q"
$PIP install -r requirements.txt
$PIP install --no-deps -r requirements-embedded.txt
if [ "${1:-}" = "--dev" ]; then
  $PIP install -r requirements-dev.txt
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  fi
fi
