"""Checks that bite: a plausible bug planted in the library must make its chapter fail.

A check that cannot fail is a defect. For every chapter, each :class:`Mutation` below plants one
bug in ``neuralode`` from outside the library, runs the chapter in the smoke profile, and asserts
that the run fails *at the named check*: the cell that ``stop_at`` finds, with an
``AssertionError`` (or a grader's ``ExerciseError``) whose output matches ``caught_by``. Any
other failure (an ImportError from a broken mutation, a NameError, a timeout) does not count.

How the bug gets in: papermill's kernel inherits papermill's environment, so a directory put first
on ``PYTHONPATH`` holding a ``sitecustomize.py`` is imported by the kernel's interpreter at start-up.
That file installs an import hook which, right after ``neuralode`` is first imported (the chapter's
``import neuralode as node``), runs the mutation's few lines and writes a marker file; the test
requires the marker, so a mutation that was never applied cannot pass for a caught one. Nothing in
the library knows about mutations.

Cost: one smoke run per mutation, cut after the cell that should fail (papermill stops at the first
failing cell anyway, so the cut only drops cells that a caught mutant would never reach). Where the
catching check is a chapter's closing cell, the whole chapter runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import textwrap
import time
from pathlib import Path

import nbformat
import pytest

from conftest import ANSI, ROOT, SMOKE_DIR, SmokeRuns, chapters, papermill

pytestmark = pytest.mark.notebooks

MUTANT_DIR = SMOKE_DIR / "mutants"


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One plausible bug, and the check of one chapter that must catch it.

    name: short id of the bug. chapter: the notebook's stem. bug: what the bug is, in words.
    code: the body of a function that plants the bug; ``node`` is the imported ``neuralode``.
    stop_at: a literal snippet of the source of the cell expected to fail (the run is cut after it).
    caught_by: a regular expression the failing cell's outputs (traceback and printed lines) match,
    naming the check that catches the bug.
    """

    name: str
    chapter: str
    bug: str
    code: str
    stop_at: str
    caught_by: str


