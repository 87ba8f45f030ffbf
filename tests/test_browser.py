"""The built book in a real browser: headless Chromium, a loopback server, no network.

Every page of the strict test build (the smoke-executed chapters) is opened as a reader would
open it. The checks: no console errors, no request to another host, math typeset by the book's
own MathJax with no raw TeX left in the prose, every image loaded, every image with alt text
that describes it, every figure of a chapter numbered, and the search page finding a term. A screenshot of every page goes to ``_build/screenshots/`` (or ``$SCREENSHOT_DIR``).

Chromium comes from Debian (``apt-get install chromium``); Playwright drives it through
``executable_path``, so no browser is downloaded. Without Chromium the tests are skipped, and
say so; ``.ci/run`` installs it when it can.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

from conftest import ROOT, BookBuild, chapters

pytestmark = pytest.mark.notebooks

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions", "--mute-audio"]
SCREENSHOTS = Path(os.environ.get("SCREENSHOT_DIR", ROOT / "_build" / "screenshots"))


def _chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test reports what matters; keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def site(book_build: BookBuild):
    """The built HTML served on 127.0.0.1 at a free port; yields the base URL."""
    if not (book_build.html / "index.html").exists():
        pytest.fail(f"the book did not build; see test_book.py:\n{book_build.run.tail()}", pytrace=False)
    handler = functools.partial(_QuietHandler, directory=str(book_build.html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if executable is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the real-browser tests did not run")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def _pages() -> list[str]:
    """Every page of the table of contents, as paths relative to the site root."""
    from conftest import load_yaml

    toc = load_yaml(ROOT / "_toc.yml")
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return [f"{f}.html" for f in files]


class Visit:
    """One page opened in a fresh browser context, with what the browser reported."""

    def __init__(self, browser, site: str, path: str):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
        self.errors: list[str] = []
        self.foreign: list[str] = []
        # Nothing may leave the loopback server: other requests are recorded and refused.
        self.context.route(re.compile(r"^(?!" + re.escape(site) + r"|data:|blob:|about:).*"), self._refuse)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"failed request {r.url}")
                     if r.url.startswith(site) else None)
        self.page.goto(f"{site}/{path}", wait_until="load")
        if self.page.evaluate("() => !!(window.MathJax && MathJax.startup)"):
            self.page.evaluate("() => MathJax.startup.promise")

    def _refuse(self, route):
        self.foreign.append(route.request.url)
        route.abort()

    def close(self):
        self.context.close()


@pytest.mark.parametrize("path", _pages())
def test_page_renders_offline(browser, site: str, path: str):
    visit = Visit(browser, site, path)
    page = visit.page
    try:
        # Images: scroll each into view (lazy ones load then), then every one must have pixels.
        page.evaluate("""async () => {
            for (const img of document.images) { img.scrollIntoView(); }
            await Promise.all(Array.from(document.images).map(img => img.complete ? null :
                new Promise(done => { img.onload = img.onerror = done; })));
            window.scrollTo(0, 0);
        }""")
        broken = page.evaluate("() => Array.from(document.images).filter(i => !(i.naturalWidth > 0)).map(i => i.src)")
        # Prose outside code and outputs must hold no raw TeX: MathJax replaced all of it.
        prose = page.evaluate("""() => {
            const main = document.querySelector('main') || document.body;
            const copy = main.cloneNode(true);
            copy.querySelectorAll('pre, code, .cell_output, .output, .sig, script, style, mjx-container, mjx-assistive-mml')
                .forEach(e => e.remove());
            return copy.innerText;
        }""")
        raw_tex = sorted(set(re.findall(r"\$\$|\\\(|\\\)|\\\[|\\\]|\$[^$\s][^$]*\$", prose)))[:5]
        typeset = page.evaluate("() => document.querySelectorAll('mjx-container').length")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        name = Path(path).with_suffix("").as_posix().replace("/", "_")
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
        figure = page.query_selector("main img")
        if figure is not None:
            figure.scroll_into_view_if_needed()
            page.screenshot(path=str(SCREENSHOTS / f"{name}_figure.png"))
    finally:
        visit.close()

    assert not visit.errors, f"{path}: the browser console reported errors: {visit.errors}"
    assert not visit.foreign, f"{path}: the page tried to reach other hosts: {visit.foreign[:5]}"
    assert not broken, f"{path}: images that did not load: {broken}"
    assert not raw_tex, f"{path}: TeX left untypeset in the prose: {raw_tex}"
    chapter_pages = {f"book/{c.stem}.html" for c in chapters()}
    if path in chapter_pages:
        assert typeset > 0, f"{path}: a chapter with no typeset math (MathJax did not run?)"


# An alt attribute that is only a file name is Sphinx's default (the image's path), not a description.
_FILE_NAME_ALT = r"/\.(png|jpe?g|gif|svg|webp|pdf)$/i"


@pytest.mark.parametrize("path", _pages())
def test_figures_have_alt_text_and_numbers(browser, site: str, path: str):
    """Every image says in words what it shows, and every figure of a chapter has a numbered caption.

    A notebook cell's figure gets both from its metadata (myst-nb): ``mystnb.image.alt`` becomes the
    image's alt text and ``mystnb.figure`` (``caption``, ``name``) wraps the output in a numbered
    figure that the prose can cite with ``{numref}``. Without them Sphinx writes the image's file
    path as its alt text, which this test rejects too.
    """
    visit = Visit(browser, site, path)
    try:
        no_alt = visit.page.evaluate(f"""() => Array.from(document.images).filter(img => {{
                const alt = (img.getAttribute('alt') || '').trim();
                return !alt || {_FILE_NAME_ALT}.test(alt) || alt === img.getAttribute('src');
            }}).map(img => img.id || (img.getAttribute('src') || img.outerHTML).slice(0, 100))""")
        # Images in cell outputs (plots, animations) must sit in a figure with a caption "Fig. N.M".
        unnumbered = visit.page.evaluate("""() => Array.from(document.querySelectorAll('main .cell_output img'))
            .filter(img => {
                const figure = img.closest('figure');
                const number = figure && figure.querySelector('figcaption .caption-number');
                return !(number && /^Fig\\. \\d+(\\.\\d+)*/.test(number.textContent.trim()));
            }).map(img => img.id || (img.getAttribute('src') || img.outerHTML).slice(0, 100))""")
    finally:
        visit.close()
    assert not (no_alt or unnumbered), (
        f"{path}: images without alt text that says what they show (set mystnb.image.alt): {no_alt}; "
        f"output images outside a numbered figure (set mystnb.figure): {unnumbered}")


def test_search_finds_a_term(browser, site: str):
    visit = Visit(browser, site, "search.html?q=adjoint")
    try:
        visit.page.wait_for_selector("#search-results li a", timeout=30_000)
        hits = visit.page.eval_on_selector_all("#search-results li a", "links => links.map(a => a.href)")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        visit.page.screenshot(path=str(SCREENSHOTS / "search.png"))
    finally:
        visit.close()
    assert any("03_adjoint" in h for h in hits), f"searching 'adjoint' did not find the adjoint chapter: {hits[:5]}"
    assert not visit.errors and not visit.foreign, (visit.errors, visit.foreign)
