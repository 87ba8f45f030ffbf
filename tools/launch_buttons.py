"""Sphinx extension: launch buttons only while the book has a public repository.

`_config.yml` keeps `launch_buttons.colab_url` set, so the Colab button appears by itself once
`repository.url` is filled in (the single place the URL lives). While the URL is empty the theme
has nothing to link to (sphinx-book-theme even fails the build), so this turns every launch
provider off. Listed under `sphinx.local_extensions` in `_config.yml`.
"""

from __future__ import annotations

from typing import Any

LAUNCH_KEYS = ("binderhub_url", "jupyterhub_url", "thebe", "colab_url", "deepnote_url", "jupyterlite_url")


def _launch_only_with_repository(app: Any, config: Any) -> None:
    options = dict(config.html_theme_options or {})
    if options.get("repository_url"):
        return
    launch = dict(options.get("launch_buttons") or {})
    for key in LAUNCH_KEYS:
        if key in launch:
            launch[key] = False if key == "thebe" else ""
    options["launch_buttons"] = launch
    config.html_theme_options = options


def setup(app: Any) -> dict[str, Any]:
    app.connect("config-inited", _launch_only_with_repository)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