MUTATIONS = [
    Mutation(
        name="fixed-grid-off-by-one",
        chapter="01_resnets_are_euler",
        bug="With options={'step_size': dt}, the fixed-step grid is built with range(n - 1) instead of "
            "range(n): N - 1 steps, the last one twice as long (neuralode._loop.FixedSteps).",
        code="""
            from neuralode import _loop
            init = _loop.FixedSteps.__init__

            def __init__(self, options, t_out, stats):
                init(self, options, t_out, stats)
                if options["step_size"] is not None and self.n_steps > 1:
                    self.n_steps -= 1  # what range(n - 1) builds: t0, ..., t0 + (n - 2) dt, t1

            _loop.FixedSteps.__init__ = __init__
        """,
        stop_at="assert lib_gap < 1e-12",
        caught_by=r"tied_resnet should equal the library's Euler solver",
    ),
    Mutation(
        name="dopri5-embedded-weights-swapped",
        chapter="02_solving_odes",
        bug="Two of dopri5's embedded weights b_hat (393/640 and -92097/339200) swapped in the tableau: the "
            "weights still sum to 1 and the tableau's own consistency checks pass, but the error estimate "
            "no longer comes from a fourth-order solution (neuralode._tableaus.DOPRI5).",
        code="""
            import dataclasses
            from neuralode import _methods, _tableaus

            tab = _tableaus.DOPRI5
            b_hat = [b - e for b, e in zip(tab.b, tab.b_error)]
            b_hat[3], b_hat[4] = b_hat[4], b_hat[3]
            bad = dataclasses.replace(tab, b_error=tuple(b - h for b, h in zip(tab.b, b_hat)))  # re-validated
            _tableaus.DOPRI5 = _tableaus.EXPLICIT_TABLEAUS["dopri5"] = _methods.TABLEAUS["dopri5"] = bad
            _methods.REGISTRY["dopri5"] = _methods.REGISTRY["dopri5"]._replace(tableau=bad)
        """,
        stop_at='assert embedded_ok, "an embedded solution does not have the order its tableau claims"',
        caught_by=r"an embedded solution does not have the order its tableau claims",
    ),
    Mutation(
        name="adjoint-parameter-sign",
        chapter="03_adjoint",
        bug="The sign of the parameter adjoint flipped: d a_theta/dt = +a df/dtheta instead of -a df/dtheta "
            "(neuralode.adjoint._backsolve). a_theta feeds nothing back into (z, a), so negating the "
            "gradients _backsolve returns for the parameters is exactly that bug.",
        code="""
            from neuralode import adjoint

            backsolve = adjoint._backsolve

            def _backsolve(*args, **kwargs):
                grad_y0, grad_params = backsolve(*args, **kwargs)
                return grad_y0, [-g for g in grad_params]

            adjoint._backsolve = _backsolve
        """,
        stop_at='assert err_library < 1e-8, "node.odeint_adjoint should compute the scratch adjoint',
        caught_by=r"node\.odeint_adjoint should compute the scratch adjoint's gradients",
    ),
    Mutation(
        name="concatconv-drops-time",
        chapter="04_odenet_classifier",
        bug="ConcatConv2d feeds a channel of zeros instead of the time t (neuralode.nets.ConcatConv2d): the "
            "shapes and the parameter count are unchanged, the dynamics no longer depend on t.",
        code="""
            import torch
            from neuralode import nets

            def forward(self, t, z):
                tt = torch.zeros_like(z[:, :1])
                return self.conv(torch.cat([tt, z], dim=1))

            nets.ConcatConv2d.forward = forward
        """,
        stop_at="assert gap_library < 1e-6 and gap_affine < 1e-5",
        caught_by=r"assert gap_library < 1e-6 and gap_affine < 1e-5",
    ),
    Mutation(
        name="exact-trace-misses-a-term",
        chapter="05_change_of_variables",
        bug="The exact divergence sums the diagonal of df/dz over range(D - 1): the last term of the "
            "trace is missing (neuralode.cnf.divergence_exact, used by node.CNF).",
        code="""
            import torch
            from neuralode import cnf

            def divergence_exact(f_out, z):
                columns = [torch.autograd.grad(f_out[:, i].sum(), z, create_graph=True, retain_graph=True)[0][:, i]
                           for i in range(z.shape[1] - 1)]
                return torch.stack(columns, dim=1).sum(dim=1)

            cnf.divergence_exact = divergence_exact
        """,
        stop_at="assert err_scratch < 1e-8 and err_round_trip < 1e-8",
        caught_by=r"assert err_scratch < 1e-8 and err_round_trip < 1e-8",
    ),
    Mutation(
        name="hutchinson-mean-not-sum",
        chapter="06_ffjord",
        bug="Hutchinson's estimate averages eps * (eps^T J) over the D coordinates instead of summing "
            "them: every trace estimate is scaled by 1/D (neuralode.cnf.divergence_hutchinson).",
        code="""
            import torch
            from neuralode import cnf

            def divergence_hutchinson(f_out, z, noise):
                vjp = torch.autograd.grad(f_out, z, grad_outputs=noise, create_graph=True)[0]
                return (vjp * noise).mean(dim=1)

            cnf.divergence_hutchinson = divergence_hutchinson
        """,
        stop_at='assert scratch_vs_library < 1e-12, f"scratch and library estimates differ',
        caught_by=r"scratch and library estimates differ by",
    ),
    Mutation(
        name="logit-logdet-drops-alpha",
        chapter="06_ffjord",
        bug="dequantize_logit's log-determinant omits the D log(1 - 2 alpha) term of (ch6-logit), so every "
            "bits/dim is off by a constant (neuralode.images.dequantize_logit).",
        code="""
            import math
            from neuralode import images

            dequantize_logit = images.dequantize_logit

            def dropped_alpha(n, u, levels, alpha=images.DEFAULT_ALPHA):
                y, log_det = dequantize_logit(n, u, levels, alpha)
                return y, log_det - n.shape[1] * math.log(1 - 2 * alpha)

            images.dequantize_logit = dropped_alpha
        """,
        stop_at="assert scratch_vs_library_bpd < 1e-9 and inverse_err < 1e-9",
        caught_by=r"the scratch maps and the library's should agree",
    ),
    Mutation(
        name="elbo-drops-kl",
        chapter="07_latent_ode",
        bug="LatentODE.elbo returns the log-likelihood as the ELBO: the KL term is computed and reported "
            "but dropped from the objective (neuralode.latent.LatentODE.elbo).",
        code="""
            from neuralode import latent

            elbo = latent.LatentODE.elbo

            def dropped_kl(self, *args, **kwargs):
                _, log_likelihood, kl = elbo(self, *args, **kwargs)
                return log_likelihood, log_likelihood, kl

            latent.LatentODE.elbo = dropped_kl
        """,
        stop_at='assert all(claims.values()), "some claims of the chapter do not hold',
        caught_by=re.escape("[FAILED] from-scratch ELBO == node.LatentODE.elbo"),
    ),
    Mutation(
        name="poisson-drops-compensator",
        chapter="08_poisson",
        bug="poisson_log_likelihood returns sum_i log lambda(t_i) without subtracting the compensator "
            "int lambda dt (neuralode.poisson.compensator made to return 0 there).",
        code="""
            import torch
            from neuralode import poisson

            def compensator(intensity, t0, t1, *, like=None, **solver):
                return torch.zeros((), dtype=like.dtype, device=like.device)

            poisson.compensator = compensator
        """,
        # The first check to fail is the exercise check on a_hat = N / T (the book's solution): the
        # library's log-likelihood must be flat there. The closing claim "library log-likelihood ==
        # closed form" would catch it too, after the whole chapter.
        stop_at="a_hat is not right yet: the log-likelihood is not flat there",
        caught_by=r"a_hat is not right yet: the log-likelihood is not flat there",
    ),
    Mutation(
        name="rodas4-weights-swapped",
        chapter="09_stiffness",
        bug="rodas4 propagates its embedded third-order solution: the weights m and m_hat of the Rosenbrock "
            "tableau swapped (neuralode._rosenbrock.RODAS4). Both sum to one, so the tableau's own checks "
            "pass (the copy is built with dataclasses.replace, which re-runs them).",
        code="""
            import dataclasses
            from neuralode import _methods

            method = _methods.REGISTRY["rodas4"]
            bad = dataclasses.replace(method.tableau, m=method.tableau.m_hat, m_hat=method.tableau.m)
            _methods.REGISTRY["rodas4"] = method._replace(tableau=bad)
            _methods.TABLEAUS["rodas4"] = bad
        """,
        # The first check to fail is the from-scratch Rosenbrock step: built in the canonical form from
        # the (swapped) tableau's derived weights b, it no longer equals the library's step, which takes
        # y1 = y_hat + u_6 with y_hat from m_hat. The closing claim "rodas4: order 4 with constant
        # steps" would catch it too, after the whole chapter.
        stop_at='assert step_gap < 1e-12, "the scratch Rosenbrock step',
        caught_by=re.escape("the scratch Rosenbrock step and the library's rodas4 step differ"),
    ),
    Mutation(
        name="matching-velocity-sign",
        chapter="10_flow_matching",
        bug="Every affine conditional path returns its velocity with the wrong sign, u_t = -(da x0 + db x1) "
            "(neuralode.matching.AffinePath.__call__): the point x_t, the coefficients and the shapes are unchanged, "
            "so the loss still trains a field, the wrong one.",
        code="""
            from neuralode import matching

            _call = matching.AffinePath.__call__

            def flipped(self, x0, x1, t, eps=None):
                x_t, u_t = _call(self, x0, x1, t, eps)
                return x_t, -u_t

            matching.AffinePath.__call__ = flipped
        """,
        # The first check to fail is the from-scratch loss against flow_matching_loss on the same draws.
        # The closing claims on the toy models would catch it too, after the whole chapter.
        stop_at='assert loss_gap < 1e-10, f"the scratch and library flow-matching losses differ',
        caught_by=re.escape("the scratch and library flow-matching losses differ by"),
    ),
]

