"""The book's sources are clean and consistent, and the strict build is warning-free and offline."""

from __future__ import annotations

import re
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT, BookBuild, committed_notebooks, load_yaml, resolve_toc_file, toc_files

CONFIG = load_yaml(ROOT / "_config.yml")
REPOSITORY_URL = (CONFIG.get("repository") or {}).get("url") or ""


# ------------------------------------------------------------------------------------- sources
def test_every_toc_entry_exists():
    entries = toc_files()
    assert entries, "_toc.yml lists no files"
    missing = [e for e in entries if resolve_toc_file(e) is None]
    assert not missing, f"_toc.yml names files that do not exist (or exist twice): {missing}"


def test_every_notebook_is_in_the_toc():
    listed = {resolve_toc_file(e) for e in toc_files()}
    orphans = [str(p.relative_to(ROOT)) for p in committed_notebooks() if p not in listed]
    assert not orphans, f"notebooks under book/ that _toc.yml does not list (never built): {orphans}"


def test_toc_has_numbered_parts_with_captions():
    toc = load_yaml(ROOT / "_toc.yml")
    assert toc.get("format") == "jb-book"
    parts = toc.get("parts") or []
    assert parts, "_toc.yml has no parts"
    for part in parts:
        assert part.get("caption"), f"a part without a caption: {part}"
        assert part.get("numbered") is True, f"part {part.get('caption')!r} is not numbered"
        assert part.get("chapters"), f"part {part.get('caption')!r} has no chapters"


def test_notebook_is_committed_without_outputs(notebook: Path):
    nb = nbformat.read(notebook, as_version=4)
    dirty = [
        i for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{notebook.name}: cells {dirty} carry outputs or execution counts; strip them "
        "(e.g. `jupyter nbconvert --clear-output --inplace`)"
    )


def _cells_tagged(nb, tag: str) -> list:
    return [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]


def test_setup_cell_repository_url_matches_config(notebook: Path):
    nb = nbformat.read(notebook, as_version=4)
    setup = _cells_tagged(nb, "setup")
    assert len(setup) == 1 and setup[0].cell_type == "code", (
        f"{notebook.name}: expected one code cell tagged 'setup'"
    )
    found = re.findall(r"^REPOSITORY_URL\s*=\s*([\"'])(.*?)\1", setup[0].source, re.MULTILINE)
    assert len(found) == 1, f"{notebook.name}: the setup cell must assign REPOSITORY_URL once"
    assert found[0][1] == REPOSITORY_URL, (
        f"{notebook.name}: REPOSITORY_URL is {found[0][1]!r} but _config.yml's repository.url "
        f"is {REPOSITORY_URL!r}; keep them equal"
    )


def test_parameters_cell_reads_profile_from_environment(notebook: Path):
    nb = nbformat.read(notebook, as_version=4)
    params = _cells_tagged(nb, "parameters")
    assert len(params) == 1 and params[0].cell_type == "code", (
        f"{notebook.name}: expected one code cell tagged 'parameters' (papermill injects after it)"
    )
    pattern = r"""^PROFILE\s*=\s*os\.environ\.get\(\s*(["'])NEURALODE_PROFILE\1\s*,\s*(["'])auto\2\s*\)"""
    assert re.search(pattern, params[0].source, re.MULTILINE), (
        f"{notebook.name}: the parameters cell must read "
        "PROFILE = os.environ.get(\"NEURALODE_PROFILE\", \"auto\")"
    )


def _pins(requirements) -> dict[str, str]:
    pins = {}
    for req in requirements:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;,]+)", req)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_environment_yml_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = _pins(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted.update(_pins(extra))
    wanted.update(_pins((ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()))
    env = load_yaml(ROOT / "environment.yml")
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert _pins(pip_section) == wanted, "environment.yml's pip pins differ from pyproject.toml's and constraints.txt's"
    assert "-e .[chapters,book,test]" in pip_section, "environment.yml must install the extras make installs"
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])


