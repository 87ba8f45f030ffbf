"""Checks that grade a reader's answer to an exercise, with a message a student can act on.

Each check prints one line starting with ``Correct`` when the answer is right, and otherwise
raises :class:`ExerciseError` saying which case failed, what was expected, what was obtained,
and a hint. The checks accept Python numbers, NumPy arrays and PyTorch tensors (on any device),
and nested tuples or lists of these.

Example::

    from neuralode.exercises import check_close, check_function
    check_close(my_slope, -1.0, name="slope", atol=0.1)
    check_function(my_step, reference_step, cases=[(f, z0, 0.1)], name="my_step")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ExerciseError", "check_close", "check_function"]


class ExerciseError(AssertionError):
    """An answer to an exercise is not right yet; the message says what differs and why."""


def _to_array(value: Any) -> np.ndarray | None:
    """A float64 NumPy copy of a number, array or tensor; None when it is none of these."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.is_complex():
            return value.numpy().astype(np.complex128)
        return value.double().numpy()
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.number, np.ndarray)):
        arr = np.asarray(value)
        if arr.dtype.kind in "biuf":
            return arr.astype(np.float64)
        if arr.dtype.kind == "c":
            return arr.astype(np.complex128)
    return None


def _describe(value: Any, limit: int = 6) -> str:
    """A short, readable description of a value for an error message."""
    arr = _to_array(value)
    if arr is None:
        if callable(value):
            return f"the function {getattr(value, '__name__', type(value).__name__)}"
        if isinstance(value, (tuple, list)):
            inner = ", ".join(_describe(v, limit) for v in value)
            return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
        return repr(value)
    kind = type(value).__name__
    if arr.ndim == 0:
        return f"{arr.item():.6g}"
    flat = arr.ravel()
    shown = ", ".join(f"{v:.6g}" for v in flat[:limit]) + (", ..." if flat.size > limit else "")
    return f"{kind} of shape {tuple(arr.shape)}: [{shown}]"


def _mismatch(actual: Any, expected: Any, rtol: float, atol: float) -> str | None:
    """None when ``actual`` matches ``expected``; otherwise a sentence saying how they differ."""
    if isinstance(expected, (tuple, list)) and _to_array(expected) is None:
        if not isinstance(actual, (tuple, list)):
            return (f"expected a {type(expected).__name__} of {len(expected)} values, "
                    f"got {_describe(actual)}")
        if len(actual) != len(expected):
            return f"expected {len(expected)} values, got {len(actual)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            why = _mismatch(a, e, rtol, atol)
            if why is not None:
                return f"in item {i}: {why}"
        return None
    exp = _to_array(expected)
    if exp is None:
        raise TypeError(f"the reference value must be a number, array or tensor, got {type(expected).__name__}")
    if actual is None:
        return ("got None: the answer is still missing (did you forget a `return`, "
                "or to assign your result?)")
    act = _to_array(actual)
    if act is None:
        return f"expected a number, array or tensor, got {type(actual).__name__}: {actual!r}"
    if act.shape != exp.shape:
        if act.size == exp.size == 1:
            act = act.reshape(exp.shape)  # 3.0 and tensor([3.0]) mean the same answer
        else:
            return (f"shape mismatch: expected shape {tuple(exp.shape)}, got shape {tuple(act.shape)} "
                    f"(check which axis you sum or index over, and the batch dimension)")
    if not np.all(np.isfinite(act)):
        return f"the answer contains NaN or inf: {_describe(actual)}"
    err = np.abs(act - exp)
    tol = atol + rtol * np.abs(exp)
    if np.all(err <= tol):
        return None
    worst = np.unravel_index(int(np.argmax(err - tol)), err.shape) if err.ndim else ()
    where = f" at index {tuple(int(i) for i in worst)}" if err.ndim else ""
    return (f"values differ{where}: expected {_describe(exp[worst] if err.ndim else exp)}, "
            f"got {_describe(act[worst] if err.ndim else act)} "
            f"(absolute error {float(err[worst] if err.ndim else err):.3g}, "
            f"allowed {float(tol[worst] if err.ndim else tol):.3g})")