SITECUSTOMIZE = '''\
"""Plants the mutation {name!r} in neuralode right after its first import (tests/test_checks_bite.py)."""
import importlib.abc
import importlib.util
import os
import sys
import traceback

_MARKER = {marker!r}


def _plant():
    import neuralode as node  # noqa: F401 (the mutation's code may use it)
{code}


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds neuralode as usual, then executes it with the mutation planted at the end."""

    def __init__(self):
        self.busy, self.inner = False, None

    def find_spec(self, name, path=None, target=None):
        if name != "neuralode" or self.busy:
            return None
        self.busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
        if spec is not None and spec.loader is not None:
            self.inner, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        sys.meta_path.remove(self)
        try:
            _plant()
        except BaseException:
            with open(_MARKER, "w") as f:
                f.write("FAILED\\n" + traceback.format_exc())
            raise
        with open(_MARKER, "w") as f:
            f.write("planted {name} in pid %d" % os.getpid())


sys.meta_path.insert(0, _AfterImport())
'''


def _cut_after(notebook: Path, snippet: str, out: Path) -> int:
    """Copy ``notebook`` without the cells after the first code cell containing ``snippet``.

    Returns the index of that cell; fails the test if no cell contains it (the chapter changed).
    """
    nb = nbformat.read(notebook, as_version=4)
    found = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and snippet in c.source]
    if not found:
        pytest.fail(f"no code cell of {notebook.name} contains {snippet!r}: update the mutation's stop_at", pytrace=False)
    nb.cells = nb.cells[: found[0] + 1]
    nbformat.write(nb, out)
    return found[0]