# --------------------------------------------------------------------------------- strict build
class _Assets(HTMLParser):
    """Collects the src of every <script> and the href of every stylesheet <link>, and every href."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self.stylesheets: list[str] = []
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.scripts.append(a["src"])
        if tag == "link" and "stylesheet" in (a.get("rel") or "").split() and a.get("href"):
            self.stylesheets.append(a["href"])
        if a.get("href"):
            self.hrefs.append(a["href"])


def _pages(build: BookBuild) -> dict[Path, _Assets]:
    pages = sorted(build.html.rglob("*.html"))
    assert pages, f"the build produced no HTML in {build.html}:\n{build.run.tail()}"
    parsed = {}
    for page in pages:
        p = _Assets()
        p.feed(page.read_text(encoding="utf-8"))
        parsed[page] = p
    return parsed


EXTERNAL = re.compile(r"^(https?:)?//", re.IGNORECASE)


@pytest.mark.notebooks
def test_book_builds_without_warnings(book_build: BookBuild):
    if not book_build.run.ok:
        pytest.fail(
            "the strict book build (-W -n --keep-going, smoke outputs) failed.\nWarnings:\n"
            + "\n".join(book_build.run.warnings())
            + "\n\nEnd of the log:\n" + book_build.run.tail(3000),
            pytrace=False,
        )
    built = {p.stem for p in build_pages(book_build)}
    for entry in toc_files():
        assert Path(entry).with_suffix("").name in built, f"{entry} has no page in the build"


def build_pages(build: BookBuild) -> list[Path]:
    return sorted(build.html.rglob("*.html"))


@pytest.mark.notebooks
def test_pages_do_not_show_the_test_suites_output_markers(book_build: BookBuild):
    # The cells keep "# NBVAL_CHECK_OUTPUT" for nbval; tools/page_fixes.py drops it from the pages.
    pages = build_pages(book_build)
    assert pages, f"the build produced no HTML in {book_build.html}"
    shown = [p.relative_to(book_build.html) for p in pages if "NBVAL_CHECK_OUTPUT" in p.read_text(encoding="utf-8")]
    assert not shown, f"pages that show the nbval marker: {shown}"
    # ... and the code after the marker is still there, highlighted (chapter 2's closing check).
    chapter = next(p for p in pages if p.stem == "02_solving_odes").read_text(encoding="utf-8")
    assert "claims" in chapter and 'class="highlight' in chapter


class _Prose(HTMLParser):
    """The text a reader sees as prose: everything outside code, highlighted blocks, signatures and
    rendered math (MathJax's ``<span class="math">``)."""

    SKIP_TAGS = {"pre", "code", "script", "style", "textarea"}
    SKIP_CLASSES = {"math", "highlight", "pre", "sig"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, bool]] = []
        self.skipping = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        skip = tag in self.SKIP_TAGS or bool(self.SKIP_CLASSES & set((dict(attrs).get("class") or "").split()))
        self.stack.append((tag, skip))
        self.skipping += skip

    def handle_endtag(self, tag):
        while self.stack:
            opened, skip = self.stack.pop()
            self.skipping -= skip
            if opened == tag:
                break

    def handle_data(self, data):
        if not self.skipping:
            self.text.append(data)


# $...$ left in prose: math that MyST did not parse (e.g. in a display(Markdown(...)) output).
DOLLAR_MATH = re.compile(r"(?<![\\$\w])\$(?!\s)[^$\n]{1,80}(?<![\s\\])\$(?![\w$])")


def unrendered_math(html: str) -> list[str]:
    prose = _Prose()
    prose.feed(html)
    return DOLLAR_MATH.findall(" ".join(prose.text))


def test_unrendered_math_is_found_in_prose_and_not_in_code_or_math():
    assert unrendered_math('<p>at $M = 32$ and <span class="math">\\(x\\)</span> <code>$a$</code></p>') == ["$M = 32$"]
    assert unrendered_math('<p>costs $5 and $6</p><pre>echo $HOME $PATH</pre>') == []


@pytest.mark.notebooks
def test_pages_show_no_unrendered_inline_math(book_build: BookBuild):
    # Computed prose (display(Markdown(...))) is parsed as MyST (_config.yml, nb_render_markdown_format),
    # so its $...$ renders like the text's; with CommonMark the dollars were printed.
    shown = {p.relative_to(book_build.html): found for p in build_pages(book_build)
             if (found := unrendered_math(p.read_text(encoding="utf-8")))}
    assert not shown, f"pages that print $...$ instead of rendering it: {shown}"


