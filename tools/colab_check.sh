#!/usr/bin/env bash
# make colab-check: what a Colab user does with a chapter downloaded from the book. In an environment
# with Colab's Python and torch and no neuralode, chapter 1's downloaded notebook (tools/downloads.py:
# it carries the library's wheel) must install the library itself, change nothing installed (torch,
# torchvision, ... keep their versions) and run to its end; then the library's tests run against
# that install. Not part of `make test`: it downloads a second torch (with its CUDA libraries, a few
# GB) into its own virtual environment.
#
#   COLAB_PYTHON   a Python 3.13 interpreter (default: pyenv's 3.13.0 when present, else python3.13)
#   COLAB_VENV     where the environment goes (default: _build/colab-venv; reused when present)
#   COLAB_PROFILE  the chapter's run profile (default: colab)
#   COLAB_TESTS    the library tests to run there (default: below)
#
# Colab's image (December 2026): Python 3.13, torch 2.11, torchvision 0.26, google.colab imported by
# the kernel at start (here: a stand-in on the kernel's path, imported by an IPython startup file).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS=0
COLAB_TORCH=2.11.0
COLAB_TORCHVISION=0.26.0
COLAB_PYTHON=${COLAB_PYTHON:-$( [ -x "$HOME/.pyenv/versions/3.13.0/bin/python" ] && echo "$HOME/.pyenv/versions/3.13.0/bin/python" || command -v python3.13 || true)}
COLAB_VENV=${COLAB_VENV:-$ROOT/_build/colab-venv}
COLAB_PROFILE=${COLAB_PROFILE:-colab}
COLAB_TESTS=${COLAB_TESTS:-tests/test_odeint.py tests/test_adjoint.py tests/test_cnf.py tests/test_latent.py \
tests/test_nets.py tests/test_training.py tests/test_stiff.py tests/test_torchdiffeq_parity.py tests/test_packaging.py}
OUT=$ROOT/_build/colab-check
fail() { echo "colab-check: $*" >&2; exit 1; }
[ -n "$COLAB_PYTHON" ] || { echo "colab-check: no Python 3.13 found; set COLAB_PYTHON" >&2; exit 2; }
"$COLAB_PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 13), sys.version' \
  || { echo "colab-check: COLAB_PYTHON must be Python 3.13 (Colab's)" >&2; exit 2; }
rm -rf "$OUT" && mkdir -p "$OUT/run"

if [ ! -x "$COLAB_VENV/bin/python" ]; then
  echo "colab-check: creating $COLAB_VENV with $COLAB_PYTHON and Colab's torch $COLAB_TORCH (a large download)"
  "$COLAB_PYTHON" -m venv "$COLAB_VENV"
  # What Colab has before the user runs anything, plus what runs the tests and a notebook, and
  # setuptools to build the wheel offline (tools/downloads.py).
  "$COLAB_VENV/bin/python" -m pip install -qq "torch==$COLAB_TORCH" "torchvision==$COLAB_TORCHVISION" \
    pytest pyyaml nbformat papermill ipykernel "setuptools>=77"
  "$COLAB_VENV/bin/python" -m pip install -qq --no-deps torchdiffeq
fi
PY=$COLAB_VENV/bin/python
versions() { "$PY" -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")'; }
# The check starts where a Colab user starts: no neuralode (a previous run installed it).
"$PY" -m pip uninstall -qq -y neuralode 2>/dev/null || true
(cd "$OUT" && "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("neuralode") is not None)') \
  || fail "neuralode is still importable in $COLAB_VENV after uninstalling it"
before=$(versions)
echo "$before" | grep -qE "^torch $COLAB_TORCH(\+[a-z0-9.]+)?, torchvision $COLAB_TORCHVISION(\+[a-z0-9.]+)?$" \
  || fail "the environment has $before, not Colab's torch $COLAB_TORCH and torchvision $COLAB_TORCHVISION"
"$PY" -m pip list --format=freeze 2>/dev/null | sort > "$OUT/installed-before.txt"

# Chapter 1 as the book's download button gives it: the setup cell carries this checkout's wheel.
"$PY" - "$OUT" <<'EOF'
import pathlib, sys
import nbformat
sys.path.insert(0, "tools")
import downloads
out = pathlib.Path(sys.argv[1])
wheel = downloads.build_wheel(out / "wheel", python=sys.executable)
notebook = downloads.embed_wheel(nbformat.read("book/01_resnets_are_euler.ipynb", as_version=4), wheel)
nbformat.write(notebook, out / "01_resnets_are_euler.ipynb")
print(f"colab-check: chapter 1's download carries {wheel.name} ({wheel.stat().st_size / 1024:.0f} KiB)")
EOF

# The stand-in for google.colab, which Colab's kernel imports at start; the marker proves the kernel did.
mkdir -p "$OUT/fake-colab/google/colab" "$OUT/ipython/profile_default/startup"
cat > "$OUT/fake-colab/google/colab/__init__.py" <<'EOF'
"""A stand-in for Colab's google.colab (make colab-check): the kernel imports it at start, as on Colab."""
import os, pathlib
pathlib.Path(os.environ["COLAB_CHECK_MARKER"]).write_text(f"imported by process {os.getpid()}\n")
EOF
cat > "$OUT/fake-colab/google/colab/drive.py" <<'EOF'
def mount(*args, **kwargs):
    raise NotImplementedError("make colab-check's stand-in for google.colab has no Google Drive to mount")
EOF
echo "import google.colab" > "$OUT/ipython/profile_default/startup/00-google-colab.py"

# The kernel is this environment's python3 (JUPYTER_PATH first), started in an empty folder, so
# that `import neuralode` can only find what the notebook installs.
PYTHONPATH="$OUT/fake-colab" IPYTHONDIR="$OUT/ipython" COLAB_CHECK_MARKER="$OUT/google-colab-imported" \
JUPYTER_PATH="$COLAB_VENV/share/jupyter" NEURALODE_PROFILE="$COLAB_PROFILE" \
  "$PY" -m papermill "$OUT/01_resnets_are_euler.ipynb" "$OUT/01_resnets_are_euler.executed.ipynb" \
  -p PROFILE "$COLAB_PROFILE" -k python3 --cwd "$OUT/run" --no-progress-bar --log-output > "$OUT/chapter1.log" 2>&1 \
  || { tail -40 "$OUT/chapter1.log"; fail "chapter 1's downloaded notebook failed (log: $OUT/chapter1.log)"; }
[ -s "$OUT/google-colab-imported" ] || fail "the kernel did not import the google.colab stand-in"
grep -q "Installed neuralode" "$OUT/chapter1.log" || fail "the notebook's setup cell did not install neuralode"

after=$(versions)
echo "colab-check: before the notebook: $before; after: $after"
[ "$before" = "$after" ] || fail "installing neuralode changed torch or torchvision"
"$PY" -m pip list --format=freeze 2>/dev/null | sort > "$OUT/installed-after.txt"
changed=$(comm -23 "$OUT/installed-before.txt" "$OUT/installed-after.txt")
[ -z "$changed" ] || fail "installing neuralode replaced or removed packages that were there: $changed"
echo "colab-check: the notebook added $(comm -13 "$OUT/installed-before.txt" "$OUT/installed-after.txt" | tr '\n' ' ')"

# The library's tests, against what the notebook installed: pytest's own script, so that the
# checkout's folder is not on sys.path and `import neuralode` finds the wheel (checked first).
where=$(cd "$OUT" && "$PY" -c 'import neuralode; print(neuralode.__file__)')
case "$where" in "$COLAB_VENV"/*) ;; *) fail "neuralode imported from $where, not the wheel";; esac
"$COLAB_VENV/bin/pytest" -q -p no:cacheprovider -m "not notebooks" $COLAB_TESTS 2>&1 | tee "$OUT/tests.log" | tail -3 \
  || fail "library tests failed (log: $OUT/tests.log)"
grep -q " passed" "$OUT/tests.log" && ! grep -qE "[0-9]+ (failed|errors?)\b" "$OUT/tests.log" || fail "library tests failed"
echo "colab-check: passed in ${SECONDS}s (Python 3.13, $after unchanged; chapter 1 downloaded, installed" \
  "the library and ran in the $COLAB_PROFILE profile; $(grep -oE '[0-9]+ passed' "$OUT/tests.log"))"
