"""Tests of neuralode.exercises: right answers pass, wrong ones fail with a helpful message."""

import math

import numpy as np
import pytest
import torch

from neuralode.exercises import ExerciseError, check_close, check_function


def test_exercise_error_is_an_assertion_error():
    assert issubclass(ExerciseError, AssertionError)


# ------------------------------------------------------------------ check_close

@pytest.mark.parametrize(
    "actual, expected",
    [
        (1.0, 1.0),
        (1.0 + 1e-9, 1.0),
        (torch.tensor(2.0), 2.0),
        (torch.tensor([2.0]), 2.0),  # one value, one answer
        (np.array([1.0, 2.0]), torch.tensor([1.0, 2.0], dtype=torch.float64)),
        (torch.ones(3, 2, dtype=torch.float32), torch.ones(3, 2, dtype=torch.float64)),
        ((1.0, torch.zeros(2)), (1.0, torch.zeros(2))),
        (3, 3.0),
    ],
)
def test_check_close_passes_on_right_answers(actual, expected, capsys):
    check_close(actual, expected, name="x")
    out = capsys.readouterr().out
    assert out.startswith("Correct")
    assert out.count("\n") == 1


def test_check_close_wrong_value_names_expected_and_got():
    with pytest.raises(ExerciseError) as info:
        check_close(0.5, 0.25, name="the error constant", hint="expand the logarithm")
    msg = str(info.value)
    assert "the error constant" in msg
    assert "0.25" in msg and "0.5" in msg
    assert "Hint: expand the logarithm" in msg


def test_check_close_reports_worst_index():
    expected = torch.zeros(4)
    actual = torch.tensor([0.0, 0.0, 3.0, 0.0])
    with pytest.raises(ExerciseError, match=r"index \(2,\)"):
        check_close(actual, expected)


def test_check_close_wrong_shape():
    with pytest.raises(ExerciseError, match="shape"):
        check_close(torch.zeros(3, 2), torch.zeros(2, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), torch.tensor([1.0, float("nan")])])
def test_check_close_non_finite(bad):
    expected = 1.0 if not isinstance(bad, torch.Tensor) else torch.ones(2)
    with pytest.raises(ExerciseError, match="NaN or inf"):
        check_close(bad, expected)


def test_check_close_missing_answer():
    with pytest.raises(ExerciseError, match="None"):
        check_close(None, 1.0)


def test_check_close_not_a_number():
    with pytest.raises(ExerciseError, match="expected a number"):
        check_close("0.5", 0.5)


def test_check_close_tuple_length():
    with pytest.raises(ExerciseError, match="2 values"):
        check_close((1.0,), (1.0, 2.0))


def test_check_close_tolerances_are_used():
    check_close(1.05, 1.0, atol=0.1, rtol=0.0)
    with pytest.raises(ExerciseError):
        check_close(1.05, 1.0, atol=0.01, rtol=0.0)
    with pytest.raises(ValueError):
        check_close(1.0, 1.0, rtol=-1.0)


def test_check_close_accepts_tensors_that_need_grad():
    x = torch.ones(2, requires_grad=True)
    check_close(x * 2, torch.full((2,), 2.0))


# ------------------------------------------------------------------ check_function

def _euler(f, z0, t1, n):
    h = t1 / n
    z = z0
    for k in range(n):
        z = z + h * f(torch.tensor(k * h, dtype=z0.dtype), z)
    return z


def _cases():
    z0 = torch.tensor([[1.0, 0.0], [0.5, -0.5]], dtype=torch.float64)
    return [(lambda t, z: -z, z0, 1.0, 10), (lambda t, z: t * z, z0, 0.5, 4)]


def test_check_function_passes_on_a_right_function(capsys):
    def student(f, z0, t1, n):  # the same algorithm, written differently
        z, t, h = z0.clone(), 0.0, t1 / n
        for _ in range(n):
            z += h * f(torch.tensor(t, dtype=z.dtype), z)
            t += h
        return z

    check_function(student, _euler, _cases(), name="euler_resnet")
    out = capsys.readouterr().out
    assert out.startswith("Correct") and "2 cases" in out


def test_check_function_names_the_failing_case():
    def off_by_one(f, z0, t1, n):
        return _euler(f, z0, t1, n + 1)

    with pytest.raises(ExerciseError) as info:
        check_function(off_by_one, _euler, _cases(), name="euler_resnet", hint="count the steps")
    msg = str(info.value)
    assert "euler_resnet" in msg and "case 1 of 2" in msg
    assert "expected" in msg and "got" in msg
    assert "Hint: count the steps" in msg


def test_check_function_catches_a_wrong_time_argument():
    def ignores_time(f, z0, t1, n):
        return _euler(lambda t, z: f(torch.tensor(0.0, dtype=z.dtype), z), z0, t1, n)

    with pytest.raises(ExerciseError, match="case 2 of 2"):
        check_function(ignores_time, _euler, _cases())


def test_check_function_wrong_shape():
    def flattens(f, z0, t1, n):
        return _euler(f, z0, t1, n).reshape(-1)

    with pytest.raises(ExerciseError, match="shape"):
        check_function(flattens, _euler, _cases())


def test_check_function_student_raises():
    def broken(f, z0, t1, n):
        return z0 @ torch.ones(3)

    with pytest.raises(ExerciseError, match="raised RuntimeError on case 1"):
        check_function(broken, _euler, _cases())


def test_check_function_not_implemented():
    def stub(f, z0, t1, n):
        raise NotImplementedError

    with pytest.raises(ExerciseError, match="not implemented yet"):
        check_function(stub, _euler, _cases())


def test_check_function_returns_none():
    def forgets_return(f, z0, t1, n):
        _euler(f, z0, t1, n)

    with pytest.raises(ExerciseError, match="return"):
        check_function(forgets_return, _euler, _cases())


def test_check_function_not_callable():
    with pytest.raises(ExerciseError, match="should be a function"):
        check_function(3.0, _euler, _cases(), name="euler_resnet")


def test_check_function_keyword_cases_and_scalars():
    check_function(lambda lam: lam**2 * math.exp(lam) / 2,
                   lambda lam: 0.5 * lam * lam * math.exp(lam),
                   [dict(lam=-1.0), dict(lam=2.0)])
    with pytest.raises(ExerciseError):
        check_function(lambda lam: lam * math.exp(lam) / 2,
                       lambda lam: 0.5 * lam * lam * math.exp(lam),
                       [dict(lam=-1.0), dict(lam=2.0)])


def test_check_function_needs_cases():
    with pytest.raises(ValueError):
        check_function(_euler, _euler, [])
