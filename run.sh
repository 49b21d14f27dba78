#!/usr/bin/env bash
# The two commands of the README, each installing what it needs into ./.venv first:
#   ./run.sh bench [kl-bench options]   the main job: the benchmark table
#   ./run.sh test  [pytest options]     the test suite (with the pinned trainers of tests/trainers)
# An install is skipped when its inputs (build files, C++ sources, pinned requirements) are those
# of the last install into this venv; KL_KERNELS_REINSTALL=1 forces it.
set -euo pipefail
cd "$(dirname "$0")"
venv="${KL_KERNELS_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
quiet="--quiet --disable-pip-version-check"

# install_once NAME FILES... -- COMMAND: runs COMMAND unless FILES hash as at the last NAME install
install_once() {
  local name=$1; shift
  local files=()
  while [ "$1" != "--" ]; do files+=("$1"); shift; done
  shift
  local stamp="$venv/.kl_kernels-$name" digest
  digest=$(cat "${files[@]}" 2>/dev/null | sha256sum | cut -d' ' -f1)
  if [ "${KL_KERNELS_REINSTALL:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
    echo "run.sh: $name up to date in $venv (KL_KERNELS_REINSTALL=1 to reinstall)" >&2
    return 0
  fi
  echo "run.sh: installing $name into $venv" >&2
  "$@"
  echo "$digest" > "$stamp"
}

install_package() {
  # CPU torch from its pinned wheel first: an unpinned torch (or pip's build isolation) pulls a
  # multi-GB CUDA build
  echo "run.sh: [1/3] torch 2.13.0 (CPU build)" >&2
  pip install $quiet torch==2.13.0
  echo "run.sh: [2/3] build tools (ninja, pybind11, setuptools, wheel)" >&2
  pip install $quiet ninja pybind11 setuptools wheel
  echo "run.sh: [3/3] kl_kernels: compiling the C++ kernels (about 3 minutes on 2 cores)" >&2
  pip install $quiet --no-build-isolation -e '.[test,bench]'
}

install_trainers() {
  # the trainers' releases tests/trainers runs against; torch stays the pinned CPU build
  local constraints="$venv/.kl_kernels-constraints.txt"
  echo "torch==2.13.0" > "$constraints"
  echo "run.sh: [1/3] the trainers' dependencies (tests/trainers/requirements.txt; a few minutes)" >&2
  pip install $quiet -c "$constraints" -r tests/trainers/requirements.txt
  echo "run.sh: [2/3] verl, OpenRLHF, deepspeed without their CUDA dependencies (deepspeed builds from source)" >&2
  DS_BUILD_OPS=0 pip install $quiet --no-deps --no-build-isolation -r tests/trainers/requirements-nodeps.txt
  echo "run.sh: [3/3] the engines' and SkyRL's wheels, downloaded into $venv/engines (tests/engines/)" >&2
  pip download $quiet --no-deps -d "$venv/engines" -r tests/engines/requirements.txt
  pip download $quiet --no-deps --python-version 3.12 --only-binary=:all: -d "$venv/engines" \
    -r tests/engines/requirements-py312.txt
  pip install $quiet -c "$constraints" -r tests/engines/requirements-imports.txt
}

sources=(pyproject.toml setup.py run.sh $(find csrc -type f | sort))
install_once package "${sources[@]}" -- install_package
case "${1:-}" in
  bench) shift; exec kl-bench "$@" ;;
  test)
    shift
    install_once trainers tests/trainers/requirements.txt tests/trainers/requirements-nodeps.txt \
      tests/engines/requirements.txt tests/engines/requirements-py312.txt tests/engines/requirements-imports.txt \
      -- install_trainers
    exec python -m pytest "$@" ;;
  *) echo "usage: ./run.sh bench|test [options]" >&2; exit 2 ;;
esac
