"""Results a chapter records for the book's reproducibility ledger.

A chapter calls :func:`record` with a short piece of text it computed (a test error with its
interval, a bits/dim value, the verdict of a check) and the appendix page ``book/ledger.md``
pastes it next to the paper's value. The page is written with myst-nb's cross-document glue
(``{glue:text}`04_odenet_classifier.ipynb::key:s```), so nothing on it is typed in: when the book
builds, every number comes from the outputs of the chapters as they executed, in the profile they
ran (``smoke`` in the test build, ``cpu`` or ``gpu`` in ``make book``), and a key that a chapter
stopped recording fails the strict build.

The output :func:`record` displays is myst-nb's glue format written out here, so that the chapters
do not need myst-nb (Colab does not have it): one display output whose only MIME type is
``application/papermill.record/text/plain`` and whose metadata is
``{"scrapbook": {"name": key, "mime_prefix": "application/papermill.record/"}}``. Notebook
front ends show nothing for it; myst-nb removes it from the page and keeps its text.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

__all__ = ["GLUE_PREFIX", "bundle", "record", "record_claim", "verdict"]

#: The MIME prefix of a glue output that is stored, not shown (myst-nb's and scrapbook's).
GLUE_PREFIX = "application/papermill.record/"

_KEY = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def bundle(key: str, text: str) -> Tuple[Dict[str, str], Dict[str, Any]]:
    """The display data and metadata that :func:`record` shows for ``key``.

    The text is stored as its Python ``repr``, as IPython shows a string: myst-nb's ``glue:text``
    role reads ``text/plain`` back with ``ast.literal_eval``, so a bare text that happens to
    be a Python literal (``"1e-3"``, ``"[1, 2]"``) would otherwise be turned into a number or a
    list and printed differently.

    Raises:
        ValueError: ``key`` is not lower-case letters, digits and hyphens (a colon would end the
            key inside the ``glue:text`` role).
        TypeError: ``text`` is not a string.
    """
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError(f"ledger.record: key must be lower-case letters, digits and hyphens, starting with a "
                         f"letter or digit (e.g. 'table1-odenet'); got {key!r}.")
    if not isinstance(text, str):
        raise TypeError(f"ledger.record: text must be a string (format the number first, e.g. f'{{x:.2f}}'); "
                        f"got {type(text).__name__}.")
    if not text.strip():
        raise ValueError(f"ledger.record: the text recorded under {key!r} is empty.")
    data = {GLUE_PREFIX + "text/plain": repr(text)}
    metadata = {"scrapbook": {"name": key, "mime_prefix": GLUE_PREFIX}}
    return data, metadata


def record(key: str, text: str) -> None:
    """Record ``text`` under ``key`` for the ledger page (a hidden glue output of the running cell).

    Outside IPython (a plain script) it only checks its arguments: there is no notebook to keep
    the output in.
    """
    data, metadata = bundle(key, text)
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover - the book's requirements include IPython
        return
    if get_ipython() is None:
        return
    display(data, raw=True, metadata=metadata)


def verdict(holds: bool | None, asserted: bool = True) -> str:
    """The state of a chapter's check in a few words: ``holds (asserted)``, ``holds (not asserted in
    this profile)``, ``does not hold (not asserted in this profile)`` or ``not evaluated in this
    profile`` (``holds`` is None).

    Raises:
        AssertionError: an asserted check that does not hold (the chapter's own assert would have
            stopped it first; recording it as a verdict would hide a failure).
    """
    if holds is None:
        return "not evaluated in this profile"
    if asserted:
        if not holds:
            raise AssertionError("ledger.verdict: an asserted check does not hold")
        return "holds (asserted)"
    return f"{'holds' if holds else 'does not hold'} (not asserted in this profile)"


def record_claim(key: str, claims: Mapping[str, Any], start: str, required: bool = True) -> None:
    """Record the claim of ``claims`` whose text starts with ``start``, with its :func:`verdict`.

    ``claims`` maps each claim's text to what a chapter's closing check holds for it: a bool
    (asserted), ``None`` (not evaluated in this profile) or a pair ``(holds, asserted)``.

    Args:
        key: the ledger key.
        claims: the chapter's claims.
        start: the beginning of the claim's text (the rest may carry computed numbers).
        required: whether the claim must exist in this profile. When it is False and no claim
            matches (chapters add some claims only in the profiles that train), the record says
            that the check is not run in this profile.

    Raises:
        KeyError: no claim or more than one starts with ``start`` (and ``required`` is True).
    """
    found = [text for text in claims if text.startswith(start)]
    if len(found) > 1 or (required and not found):
        raise KeyError(f"ledger.record_claim: {len(found)} claims start with {start!r}; it must name exactly one.")
    if not found:
        record(key, f"{start}...: not checked in this profile")
        return
    value = claims[found[0]]
    holds, asserted = value if isinstance(value, tuple) else (value, True)
    record(key, f"{found[0]}: {verdict(None if holds is None else bool(holds), bool(asserted))}")