def _failing_cell(executed: Path):
    """The executed code cell with an error output, and that output's text (or (None, None))."""
    for cell in nbformat.read(executed, as_version=4).cells:
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if cell.cell_type == "code" and errors:
            text = "\n".join(
                o.get("text", "") if o.get("output_type") == "stream" else "\n".join(o.get("traceback", []))
                for o in cell.outputs
            )
            return cell, errors[0], ANSI.sub("", text)
    return None, None, None


def run_mutant(mutation: Mutation):
    """Run the mutation's chapter, cut after ``stop_at``, with the bug planted; return
    (papermill's Run, the marker's text, the output notebook, seconds)."""
    MUTANT_DIR.mkdir(parents=True, exist_ok=True)
    chapter = ROOT / "book" / f"{mutation.chapter}.ipynb"
    source = MUTANT_DIR / f"{mutation.chapter}--{mutation.name}.input.ipynb"
    out = MUTANT_DIR / f"{mutation.chapter}--{mutation.name}.ipynb"
    _cut_after(chapter, mutation.stop_at, source)
    with tempfile.TemporaryDirectory(prefix="neuralode-mutant-") as tmp:
        marker = Path(tmp) / "planted.txt"
        code = textwrap.indent(textwrap.dedent(mutation.code).strip("\n"), "    ")
        (Path(tmp) / "sitecustomize.py").write_text(
            SITECUSTOMIZE.format(name=mutation.name, marker=str(marker), code=code), encoding="utf-8")
        env = {"PYTHONPATH": os.pathsep.join(p for p in (tmp, os.environ.get("PYTHONPATH")) if p)}
        start = time.perf_counter()
        result = papermill(source, out, MUTANT_DIR / "cwd" / mutation.name, env=env)
        seconds = time.perf_counter() - start
        planted = marker.read_text(encoding="utf-8") if marker.is_file() else ""
    return result, planted, out, seconds


def test_every_chapter_has_a_mutant():
    numbered = [c.stem for c in chapters() if re.match(r"\d\d_", c.stem)]
    assert numbered, "no numbered chapters found in _toc.yml"
    missing = sorted(set(numbered) - {m.chapter for m in MUTATIONS})
    assert not missing, f"chapters without a planted bug that they must catch: {missing}"
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names)), "mutation names must be unique"


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[f"{m.chapter[:2]}-{m.name}" for m in MUTATIONS])
def test_chapter_catches_its_mutant(mutation: Mutation, smoke: SmokeRuns):
    chapter = ROOT / "book" / f"{mutation.chapter}.ipynb"
    # Without the bug the chapter passes (the session's smoke run, shared with test_notebooks.py):
    # otherwise a failure below would say nothing about the mutation.
    if not smoke(chapter).ok:
        pytest.fail(f"{chapter.name} fails without any mutation; see test_notebooks.py", pytrace=False)

    result, planted, out, seconds = run_mutant(mutation)
    assert planted.startswith(f"planted {mutation.name}"), (
        f"the mutation {mutation.name!r} was not planted in the kernel (marker: {planted or 'missing'!r}); "
        f"papermill said:\n{result.tail(3000)}")
    if result.ok:
        pytest.fail(
            f"{chapter.name} SURVIVED the mutation {mutation.name!r} ({mutation.bug}); its checks up to the cell "
            f"containing {mutation.stop_at!r} all passed ({seconds:.0f} s). Strengthen them.", pytrace=False)
    cell, error, text = _failing_cell(out)
    assert cell is not None, f"papermill failed but no cell holds an error:\n{result.tail(3000)}"
    assert mutation.stop_at in cell.source, (
        f"{chapter.name} failed under {mutation.name!r}, but in another cell than the expected check "
        f"({error.ename}: {error.evalue}):\n{cell.source[:1500]}")
    assert error.ename in ("AssertionError", "ExerciseError"), (
        f"{chapter.name} failed in the expected cell, but with {error.ename}: {error.evalue}, not a failed "
        f"check:\n{text[-3000:]}")
    assert re.search(mutation.caught_by, text), (
        f"{chapter.name} failed a check in the expected cell, but not the one named ({mutation.caught_by!r}):"
        f"\n{text[-3000:]}")
    print(f"{mutation.name}: caught by {chapter.name} ({error.ename}) in {seconds:.0f} s")
