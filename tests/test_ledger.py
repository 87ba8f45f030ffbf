"""The reproducibility ledger: what neuralode.ledger records, read back the way myst-nb reads it, and
the appendix page book/ledger.md, whose every pasted value a chapter must record (and the reverse)."""

from __future__ import annotations

import ast
import re

import nbformat
import pytest

from conftest import ROOT, SmokeRuns, chapters, toc_files
from neuralode import ledger

glue = pytest.importorskip("myst_nb.ext.glue")
from myst_nb.core.variables import format_plain_text  # noqa: E402  (after the importorskip)

LEDGER = ROOT / "book" / "ledger.md"
# {glue:text}`04_odenet_classifier.ipynb::table1-odenet:s`
REFERENCE = re.compile(r"\{glue:text\}`([^`:]+\.ipynb)::([^`:]+):s`")


def _read_back(key: str, text: str) -> str:
    """What the ledger page shows for ``text`` recorded under ``key``: myst-nb's extraction of the
    glue output, then the glue:text role's formatting with ``:s``."""
    data, metadata = ledger.bundle(key, text)
    cell = nbformat.v4.new_code_cell("", outputs=[nbformat.v4.new_output("display_data", data=data,
                                                                           metadata=metadata)])
    found = glue.extract_glue_data_cell(cell)
    assert [k for k, _ in found] == [key]
    assert cell.outputs == [], "a ledger record must not be shown on the chapter's page"
    return format_plain_text(found[0][1]["data"]["text/plain"], "s")


@pytest.mark.parametrize("text", ["7.90% (95% interval 6.4 to 9.8)", "1e-3", "[1, 2]", "0.5", "True",
                                  "it's \"quoted\"", "2.74 ± 0.01 bits/dim, ≥ 75%"])
def test_record_reads_back_exactly_as_written(text):
    # A bare "1e-3" would come back as "0.001" and "[1, 2]" as a list: the text is stored as its repr.
    assert _read_back("some-key", text) == text


@pytest.mark.parametrize("key", ["", "Table1", "table1:odenet", "-x", "a b", "ch4/x", 3])
def test_record_refuses_keys_the_glue_role_cannot_name(key):
    with pytest.raises(ValueError, match="key must be lower-case"):
        ledger.bundle(key, "text")


def test_record_refuses_non_text_and_empty_text():
    with pytest.raises(TypeError, match="format the number first"):
        ledger.bundle("x", 0.5)
    with pytest.raises(ValueError, match="empty"):
        ledger.bundle("x", "  ")


def test_record_outside_ipython_prints_nothing(capsys):
    ledger.record("table1-odenet", "7.90%")
    assert capsys.readouterr().out == ""


def test_record_in_ipython_displays_the_raw_bundle(monkeypatch):
    import IPython
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.append((objs, kw)))
    ledger.record("fig3b", "0.26 ms per evaluation")
    data, metadata = ledger.bundle("fig3b", "0.26 ms per evaluation")
    assert shown == [((data,), {"raw": True, "metadata": metadata})]


def test_verdicts():
    assert ledger.verdict(True) == "holds (asserted)"
    assert ledger.verdict(True, asserted=False) == "holds (not asserted in this profile)"
    assert ledger.verdict(False, asserted=False) == "does not hold (not asserted in this profile)"
    assert ledger.verdict(None) == "not evaluated in this profile"
    with pytest.raises(AssertionError):
        ledger.verdict(False)  # an asserted claim that fails must not become a line of text


