"""Sphinx extension: how the API reference (book/api.md) documents neuralode.

* **Each name once.** Names that ``neuralode/__init__.py`` exports at the top level are
  documented there (``neuralode.odeint``); the section of the module that defines them skips
  them, so a module section shows what is only reachable as ``neuralode.<module>.<name>``.
* **Constants by their ``#:`` comment, as written.** ``.. autodata:: neuralode.METHODS`` only
  looks for a ``#:`` comment in ``neuralode/__init__.py`` and otherwise shows the docstring of
  the value's type (``tuple``); this takes the comment from the module that defines the
  constant. And napoleon would read a comment's first line as Google-style
  ``type: description``, so a sentence with a colon became a bogus type that nitpicky builds
  reject; the comment is shown unparsed (the annotation already gives the type).

Listed under ``sphinx.local_extensions`` in ``_config.yml``.
"""

from __future__ import annotations

import sys
from typing import Any

from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer

PACKAGE = "neuralode"


def _in_package(modname: str) -> bool:
    return modname == PACKAGE or modname.startswith(PACKAGE + ".")


def _skip_top_level_names(app: Any, what: str, name: str, obj: Any, skip: bool, options: Any):
    if what != "module":
        return None
    documenting = app.env.temp_data.get("autodoc:module") or ""
    if documenting == PACKAGE or not _in_package(documenting):
        return None
    top = sys.modules.get(PACKAGE)
    if top is not None and name in getattr(top, "__all__", ()) and getattr(top, name, None) is obj:
        return True  # documented under neuralode.<name>
    return None


def _comment(name: str, obj: Any) -> list[str] | None:
    documented_in, attr = name.rsplit(".", 1)
    candidates = [documented_in] + sorted(m for m in sys.modules if m != documented_in and _in_package(m))
    for modname in candidates:
        module = sys.modules.get(modname)
        if module is None or getattr(module, attr, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except PycodeError:
            continue
        if ("", attr) in docs:
            return list(docs[("", attr)])
    return None


def _constant_doc(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    if what != "data" or not name.startswith(PACKAGE + "."):
        return
    comment = _comment(name, obj)
    if comment is not None:
        lines[:] = comment


def setup(app: Any) -> dict[str, Any]:
    app.connect("autodoc-skip-member", _skip_top_level_names)
    # After napoleon (priority 500): its reading of the comment is replaced by the comment itself.
    app.connect("autodoc-process-docstring", _constant_doc, priority=600)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