@pytest.mark.notebooks
def test_pages_load_no_script_or_stylesheet_from_another_host(book_build: BookBuild):
    offenders = []
    for page, assets in _pages(book_build).items():
        for url in assets.scripts + assets.stylesheets:
            if EXTERNAL.match(url):
                offenders.append(f"{page.relative_to(book_build.html)}: {url}")
    assert not offenders, "pages load assets from other hosts:\n" + "\n".join(offenders)


@pytest.mark.notebooks
def test_mathjax_is_served_from_the_book(book_build: BookBuild):
    with_mathjax = 0
    for page, assets in _pages(book_build).items():
        for src in assets.scripts:
            if "mathjax" in src.lower():
                assert not EXTERNAL.match(src), f"{page.name} loads MathJax from {src}"
                local = (page.parent / src.split("?")[0]).resolve()
                assert local.is_file(), f"{page.name} loads MathJax from {src}, which is not in the build"
                with_mathjax += 1
    assert with_mathjax, "no page loads MathJax, yet the book has equations"


@pytest.mark.notebooks
def test_launch_buttons_follow_repository_url(book_build: BookBuild):
    """No launch or repository link while repository.url is empty; Colab links once it is set."""
    # The theme's buttons: launch (Colab, Binder, JupyterHub), source (/blob/), edit (/edit/) and
    # "open an issue" (/issues/new). A citation of another project's issue (/issues/119) is no button.
    launch = re.compile(r"colab\.research\.google\.com|mybinder|jupyterhub|github\.com/.+/(blob/|edit/|issues/new)")
    links = [
        f"{page.relative_to(book_build.html)}: {href}"
        for page, assets in _pages(book_build).items() for href in assets.hrefs if launch.search(href)
    ]
    if not REPOSITORY_URL:
        assert not links, "launch or repository links despite an empty repository.url:\n" + "\n".join(links)
    else:
        colab = (CONFIG.get("launch_buttons") or {}).get("colab_url")
        assert not colab or any("colab" in link for link in links), "no Colab launch button"


@pytest.mark.notebooks
def test_api_reference_documents_every_public_name(book_build: BookBuild):
    """book/api.md keeps up with the library: every exported name has an entry."""
    import importlib
    import types

    import neuralode

    page = book_build.html / "book" / "api.html"
    assert page.is_file(), f"no API reference page in the build:\n{book_build.run.tail()}"
    documented = set(re.findall(r'\bid="((?:module-)?neuralode[\w.]*)"', page.read_text(encoding="utf-8")))
    missing = []
    for name in neuralode.__all__:
        obj = getattr(neuralode, name)
        if not isinstance(obj, types.ModuleType):
            if f"neuralode.{name}" not in documented:
                missing.append(f"neuralode.{name}")
            continue
        if f"module-neuralode.{name}" not in documented:
            missing.append(f"the module neuralode.{name} (no automodule section)")
        module = importlib.import_module(f"neuralode.{name}")
        for member in getattr(module, "__all__", []):
            if not {f"neuralode.{member}", f"neuralode.{name}.{member}"} & documented:
                missing.append(f"neuralode.{name}.{member}")
    assert not missing, (
        "book/api.md does not document these public names (add an automodule for their module "
        f"or re-export them): {missing}"
    )


def test_chapter_header_states_run_time_per_profile(notebook: Path):
    """Colab users plan around it: each chapter's first cell says how long each profile takes."""
    if not re.match(r"\d\d_", notebook.name):
        return  # appendix pages state their own
    title = nbformat.read(notebook, as_version=4).cells[0].source
    line = next((l for l in title.splitlines() if l.startswith("**Run time.**")), None)
    assert line, f"{notebook.name}: the title cell needs a '**Run time.**' line (smoke, cpu, colab, gpu)"
    for profile in ("`smoke`", "`cpu`", "`colab`", "`gpu`"):
        assert profile in line, f"{notebook.name}: the run-time line does not mention {profile}"
