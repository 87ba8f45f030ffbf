"""Sphinx extension: fixes to the rendered pages.

- Cells whose printed output the tests compare start with the marker ``# NBVAL_CHECK_OUTPUT``
  (nbval's). It is for the test suite, not the reader: the rendered code cells leave it out (the
  notebooks keep it).

And two fixes to the theme's pages, so that a reader's browser logs no errors:

- Jupyter Book registers sphinx-thebe's and sphinx-togglebutton's inline settings once per read
  phase, so pages that are re-read carry them twice; the second ``const THEBE_JS_URL`` is a
  SyntaxError in the console. Each page keeps the first copy of every script.
- pydata-sphinx-theme starts a first-time visitor (empty localStorage) with theme mode ``""`` and
  then logs "Got invalid theme mode". A one-line script sets the documented default, ``auto``,
  before the theme reads it.

Listed under ``sphinx.local_extensions`` in ``_config.yml``; tests/test_browser.py checks the
console in a real browser.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes

NBVAL_MARKER = "# NBVAL_CHECK_OUTPUT"

DEFAULT_MODE = 'if (!document.documentElement.dataset.mode) { document.documentElement.dataset.mode = "auto"; }'


def _dedupe_scripts(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:
        # An inline script's filename is None or "" depending on who added it: the same script.
        key = (getattr(script, "filename", script) or "", tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    scripts[:] = kept


def _drop_test_markers(app: Any, doctree: Any) -> None:
    """Remove a first line ``# NBVAL_CHECK_OUTPUT`` from every code block (the cells' sources)."""
    for block in list(doctree.findall(nodes.literal_block)):
        text = block.astext()
        if not text.startswith(NBVAL_MARKER):
            continue
        rest = text[len(NBVAL_MARKER):].lstrip(" ").removeprefix("\n")
        block.children = [nodes.Text(rest)]
        block.rawsource = rest  # equal to the text, so the block is still highlighted


def setup(app: Any) -> dict[str, Any]:
    app.add_js_file(None, body=DEFAULT_MODE, priority=100)
    app.connect("doctree-read", _drop_test_markers)
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
