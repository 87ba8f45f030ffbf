"""tools/downloads.py: the notebook the book's download button gives carries the library and installs it.

The setup cell runs here in a subprocess started with ``python -S`` (no site-packages, so no
``neuralode`` and no torch; checked first), with a fake ``pip`` on ``PYTHONPATH`` that records
its command line, or with the real pip installing offline into a folder (``--no-deps --target``).
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT, BookBuild, chapters, load_yaml


def _tool():
    spec = importlib.util.spec_from_file_location("downloads", ROOT / "tools" / "downloads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


downloads = _tool()
URL = "https://example.org/neural-ode-book.git"
FAKE_PIP = """\
import json, os, pathlib, sys
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
dist = pathlib.Path(os.environ["FAKE_SITE"]) / "neuralode-0.1.0.dist-info"
dist.mkdir(exist_ok=True)
(dist / "METADATA").write_text("Metadata-Version: 2.1\\nName: neuralode\\nVersion: 0.1.0\\n")
"""


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The library's wheel, built once per session from this checkout."""
    return downloads.build_wheel(tmp_path_factory.mktemp("wheel"))


def _site_with_torch(folder: Path) -> Path:
    """A folder for PYTHONPATH whose only distribution is torch's metadata (the torch 'already there')."""
    dist = folder / "torch-2.11.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0\n")
    return folder


def _run_cell(source: str, tmp_path: Path, *, isolated: bool = True, colab: bool = False,
              pythonpath: tuple[Path, ...] = (), env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs a setup cell's code in a fresh interpreter; ``isolated``: one that cannot import neuralode."""
    prelude = ["import importlib.util, sys, types"]
    if isolated:
        prelude.append('assert importlib.util.find_spec("neuralode") is None, "the isolation failed"')
    if colab:
        prelude.append('sys.modules["google.colab"] = types.ModuleType("google.colab")')
    script = tmp_path / "cell.py"
    script.write_text("\n".join(prelude) + "\n" + source + "\n", encoding="utf-8")
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath)), **(env or {})}
    return subprocess.run([sys.executable, *(["-S"] if isolated else []), str(script)], cwd=tmp_path,
                          env=full_env, capture_output=True, text=True, timeout=300)


def _fake_pip(tmp_path: Path) -> tuple[tuple[Path, ...], dict[str, str], Path]:
    """PYTHONPATH, environment and log file for a fake ``python -m pip`` that records its arguments."""
    fake = tmp_path / "fake-pip"
    (fake / "pip").mkdir(parents=True)
    (fake / "pip" / "__init__.py").write_text("")
    (fake / "pip" / "__main__.py").write_text(FAKE_PIP)
    site = _site_with_torch(tmp_path / "site")
    log = tmp_path / "pip.log"
    return (fake, site), {"FAKE_PIP_LOG": str(log), "FAKE_SITE": str(site)}, log


def _pip_calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _tiny_notebook(repository_url: str = URL) -> nbformat.NotebookNode:
    setup = nbformat.v4.new_code_cell(downloads.setup_cell_source(repository_url=repository_url),
                                      metadata={"tags": ["remove-input", "setup"]})
    return nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# A chapter"),
        setup,
        nbformat.v4.new_code_cell('PROFILE = "auto"', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import neuralode as node"),
    ])


def _embedded(wheel: Path, repository_url: str = URL) -> str:
    return downloads.setup_cell_source(wheel.name, base64.b64encode(wheel.read_bytes()).decode(), repository_url)


# ------------------------------------------------------------------------------ the setup cell
def test_cell_installs_the_wheel_it_carries_with_the_chapters_extra_and_never_names_torch(wheel, tmp_path):
    pythonpath, env, log = _fake_pip(tmp_path)
    result = _run_cell(_embedded(wheel), tmp_path, pythonpath=pythonpath, env=env)
    assert result.returncode == 0, result.stderr
    calls = _pip_calls(log)
    assert len(calls) == 1, f"pip ran {len(calls)} times: {calls}"
    *options, target = calls[0]
    assert options == ["install", "-q"] and target.endswith("[chapters]"), calls[0]
    decoded = Path(target.removesuffix("[chapters]"))
    assert decoded.name == wheel.name, "pip reads the version from the wheel's file name: keep it"
    assert decoded.read_bytes() == wheel.read_bytes(), "the wheel the cell decodes differs from the one embedded"
    assert not any("torch" in arg for arg in calls[0]), f"the cell names torch to pip: {calls[0]}"
    assert f"pip install {target}" in result.stdout, "the cell must say what it installs"
    assert "Installed neuralode 0.1.0 beside torch 2.11.0." in result.stdout, result.stdout


