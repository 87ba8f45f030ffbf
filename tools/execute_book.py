"""Execute the book's notebooks into Jupyter Book's execution cache, several at a time.

``jupyter-book build`` executes the notebooks it does not find in its cache one after the other, as
it reads them. Most chapters train small models with one thread, so on a machine with two cores
half of it would wait. ``make book`` therefore runs this script first: it puts every notebook of
``_toc.yml`` that the cache does not already hold into jupyter-cache's project and executes them
with ``--jobs`` worker processes (default: the number of cores), exactly as ``jupyter-book build``
would (a temporary working directory per notebook, errors not allowed), and caches the results. The
build then finds every notebook in the cache.

The cell timeout follows the run profile (``NEURALODE_PROFILE``, resolved as the chapters resolve it):
``_config.yml``'s ``execute.timeout`` for ``smoke`` and ``cpu``, twice that for ``colab`` (a slower
free GPU, or its CPU), and none for ``gpu``, whose paper-scale cells train for an hour or more (they
checkpoint every epoch). So ``make book`` also passes on a CUDA machine, where ``auto`` means ``colab``.

Notebooks start longest first, by the seconds each took the last time it ran here (kept in
``_build/.execution-seconds.json``, which outlives the cache) or else by the ``cpu`` run time its
header states, so that the longest chapter does not start last.

    python tools/execute_book.py [--jobs N] [--root .] [--cache ROOT/_build/.jupyter_cache]

Exits non-zero, printing each failing notebook's traceback, when one fails (``execute.raise_on_error``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
TIMINGS = ROOT / "_build" / ".execution-seconds.json"


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    """The notebooks of root/_toc.yml, in its order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    files: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return [root / f"{f}.ipynb" for f in files if (root / f"{f}.ipynb").is_file()]


_RUN_TIME = re.compile(r"`cpu` (?:about |[\d.]+ to )?([\d.]+) (s|minutes?)\b")


def stated_seconds(notebook: Path) -> float:
    """The cpu run time a chapter's header states (0 if it states none): an ordering hint only."""
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells[:3]:
        match = _RUN_TIME.search(cell.source)
        if match:
            return float(match.group(1)) * (1 if match.group(2) == "s" else 60)
    return 0.0


def cell_timeout(profile: str, configured: int) -> int | None:
    """Seconds one cell may run in ``profile`` (a name or ``auto``); None: no limit."""
    import neuralode

    name = neuralode.resolve_profile(profile)
    return {"smoke": configured, "cpu": configured, "colab": 2 * configured, "gpu": None}[name]


def _execute(cache_dir: str, pk: int, timeout: int | None) -> tuple[int, float, str | None]:
    """Worker: execute project notebook ``pk`` in a temporary directory and cache it.
    Returns (pk, seconds, traceback or None)."""
    from jupyter_cache import get_cache
    from jupyter_cache.cache.db import NbProjectRecord
    from jupyter_cache.executors.utils import create_cache_bundle, single_nb_execution

    cache = get_cache(cache_dir)
    project_nb = cache.get_project_notebook(pk)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:
        result = single_nb_execution(project_nb.nb, cwd=cwd, timeout=timeout, allow_errors=False,
                                     meta_override=True)
    seconds = time.perf_counter() - start
    if result.err is not None:
        NbProjectRecord.set_traceback(project_nb.uri, result.exc_string, cache.db)
        return pk, seconds, result.exc_string or repr(result.err)
    cache.cache_notebook_bundle(create_cache_bundle(project_nb, None, None, result.time, None),
                                check_validity=False, overwrite=True)
    return pk, seconds, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="notebooks executed at the same time (default: the number of cores)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the book's folder (with _toc.yml, _config.yml)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="jupyter-cache folder (default, Jupyter Book's: ROOT/_build/.jupyter_cache)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    cache_dir = args.cache or root / "_build" / ".jupyter_cache"
    timings_path = root / "_build" / TIMINGS.name
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    from jupyter_cache import get_cache

    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8")).get("execute", {})
    profile = os.environ.get("NEURALODE_PROFILE", "auto")
    timeout = cell_timeout(profile, int(config.get("timeout", 30)))
    cache = get_cache(str(cache_dir))
    todo = {}
    for notebook in toc_notebooks(root):
        try:
            cache.match_cache_notebook(nbformat.read(notebook, as_version=4))
            continue                                     # executed before, and unchanged since
        except KeyError:
            pass
        todo[cache.add_nb_to_project(str(notebook)).pk] = notebook
    if not todo:
        print("execute_book: every notebook is in the cache")
        return 0

    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    order = sorted(todo, key=lambda pk: -timings.get(todo[pk].name, stated_seconds(todo[pk])))
    print(f"execute_book: profile {profile}, cell timeout {f'{timeout} s' if timeout else 'none'}; "
          f"{len(order)} notebook(s), {args.jobs} at a time: "
          + ", ".join(todo[pk].stem for pk in order), flush=True)
    failed = {}
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(_execute, str(cache_dir), pk, timeout) for pk in order]
        for future in as_completed(futures):
            pk, seconds, error = future.result()
            name = todo[pk].name
            print(f"execute_book: {name} {'FAILED' if error else 'done'} in {seconds:.0f} s "
                  f"({time.perf_counter() - start:.0f} s since the start)", flush=True)
            if error:
                failed[name] = error
            else:
                timings[name] = round(seconds, 1)
    timings_path.parent.mkdir(parents=True, exist_ok=True)
    timings_path.write_text(json.dumps(timings, indent=1, sort_keys=True))
    for name, error in failed.items():
        print(f"\nexecute_book: {name} failed:\n{error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
