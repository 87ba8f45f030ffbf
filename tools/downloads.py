"""Chapter notebooks that carry the book's library: what the book's download button gives.

A chapter downloaded from the book and opened on Colab (or any Jupyter) has no `neuralode` to
import, and while `_config.yml`'s `repository.url` is empty there is no public address to pip
install it from. So the build rewrites every notebook the download button links to: its setup cell
(the code cell tagged `setup`) gets the library's wheel, base64-encoded, on its last line, and
installs it with the chapters' extra when `neuralode` is missing. pip keeps the torch already
installed when it satisfies the library's range (Colab's does; `make colab-check` asserts it).

    python tools/downloads.py --html _build/html [--wheel dist/neuralode-0.1.0-py3-none-any.whl]

Without `--wheel` it builds the wheel from this checkout (`pip wheel --no-deps`, offline).
`setup_cell_source(repository_url=...)` with no wheel is the setup cell the book's sources carry.
"""

from __future__ import annotations

import argparse
import base64
import copy
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SETUP_TAG = "setup"
# What `pip wheel` needs from the checkout to build the library (pyproject.toml names the rest).
WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "neuralode")

_SETUP_CELL = '''\
# Setup: installs the book's library where it is missing (on Colab, for example); elsewhere it does nothing.
import importlib.util, subprocess, sys

REPOSITORY_URL = "{repository_url}"  # kept equal to _config.yml's repository.url by the tests


def install_neuralode(wheel_name=None, wheel_b64=None):
    """Installs neuralode[chapters] where it is missing; pip keeps an installed torch >= 2.11."""
    if importlib.util.find_spec("neuralode") is not None:
        return
    if wheel_b64:  # the notebook downloaded from the book's page carries the library: a wheel, in base64
        import base64, pathlib, tempfile
        wheel = pathlib.Path(tempfile.mkdtemp()) / wheel_name
        wheel.write_bytes(base64.b64decode(wheel_b64))
        target = f"{{wheel}}[chapters]"
    elif REPOSITORY_URL and "google.colab" in sys.modules:
        target = f"neuralode[chapters] @ git+{{REPOSITORY_URL}}"
    else:
        raise ModuleNotFoundError(
            "The neuralode library is not installed. Download this chapter with the download button (.ipynb) "
            "on its page in the book: that copy carries the library and installs it here. Or run "
            "`pip install -e '.[chapters]'` in a clone of the book's repository. Then re-run this cell.")
    print(f"Installing the book's library: pip install {{target}}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", target], check=True)
    importlib.invalidate_caches()
    from importlib.metadata import version
    print(f"Installed neuralode {{version('neuralode')}} beside torch {{version('torch')}}.")


install_neuralode({arguments})'''


def setup_cell_source(wheel_name: str | None = None, wheel_b64: str | None = None, repository_url: str = "") -> str:
    """The code of a chapter's setup cell.

    The cell does nothing where `neuralode` imports. Where it does not, it pip installs
    ``neuralode[chapters]`` from the wheel the cell carries, else (on Colab) from
    ``git+repository_url``, else raises ModuleNotFoundError saying how to get the library. It
    never names torch, so pip keeps an installed torch that satisfies the library's range.

    Args:
        wheel_name: the wheel's file name (pip reads the version from it), with ``wheel_b64``.
        wheel_b64: the wheel's bytes, base64-encoded (one line: the cell's last).
        repository_url: `_config.yml`'s ``repository.url`` ("" while the book has none).

    Returns:
        The cell's source, without a trailing newline.
    """
    if (wheel_name is None) != (wheel_b64 is None):
        raise ValueError("setup_cell_source: give wheel_name and wheel_b64 together, or neither.")
    if wheel_name is not None and not re.fullmatch(r"[\w.+-]+\.whl", wheel_name):
        raise ValueError(f"setup_cell_source: wheel_name must be a wheel's file name (*.whl), got {wheel_name!r}.")
    if wheel_b64 is not None and not re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", wheel_b64):
        raise ValueError("setup_cell_source: wheel_b64 must be standard base64 on one line (base64.b64encode).")
    if not isinstance(repository_url, str) or any(c in repository_url for c in "\n\"'\\"):
        raise ValueError(f"setup_cell_source: repository_url must be a plain URL string, got {repository_url!r}.")
    arguments = "" if wheel_name is None else f'"{wheel_name}", "{wheel_b64}"'
    return _SETUP_CELL.format(repository_url=repository_url, arguments=arguments)


