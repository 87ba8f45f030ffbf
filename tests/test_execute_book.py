"""tools/execute_book.py: make book's parallel execution into Jupyter Book's cache."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT, chapters

jupyter_cache = pytest.importorskip("jupyter_cache")


def _tool():
    spec = importlib.util.spec_from_file_location("execute_book", ROOT / "tools" / "execute_book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_chapter_states_a_cpu_run_time_the_scheduler_can_read():
    # The ordering hint for a first run (longest first). A header reworded past the pattern would
    # silently put that chapter in toc order, perhaps last.
    tool = _tool()
    assert [p.name for p in tool.toc_notebooks()] == [c.name for c in chapters()]
    for chapter in chapters():
        assert tool.stated_seconds(chapter) > 0, f"{chapter.name}: no '`cpu` about N s/minutes' in its header"
    minutes = {c.stem: tool.stated_seconds(c) / 60 for c in chapters()}
    assert minutes["07_latent_ode"] > minutes["08_poisson"]


def test_cell_timeout_follows_the_profile(monkeypatch):
    # make book on a CUDA machine runs "auto" = colab; the paper-scale gpu profile trains for hours
    # in one cell and must not be cut off at the cpu profile's 600 s.
    tool = _tool()
    assert tool.cell_timeout("smoke", 600) == tool.cell_timeout("cpu", 600) == 600
    assert tool.cell_timeout("colab", 600) == 1200
    assert tool.cell_timeout("gpu", 600) is None
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tool.cell_timeout("auto", 600) == 1200
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tool.cell_timeout("auto", 600) == 600
    with pytest.raises(ValueError, match="unknown profile"):
        tool.cell_timeout("fast", 600)


def _book(tmp: Path, cells: dict[str, str]) -> None:
    (tmp / "book").mkdir()
    (tmp / "_config.yml").write_text("execute:\n  timeout: 60\n")
    (tmp / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n"
                                  + "".join(f"- file: book/{name}\n" for name in cells))
    (tmp / "book" / "intro.md").write_text("# Intro\n")
    for name, source in cells.items():
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, tmp / "book" / f"{name}.ipynb")


@pytest.mark.notebooks
def test_executes_into_the_cache_reports_failures_and_skips_what_is_cached(tmp_path):
    _book(tmp_path, {"good": "import os\nprint('cwd', os.getcwd())", "bad": "raise RuntimeError('boom 123')"})

    def tool():  # as make book runs it
        return subprocess.run([sys.executable, str(ROOT / "tools" / "execute_book.py"), "--root", str(tmp_path),
                               "--jobs", "2"], capture_output=True, text=True, timeout=300)

    first = tool()
    assert first.returncode == 1, first.stdout + first.stderr
    assert "bad.ipynb failed" in first.stderr and "boom 123" in first.stderr
    cache = jupyter_cache.get_cache(str(tmp_path / "_build" / ".jupyter_cache"))
    good = nbformat.read(tmp_path / "book" / "good.ipynb", as_version=4)
    _, executed = cache.merge_match_into_notebook(good)
    out = executed.cells[0].outputs[0]["text"]
    assert out.startswith("cwd ") and str(tmp_path) not in out, "not executed in a temporary folder (run_in_temp)"
    with pytest.raises(KeyError):
        cache.match_cache_notebook(nbformat.read(tmp_path / "book" / "bad.ipynb", as_version=4))
    assert set(json.loads((tmp_path / "_build" / ".execution-seconds.json").read_text())) == {"good.ipynb"}
    # Fixed, the failing notebook runs; the good one is not executed again.
    _book_fix = tmp_path / "book" / "bad.ipynb"
    nb = nbformat.read(_book_fix, as_version=4)
    nb.cells[0].source = "print('fixed')"
    nbformat.write(nb, _book_fix)
    second = tool()
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1 notebook(s), 2 at a time: bad" in second.stdout
