#!/usr/bin/env bash
# make colab-check: install the library the way a Colab user would, beside Colab's own torch, and
# run the library's tests and chapter 1 there. Not part of `make test`: it downloads a second torch
# (torch 2.11 with its CUDA libraries, a few GB) into its own virtual environment.
#
#   COLAB_PYTHON   a Python 3.13 interpreter (default: pyenv's 3.13.0 when present, else python3.13)
#   COLAB_VENV     where the environment goes (default: _build/colab-venv; reused when present)
#   COLAB_TESTS    the library tests to run there (default: below)
#
# Colab's image (December 2026): Python 3.13, torch 2.11, torchvision 0.26. The check fails if
# installing the library changes torch's or torchvision's version, if a library test fails, or if
# chapter 1 (smoke profile) does not run to its end there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
COLAB_TORCH=2.11.0
COLAB_TORCHVISION=0.26.0
COLAB_PYTHON=${COLAB_PYTHON:-$( [ -x "$HOME/.pyenv/versions/3.13.0/bin/python" ] && echo "$HOME/.pyenv/versions/3.13.0/bin/python" || command -v python3.13 || true)}
COLAB_VENV=${COLAB_VENV:-$ROOT/_build/colab-venv}
COLAB_TESTS=${COLAB_TESTS:-tests/test_odeint.py tests/test_adjoint.py tests/test_cnf.py tests/test_latent.py \
tests/test_nets.py tests/test_training.py tests/test_stiff.py tests/test_torchdiffeq_parity.py tests/test_packaging.py}
OUT=$ROOT/_build/colab-check
[ -n "$COLAB_PYTHON" ] || { echo "colab-check: no Python 3.13 found; set COLAB_PYTHON" >&2; exit 2; }
"$COLAB_PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 13), sys.version' \
  || { echo "colab-check: COLAB_PYTHON must be Python 3.13 (Colab's)" >&2; exit 2; }
mkdir -p "$OUT"

if [ ! -x "$COLAB_VENV/bin/python" ]; then
  echo "colab-check: creating $COLAB_VENV with $COLAB_PYTHON and Colab's torch $COLAB_TORCH (a large download)"
  "$COLAB_PYTHON" -m venv "$COLAB_VENV"
  # What Colab has before the user runs anything, plus what runs the tests and a notebook.
  "$COLAB_VENV/bin/python" -m pip install -q "torch==$COLAB_TORCH" "torchvision==$COLAB_TORCHVISION" \
    pytest pyyaml nbformat papermill ipykernel "setuptools>=77"
  "$COLAB_VENV/bin/python" -m pip install -q --no-deps torchdiffeq
fi
PY=$COLAB_VENV/bin/python
versions() { "$PY" -c 'import torch, torchvision; print(torch.__version__.split("+")[0], torchvision.__version__.split("+")[0])'; }
before=$(versions)
[ "$before" = "$COLAB_TORCH $COLAB_TORCHVISION" ] || { echo "colab-check: the environment has torch/torchvision $before, not Colab's" >&2; exit 1; }

# The library as a user gets it: a wheel (not an editable checkout), with the chapters' extra.
rm -rf "$OUT/wheel" && mkdir -p "$OUT/wheel"
"$PY" -m pip wheel -q --no-deps -w "$OUT/wheel" "$ROOT"
"$PY" -m pip install -q --force-reinstall --no-deps "$OUT"/wheel/neuralode-*.whl
"$PY" -m pip install -q "$(ls "$OUT"/wheel/neuralode-*.whl)[chapters]"
after=$(versions)
echo "colab-check: torch, torchvision before the install: $before; after: $after"
[ "$before" = "$after" ] || { echo "colab-check: installing neuralode changed torch or torchvision" >&2; exit 1; }

# The library's tests, against the installed wheel: pytest's own script, so that the checkout's
# folder is not on sys.path and `import neuralode` finds the wheel (checked first).
where=$(cd "$OUT" && "$PY" -c 'import neuralode; print(neuralode.__file__)')
case "$where" in "$COLAB_VENV"/*) ;; *) echo "colab-check: neuralode imported from $where, not the wheel" >&2; exit 1;; esac
"$COLAB_VENV/bin/pytest" -q -p no:cacheprovider -m "not notebooks" $COLAB_TESTS 2>&1 | tee "$OUT/tests.log" | tail -3
grep -q " passed" "$OUT/tests.log" && ! grep -qE "[0-9]+ (failed|errors?)\b" "$OUT/tests.log"

# Chapter 1 in the Colab environment, in the smoke profile (a Colab profile is still to come).
NEURALODE_PROFILE=smoke "$PY" -m papermill book/01_resnets_are_euler.ipynb "$OUT/01_resnets_are_euler.ipynb" \
  -p PROFILE smoke -k python3 --cwd "$OUT" --no-progress-bar
echo "colab-check: passed (Python 3.13, torch and torchvision $after; $(grep -oE '[0-9]+ passed' "$OUT/tests.log"); chapter 1 ran)"