def test_cell_does_nothing_where_neuralode_imports(wheel, tmp_path):
    pythonpath, env, log = _fake_pip(tmp_path)
    for source in (_embedded(wheel), downloads.setup_cell_source(repository_url=URL)):
        # This environment has neuralode (editable): the cell must neither install nor print.
        result = _run_cell(source, tmp_path, isolated=False, colab=True, pythonpath=pythonpath, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "" and _pip_calls(log) == [], (result.stdout, _pip_calls(log))


def test_real_pip_accepts_the_cells_command_and_installs_the_library(wheel, tmp_path):
    # The real pip, offline, without dependencies, into a folder: the wheel's name and the
    # "path[chapters]" form are what pip accepts, and what lands is this checkout's library.
    target = _site_with_torch(tmp_path / "target")
    env = {"PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1", "PIP_TARGET": str(target), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = _run_cell(_embedded(wheel), tmp_path, pythonpath=(target,), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    for module in sorted((ROOT / "neuralode").glob("*.py")):
        installed = target / "neuralode" / module.name
        assert installed.is_file() and installed.read_bytes() == module.read_bytes(), f"{module.name} differs"
    assert "Installed neuralode 0.1.0 beside torch 2.11.0." in result.stdout, result.stdout


def test_cell_without_a_wheel_says_how_to_get_the_library(tmp_path):
    pythonpath, env, log = _fake_pip(tmp_path)
    # Outside Colab a repository URL is no reason to pip install from git: a clone installs itself.
    for source in (downloads.setup_cell_source(), downloads.setup_cell_source(repository_url=URL)):
        result = _run_cell(source, tmp_path, pythonpath=pythonpath, env=env)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, result.stderr
        assert "download button" in result.stderr and "pip install -e '.[chapters]'" in result.stderr
    assert _pip_calls(log) == []


def test_cell_on_colab_installs_from_the_repository_when_it_carries_no_wheel(tmp_path):
    pythonpath, env, log = _fake_pip(tmp_path)
    result = _run_cell(downloads.setup_cell_source(repository_url=URL), tmp_path, colab=True,
                       pythonpath=pythonpath, env=env)
    assert result.returncode == 0, result.stderr
    assert _pip_calls(log) == [["install", "-q", f"neuralode[chapters] @ git+{URL}"]]
    result = _run_cell(downloads.setup_cell_source(), tmp_path, colab=True, pythonpath=pythonpath, env=env)
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, "no URL, no wheel: say so"


def test_cell_stays_readable_with_the_wheel_on_its_last_line(wheel):
    lines = _embedded(wheel).splitlines()
    assert max(map(len, lines[:-1])) <= 120, "the cell's logic must read on screen"
    assert lines[-1].startswith(f'install_neuralode("{wheel.name}", "') and len(lines[-1]) > wheel.stat().st_size
    assert downloads.setup_cell_source(repository_url=URL).splitlines()[:-1] == lines[:-1]


@pytest.mark.parametrize("kwargs, argument", [
    (dict(wheel_name="neuralode-0.1.0-py3-none-any.whl"), "wheel_b64"),
    (dict(wheel_name="neuralode.zip", wheel_b64="AAAA"), "wheel_name"),
    (dict(wheel_name="n-0.1-py3-none-any.whl", wheel_b64="AA\nAA"), "wheel_b64"),
    (dict(repository_url='https://x"; import os'), "repository_url"),
])
def test_setup_cell_source_refuses_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        downloads.setup_cell_source(**kwargs)


# ------------------------------------------------------------------------------- the notebook
def test_embed_wheel_replaces_only_the_setup_cell_and_keeps_its_url(wheel):
    notebook = _tiny_notebook()
    before = copy.deepcopy(notebook)
    result = downloads.embed_wheel(notebook, wheel)
    assert notebook == before, "embed_wheel must return a copy"
    assert result.cells[1].source == _embedded(wheel, URL)
    assert result.cells[1].metadata == before.cells[1].metadata
    assert [c for i, c in enumerate(result.cells) if i != 1] == [c for i, c in enumerate(before.cells) if i != 1]
    nbformat.validate(result)
    compile(result.cells[1].source, "setup", "exec")


def test_embed_wheel_refuses_what_it_cannot_embed(wheel, tmp_path):
    notebook = _tiny_notebook()
    with pytest.raises(ValueError, match="wheel_path"):
        downloads.embed_wheel(notebook, tmp_path / "missing.whl")
    second_setup = nbformat.v4.new_code_cell(notebook.cells[1].source, metadata={"tags": ["setup"]})
    for cells in (notebook.cells[:1], [*notebook.cells, second_setup]):
        with pytest.raises(ValueError, match="tagged 'setup'"):
            downloads.embed_wheel(nbformat.v4.new_notebook(cells=cells), wheel)


def _built_book(tmp_path: Path, links: list[str]) -> Path:
    """A stand-in for a Jupyter Book build: one page whose download button links ``links``."""
    html = tmp_path / "html"
    (html / "book").mkdir(parents=True)
    anchors = "".join(f'<a href="{href}" class="btn">.ipynb</a>' for href in links)
    (html / "book" / "ch.html").write_text(f"<html><body>{anchors}</body></html>", encoding="utf-8")
    (html / "_sources" / "book").mkdir(parents=True)
    nbformat.write(_tiny_notebook(), html / "_sources" / "book" / "ch.ipynb")
    return html


def test_cli_rewrites_every_notebook_the_pages_link_for_download(wheel, tmp_path, capsys):
    html = _built_book(tmp_path, ["../_sources/book/ch.ipynb", "https://example.org/other.ipynb"])
    source = html / "_sources" / "book" / "ch.ipynb"
    assert downloads.main(["--html", str(html), "--wheel", str(wheel)]) == 0
    assert nbformat.read(source, as_version=4).cells[1].source == _embedded(wheel)
    assert "_sources/book/ch.ipynb carries neuralode-0.1.0-py3-none-any.whl (+" in capsys.readouterr().out
    once = source.read_bytes()
    assert downloads.main(["--html", str(html), "--wheel", str(wheel)]) == 0
    assert source.read_bytes() == once, "running it twice must give the same notebook"


def test_cli_refuses_a_build_without_download_links_or_with_a_broken_one(wheel, tmp_path):
    with pytest.raises(SystemExit):
        downloads.main(["--html", str(_built_book(tmp_path / "a", [])), "--wheel", str(wheel)])
    with pytest.raises(FileNotFoundError, match="missing.ipynb"):
        downloads.main(["--html", str(_built_book(tmp_path / "b", ["../_sources/missing.ipynb"])),
                        "--wheel", str(wheel)])


# ----------------------------------------------------------------------------- the book itself
def test_book_setup_cells_are_the_tools_setup_cell(notebook: Path):
    """Every notebook's setup cell is setup_cell_source(repository_url=_config.yml's); the download carries a wheel."""
    url = (load_yaml(ROOT / "_config.yml").get("repository") or {}).get("url") or ""
    nb = nbformat.read(notebook, as_version=4)
    setup = [c for c in nb.cells if "setup" in c.get("metadata", {}).get("tags", [])]
    assert len(setup) == 1 and setup[0].source == downloads.setup_cell_source(repository_url=url), (
        f"{notebook.name}: its setup cell is not tools/downloads.py's setup_cell_source(repository_url={url!r}); "
        "rewrite it with that function"
    )


@pytest.mark.notebooks
def test_the_books_download_buttons_give_notebooks_that_carry_the_library(book_build: BookBuild):
    """The strict build, rewritten by tools/downloads.py as `make book` does (conftest's book_build)."""
    linked = set(downloads.downloaded_notebooks(book_build.html))
    wanted = {(book_build.html / "_sources" / c.relative_to(ROOT)).resolve() for c in chapters()}
    assert wanted <= linked, f"chapters without a download link: {sorted(map(str, wanted - linked))}"
    for path in sorted(linked):
        nb = nbformat.read(path, as_version=4)
        setup = [c for c in nb.cells if "setup" in c.get("metadata", {}).get("tags", [])]
        assert setup and setup[0].source.splitlines()[-1].startswith('install_neuralode("neuralode-'), (
            f"{path.name}: the download carries no wheel; run tools/downloads.py --html after the build"
        )