def test_record_claim_finds_one_claim_in_each_of_the_chapters_shapes(monkeypatch):
    recorded = {}
    monkeypatch.setattr(ledger, "record", lambda key, text: recorded.__setitem__(key, text))
    claims = {"the ResNet beats the ODE-Net (p = 1e-07)": (True, True),     # chapter 4: (holds, asserted)
              "the ResNet beats the tied ResNet (p = 0.3)": (False, False),
              "bits/dim beat the Gaussian": None,                           # chapter 6: None, not evaluated
              "every RMSE is finite": True}                                 # the others: asserted bools
    ledger.record_claim("a", claims, "the ResNet beats the ODE")
    ledger.record_claim("b", claims, "the ResNet beats the tied")
    ledger.record_claim("c", claims, "bits/dim")
    ledger.record_claim("d", claims, "every RMSE")
    ledger.record_claim("e", claims, "(cpu/gpu) latent ODE", required=False)
    assert recorded == {"a": "the ResNet beats the ODE-Net (p = 1e-07): holds (asserted)",
                        "b": "the ResNet beats the tied ResNet (p = 0.3): does not hold (not asserted in this profile)",
                        "c": "bits/dim beat the Gaussian: not evaluated in this profile",
                        "d": "every RMSE is finite: holds (asserted)",
                        "e": "(cpu/gpu) latent ODE...: not checked in this profile"}
    with pytest.raises(KeyError, match="2 claims start with 'the ResNet beats'"):
        ledger.record_claim("f", claims, "the ResNet beats")
    with pytest.raises(KeyError, match="0 claims"):
        ledger.record_claim("g", claims, "(cpu/gpu) latent ODE")


# ------------------------------------------------------------------------------------ the page
def _references() -> list[tuple[str, str]]:
    return REFERENCE.findall(LEDGER.read_text(encoding="utf-8"))


def test_ledger_page_is_in_the_appendix_and_pastes_every_value():
    assert "book/ledger" in toc_files(), "book/ledger.md is not in _toc.yml"
    text = LEDGER.read_text(encoding="utf-8")
    refs = _references()
    assert refs, "book/ledger.md pastes nothing"
    # Every glue role on the page has the one form that works across documents (path, '::', ':s').
    assert text.count("{glue") == len(refs), "a glue role on book/ledger.md is not {glue:text}`NAME.ipynb::key:s`"
    names = {c.name for c in chapters()}
    for notebook, key in refs:
        assert notebook in names, f"book/ledger.md pastes from {notebook}, which is not a chapter of the toc"
    # Every chapter that records results has its setup line on the page.
    recording = {c.name for c in chapters() if "ledger.record" in c.read_text(encoding="utf-8")}
    assert recording and recording <= {nb for nb, key in refs if key == "setup"}


def _recorded_keys(executed) -> list[str]:
    return [o["metadata"]["scrapbook"]["name"] for c in executed.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "scrapbook" in o.get("metadata", {})]


@pytest.mark.notebooks
def test_every_pasted_value_is_recorded_and_every_record_is_pasted(smoke: SmokeRuns):
    """Against the chapters as they executed (smoke): a key the page pastes that no chapter records
    would be an empty cell (the strict build also fails on it), and a record the page never pastes is
    a result that went missing from the ledger. No key is recorded twice in a chapter."""
    refs = _references()
    for chapter in chapters():
        if "ledger.record" not in chapter.read_text(encoding="utf-8"):
            continue
        run = smoke(chapter)
        assert run.ok, f"{chapter.name} failed in the smoke profile:\n{run.tail()}"
        executed = nbformat.read(SmokeRuns.output_path(chapter), as_version=4)
        keys = _recorded_keys(executed)
        assert len(keys) == len(set(keys)), f"{chapter.name} records a key twice: {sorted(keys)}"
        pasted = {key for nb, key in refs if nb == chapter.name}
        assert pasted <= set(keys), f"book/ledger.md pastes keys {chapter.name} does not record: {pasted - set(keys)}"
        assert set(keys) <= pasted, f"{chapter.name} records keys book/ledger.md does not paste: {set(keys) - pasted}"
        for c in executed.cells:
            for o in c.get("outputs", []):
                if "scrapbook" in o.get("metadata", {}):
                    text = ast.literal_eval(o["data"][ledger.GLUE_PREFIX + "text/plain"])
                    assert not re.search(r"\bnan\b", text, re.IGNORECASE), f"{chapter.name}: {text!r}"
