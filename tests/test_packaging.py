"""What a user installs: the library's requirements (ranges, so that it installs beside the torch a
user has, Colab's included), the pins `make` tests with, and a real, non-editable wheel."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# What Google Colab has preinstalled (December 2026): replacing its torch breaks it, so the library
# must accept these as they are.
COLAB = {"python": "3.13", "torch": "2.11.0", "torchvision": "0.26.0"}
# What the solvers and models import; everything else is for the chapters (the "chapters" extra).
CORE = {"torch", "numpy"}


def _requirements(extra: str | None = None) -> dict[str, Requirement]:
    listed = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return {Requirement(r).name.lower(): Requirement(r) for r in listed}


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt pins exact releases: {line!r}"
            pins[req.name.lower()] = spec.version
    return pins


def test_the_library_needs_only_torch_and_numpy_and_accepts_a_range_of_torch():
    core = _requirements()
    assert set(core) == CORE, f"the library's own dependencies should be {CORE}, not {sorted(core)}"
    assert all(not any(s.operator == "==" for s in r.specifier) for r in core.values()), \
        "pin releases in constraints.txt, not in the library's requirements"
    assert "chapters" in PROJECT["optional-dependencies"]


def test_colabs_torch_and_python_are_accepted_without_replacing_them():
    # The cheap resolver check: the versions Colab ships satisfy every requirement that names them.
    reqs = {**_requirements("chapters"), **_requirements()}
    for name in ("torch", "torchvision"):
        assert reqs[name].specifier.contains(COLAB[name]), f"{reqs[name]} rejects Colab's {name} {COLAB[name]}"
    assert SpecifierSet(PROJECT["requires-python"]).contains(COLAB["python"] + ".0")


def test_make_installs_pins_inside_the_declared_ranges():
    reqs = {**_requirements("chapters"), **_requirements()}
    pins = _constraints()
    assert {"torch", "torchvision"} <= set(pins)
    for name, version in pins.items():
        assert name in reqs, f"constraints.txt pins {name}, which no requirement names"
        assert reqs[name].specifier.contains(version), f"constraints.txt's {name}=={version} is outside {reqs[name]}"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "-c constraints.txt" in makefile and ".[chapters,book,test]" in makefile


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # The wheel a user gets, built as tools/downloads.py builds the one it embeds (from a copy of the
    # sources, so that no build/ folder is left in the checkout for a later wheel to pick up).
    spec = importlib.util.spec_from_file_location("downloads", ROOT / "tools" / "downloads.py")
    downloads = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(downloads)
    return downloads.build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_holds_every_module_and_declares_the_ranges(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(zf.read(meta_name).decode())
    modules = {f"neuralode/{p.name}" for p in (ROOT / "neuralode").glob("*.py")}
    assert modules <= names, f"missing from the wheel: {sorted(modules - names)}"
    assert not [n for n in names if n.startswith(("tests/", "book/", "tools/"))]
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    core = {r.name.lower(): r for r in requires if r.marker is None}
    assert set(core) == CORE and core["torch"].specifier.contains(COLAB["torch"])
    assert any(r.name == "torchvision" and r.marker and "chapters" in str(r.marker) for r in requires)


def test_the_wheel_installed_non_editable_imports_and_solves(wheel: Path, tmp_path: Path):
    # Into a folder of its own, imported from outside the repository: it must not lean on the checkout.
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                             str(wheel)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    code = (
        "import sys, torch, neuralode as node\n"
        f"assert node.__file__.startswith({str(target)!r}), node.__file__\n"
        "y = node.odeint(lambda t, y: -y, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0]),"
        " rtol=1e-9, atol=1e-9)\n"
        "assert abs(y[-1, 0].item() - 0.36787944117144233) < 1e-7\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'torchvision', 'sklearn', 'scipy',"
        " 'mlxtend', 'IPython'})\n"  # (not tqdm: torch.hub imports it whenever it is installed)
        "assert not heavy, f'import neuralode imported {heavy}'\n"
        "print('ok', node.__version__)\n")
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