def _fail(message: str, hint: str | None) -> None:
    """Raise the student's error, with the hint on a line of its own."""
    raise ExerciseError(message + (f"\nHint: {hint}" if hint else ""))


def _check_tolerances(rtol: float, atol: float) -> None:
    if not (rtol >= 0 and atol >= 0):
        raise ValueError(f"rtol and atol must be non-negative, got rtol={rtol}, atol={atol}")


def check_close(
    actual: Any,
    expected: Any,
    *,
    name: str = "your answer",
    rtol: float = 1e-5,
    atol: float = 1e-8,
    hint: str | None = None,
) -> None:
    """Check that a student's value matches the expected one to within a tolerance.

    Passes when ``|actual - expected| <= atol + rtol * |expected|`` elementwise and the shapes
    agree (a single number and a one-element array count as the same shape).

    Args:
        actual: the student's value: a number, NumPy array or tensor (any shape, any device),
            or a tuple/list of these.
        expected: the reference value, of the same kind.
        name: what the value is called in the exercise, used in the messages.
        rtol: relative tolerance.
        atol: absolute tolerance.
        hint: a sentence added to the error message to point the student in a direction.

    Raises:
        ExerciseError: when the value is missing, has the wrong shape, is not finite, or differs.
    """
    _check_tolerances(rtol, atol)
    why = _mismatch(actual, expected, rtol, atol)
    if why is not None:
        _fail(f"{name} is not right yet: {why}.", hint)
    print(f"Correct: {name} matches the expected value {_describe(expected)}.")


def check_function(
    student_fn: Callable[..., Any],
    reference_fn: Callable[..., Any],
    cases: Iterable[Sequence[Any] | Mapping[str, Any]],
    *,
    name: str | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    hint: str | None = None,
) -> None:
    """Check that a student's function agrees with a reference function on every case.

    Args:
        student_fn: the function the student wrote.
        reference_fn: a function known to be right, with the same signature.
        cases: the inputs to try; each case is a tuple of positional arguments, or a dict of
            keyword arguments. Both functions get the same objects, so a function must not
            modify its inputs in place.
        name: what the function is called in the exercise (default: its ``__name__``).
        rtol: relative tolerance of the comparison of the outputs.
        atol: absolute tolerance of the comparison of the outputs.
        hint: a sentence added to the error message.

    Raises:
        ExerciseError: when ``student_fn`` is not a function, raises on a case, or returns a
            value of the wrong kind, shape or size on some case.
    """
    _check_tolerances(rtol, atol)
    label = name or getattr(student_fn, "__name__", "your function")
    if not callable(student_fn):
        raise ExerciseError(
            f"{label} should be a function, got {type(student_fn).__name__}: {student_fn!r}. "
            "Define it with `def` and pass the function itself, without calling it.")
    cases = list(cases)
    if not cases:
        raise ValueError("check_function needs at least one case")
    for i, case in enumerate(cases, start=1):
        args, kwargs = ((), dict(case)) if isinstance(case, Mapping) else (tuple(case), {})
        shown = ", ".join([_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()])
        expected = reference_fn(*args, **kwargs)
        try:
            actual = student_fn(*args, **kwargs)
        except NotImplementedError:
            raise ExerciseError(f"{label} is not implemented yet: replace the "
                                "`raise NotImplementedError` with your code.") from None
        except Exception as exc:
            raise ExerciseError(
                f"{label} raised {type(exc).__name__} on case {i} of {len(cases)} "
                f"({label}({shown})): {exc}") from exc
        why = _mismatch(actual, expected, rtol, atol)
        if why is not None:
            _fail(f"{label} is not right yet on case {i} of {len(cases)}, {label}({shown}): {why}.", hint)
    print(f"Correct: {label} agrees with the reference on all {len(cases)} cases.")