def _setup_cell_index(notebook: nbformat.NotebookNode, name: str) -> int:
    found = [i for i, c in enumerate(notebook.cells)
             if c.cell_type == "code" and SETUP_TAG in c.get("metadata", {}).get("tags", [])]
    if len(found) != 1:
        raise ValueError(f"{name}: expected exactly one code cell tagged {SETUP_TAG!r}, found {len(found)}.")
    return found[0]


def repository_url_of(notebook: nbformat.NotebookNode, name: str = "notebook") -> str:
    """The ``REPOSITORY_URL`` that a notebook's setup cell assigns ("" when it assigns none)."""
    source = notebook.cells[_setup_cell_index(notebook, name)].source
    found = re.findall(r"^REPOSITORY_URL\s*=\s*([\"'])(.*?)\1", source, re.MULTILINE)
    return found[0][1] if found else ""


def embed_wheel(notebook: nbformat.NotebookNode, wheel_path: str | Path, name: str = "notebook") -> nbformat.NotebookNode:
    """A copy of ``notebook`` whose setup cell carries and installs the wheel at ``wheel_path``.

    The setup cell keeps its metadata (tags) and its ``REPOSITORY_URL``; every other cell is
    unchanged. ``name`` only labels error messages.

    Raises:
        ValueError: the notebook has no single code cell tagged ``setup``, or ``wheel_path`` is no wheel.
    """
    wheel = Path(wheel_path)
    if wheel.suffix != ".whl" or not wheel.is_file():
        raise ValueError(f"embed_wheel: wheel_path must be an existing *.whl file, got {str(wheel)!r}.")
    result = copy.deepcopy(notebook)
    cell = result.cells[_setup_cell_index(result, name)]
    cell.source = setup_cell_source(wheel.name, base64.b64encode(wheel.read_bytes()).decode("ascii"),
                                    repository_url_of(notebook, name))
    cell.outputs, cell.execution_count = [], None
    return result


def build_wheel(out_dir: Path, python: str = sys.executable) -> Path:
    """Builds the library's wheel into ``out_dir`` from a copy of the checkout and returns its path.

    A copy, because an in-tree build leaves `build/` behind, whose stale modules the next wheel
    would carry. No build isolation: the build uses this environment's setuptools, offline.
    """
    with tempfile.TemporaryDirectory() as tmp:
        for name in WHEEL_SOURCES:
            source, target = ROOT / name, Path(tmp) / name
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, target)
        out_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", str(out_dir), tmp], check=True)
    wheels = sorted(out_dir.glob("neuralode-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"build_wheel: expected one neuralode wheel in {out_dir}, found {[w.name for w in wheels]}")
    return wheels[0]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a" and dict(attrs).get("href"):
            self.hrefs.append(dict(attrs)["href"])


def downloaded_notebooks(html: Path) -> list[Path]:
    """The notebooks the built pages' download links point to (sphinx-book-theme: ``_sources/<page>.ipynb``)."""
    found = set()
    for page in html.rglob("*.html"):
        links = _Links()
        links.feed(page.read_text(encoding="utf-8"))
        for href in links.hrefs:
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or not parts.path.endswith(".ipynb"):
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            if not target.is_relative_to(html.resolve()):
                raise ValueError(f"{page}: the download link {href!r} leaves the build folder {html}.")
            if not target.is_file():
                raise FileNotFoundError(f"{page}: the download link {href!r} points to no file ({target}).")
            found.add(target)
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--html", type=Path, required=True, help="the built book's HTML folder (e.g. _build/html)")
    parser.add_argument("--wheel", type=Path, help="the library's wheel (default: build it from this checkout)")
    args = parser.parse_args(argv)
    if not args.html.is_dir():
        parser.error(f"--html: {args.html} is not a folder; build the book first (make book).")
    notebooks = downloaded_notebooks(args.html)
    if not notebooks:
        parser.error(f"--html: no page in {args.html} links a notebook to download; is it a Jupyter Book build?")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or build_wheel(Path(tmp))
        if not wheel.is_file() or wheel.suffix != ".whl":
            parser.error(f"--wheel: {wheel} is not a wheel file (*.whl).")
        for path in notebooks:
            before = path.stat().st_size
            nbformat.write(embed_wheel(nbformat.read(path, as_version=4), wheel, name=str(path)), path)
            print(f"downloads: {path.relative_to(args.html.resolve())} carries {wheel.name} "
                  f"(+{(path.stat().st_size - before) / 1024:.0f} KiB, now {path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
