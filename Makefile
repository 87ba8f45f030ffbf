# make book: build the book (executes every chapter, cpu profile on a machine without CUDA).
# make test: the whole test suite (library, every chapter in the smoke profile, strict book build).
# Both bootstrap .venv with `python3 -m venv` and install `-e .[chapters,book,test]` (pins: constraints.txt); nothing is downloaded
# at build time, so they work offline once the packages are installable.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Extra arguments for pytest, e.g. `make test PYTEST_ARGS="-m 'not notebooks'"`.
PYTEST_ARGS ?=

.PHONY: book test bench student grade colab-check gpu-check-wheels clean help
.DEFAULT_GOAL := help

help:
	@echo "make book   execute every chapter and build the HTML book into _build/html"
	@echo "make test   run the test suite: library, chapters (smoke profile), strict book build"
	@echo "make bench  time neuralode against torchdiffeq and draw work-precision diagrams (benchmarks/results; QUICK=1 for a quick try)"
	@echo "make student  write the student notebooks, the autograders and the book's HTML without solutions into _build/course"
	@echo "make grade SUBMISSIONS=dir  grade a folder of submitted notebooks (runs students' code!); writes dir/scores.csv"
	@echo "make colab-check  install the library beside Colab's torch 2.11 on Python 3.13 and run its tests and chapter 1 there (downloads a second torch)"
	@echo "make gpu-check-wheels  download the wheels tools/gpu_check.py carries to a GPU machine (_build/gpu-wheels, under 60 MB)"
	@echo "make clean  remove _build (the virtual environment .venv stays)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The install is a stamp file: it reruns only when pyproject.toml or constraints.txt changes. (-qq: errors only;
# -q would still list every local package index the machine config points at.)
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -qq --disable-pip-version-check -c constraints.txt -e '.[chapters,book,test]'
	@touch $@

# The execution cache only notices changes to a notebook's own cells. Drop it when the library,
# the installed packages or the run profile change, so that the book shows what the code computes now.
CACHE_KEY = $$(cat neuralode/*.py pyproject.toml constraints.txt 2>/dev/null | sha256sum | cut -c1-16)-profile=$${NEURALODE_PROFILE:-auto}

DROP_STALE_CACHE = mkdir -p _build; key="$(CACHE_KEY)"; \
	if [ "$$(cat _build/.cache-key 2>/dev/null)" != "$$key" ]; then \
		rm -rf _build/.jupyter_cache; echo "$$key" > _build/.cache-key; \
	fi

# The chapters execute BOOK_JOBS at a time (default: one per core) into the execution cache before the
# build, which then finds them all there (tools/execute_book.py; the build alone would run them in turn).
BOOK_JOBS ?=
book: $(STAMP)
	@$(DROP_STALE_CACHE)
	$(BIN)/python tools/execute_book.py $(if $(BOOK_JOBS),--jobs $(BOOK_JOBS))
	$(BIN)/jupyter-book build . --keep-going
	$(BIN)/python tools/downloads.py --html _build/html  # the download button's notebooks carry the library
	@echo "The book: $(CURDIR)/_build/html/index.html"

test: $(STAMP)
	$(BIN)/python -m pytest -ra --durations=15 $(PYTEST_ARGS)

# Side-by-side timings and work-precision diagrams; never part of `make test` (timings are not tests).
# QUICK=1: one repeat and every other tolerance (a minute, for trying the scripts; not for reporting).
BENCH_OUT ?= benchmarks/results
QUICK     ?=
bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py --out "$(BENCH_OUT)" $(if $(QUICK),--repeats 1)
	$(BIN)/python benchmarks/work_precision.py --out "$(BENCH_OUT)" $(if $(QUICK),--quick)
	$(BIN)/python benchmarks/sampling.py --out "$(BENCH_OUT)" $(if $(QUICK),--quick)
	@echo "Results: $(abspath $(BENCH_OUT))/"

# The course edition: otter-grader's assign over every chapter, and the book's HTML without
# solutions, rendered from make book's execution cache (tools/course.py explains the format).
# COURSE: where it goes; EXECUTED=dir renders executed notebooks from dir instead of the cache.
COURSE   ?= _build/course
EXECUTED ?=
student: $(STAMP)
	@$(if $(EXECUTED),:,$(DROP_STALE_CACHE))
	$(BIN)/python tools/course.py student --out "$(COURSE)" $(if $(EXECUTED),--executed "$(EXECUTED)")

# Grading runs the students' code: do it in a container or a throwaway account (book/instructors.md).
SUBMISSIONS ?= submissions
TIMEOUT     ?= 600
JOBS        ?= 1
grade: $(STAMP)
	$(BIN)/python tools/course.py grade "$(SUBMISSIONS)" --course "$(COURSE)" --timeout $(TIMEOUT) --jobs $(JOBS)

# Colab's stack (Python 3.13, torch 2.11) in a virtual environment of its own, _build/colab-venv: the library
# must install beside that torch without changing it. Not part of `make test` (a few GB to download).
colab-check:
	bash tools/colab_check.sh

clean:
	rm -rf _build

# The wheels tools/gpu_check.py installs on a GPU machine without network (README: Checking a GPU).
gpu-check-wheels: $(STAMP)
	$(BIN)/python tools/gpu_check.py --fetch-wheels _build/gpu-wheels
