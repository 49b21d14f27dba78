#!/usr/bin/env bash
# The two commands of the README, each installing what it needs into ./.venv first:
#   ./run.sh bench [kl-bench options]   the main job: the benchmark table
#   ./run.sh test  [pytest options]     the test suite
set -euo pipefail
cd "$(dirname "$0")"
venv="${KL_KERNELS_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
quiet="--quiet --disable-pip-version-check"
# CPU torch from its pinned wheel first: an unpinned torch (or pip's build isolation) pulls a
# multi-GB CUDA build
pip install $quiet torch==2.13.0
pip install $quiet ninja pybind11 setuptools wheel
pip install $quiet --no-build-isolation -e '.[test,bench]'
case "${1:-}" in
  bench) shift; exec kl-bench "$@" ;;
  test) shift; exec python -m pytest "$@" ;;
  *) echo "usage: ./run.sh bench|test [options]" >&2; exit 2 ;;
esac
