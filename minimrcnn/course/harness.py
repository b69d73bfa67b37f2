"""The machinery every checker shares: run a student's function on a list of cases,
compare with the package's answer, and say in plain words what went wrong.

A checker never lets an exception from the student's code escape as a traceback from
inside the checker: it catches it, prints what happened and returns a ``CheckResult``
(truthy when every case passed). Under nbval the solved notebooks must fail loudly
when a checker rejects them, so a failure raises ``ExerciseFailed`` (an
AssertionError) when ``strict=True`` or when the environment variable
``MINIMRCNN_COURSE_STRICT`` is set (notebooks/conftest.py sets it for pytest).
"""

from __future__ import annotations

import copy
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

# A student's function gets this many seconds per call before it is called "too slow".
DEFAULT_TIME_LIMIT = 5.0
STRICT_ENV = "MINIMRCNN_COURSE_STRICT"
NOT_WRITTEN = "not written yet"


class ExerciseFailed(AssertionError):
    """Raised by a checker in strict mode when the student's function fails a case."""


class _TooSlow(BaseException):  # BaseException: a student's `except Exception` cannot swallow it
    pass


@dataclass
class Case:
    """One input for the student's function.

    args / kwargs: what the function is called with (deep-copied for every call);
    describe: the input in plain words; expected: the package's answer;
    hint: what usually goes wrong on exactly this case (optional).
    """

    describe: str
    args: tuple
    expected: Any
    kwargs: dict = field(default_factory=dict)
    hint: str = ""


@dataclass
class CheckResult:
    name: str
    passed: bool
    cases_passed: int
    cases_total: int
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:  # a notebook shows the result of the last line: keep it short
        return f"CheckResult({self.name}: {'passed' if self.passed else 'failed'}, " \
               f"{self.cases_passed}/{self.cases_total} cases)"


def show(value, limit: int = 600) -> str:
    """A value in a few readable lines (tensors with shape and dtype)."""
    if isinstance(value, torch.Tensor):
        body = np.array2string(value.detach().cpu().numpy(), precision=4, suppress_small=True,
                               threshold=60)
        text = f"tensor of shape {list(value.shape)}, dtype {value.dtype}:\n{body}"
    elif isinstance(value, np.ndarray):
        body = np.array2string(value, precision=4, suppress_small=True, threshold=60)
        text = f"array of shape {list(value.shape)}, dtype {value.dtype}:\n{body}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def _call_with_time_limit(function: Callable, args, kwargs, time_limit: float):
    """Call function(*args, **kwargs); raise _TooSlow after time_limit seconds where possible.

    The alarm interrupts a runaway loop only in the main thread of a Unix process (as in a
    Jupyter kernel); elsewhere the call runs to the end and its duration is checked after.
    """
    use_alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    previous = None
    if use_alarm:
        def on_alarm(signum, frame):
            raise _TooSlow()
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, time_limit)
    start = time.perf_counter()
    try:
        result = function(*args, **kwargs)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    if time.perf_counter() - start > time_limit:
        raise _TooSlow()
    return result


def _is_strict(strict: bool | None) -> bool:
    if strict is not None:
        return strict
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def _finish(name: str, passed: int, total: int, message: str, strict: bool | None, quiet: bool):
    ok = passed == total and not message
    text = f"✓ {name}: {total} cases passed" if ok else message
    if not quiet:
        print(text)
    result = CheckResult(name, ok, passed, total, text)
    if not ok and _is_strict(strict):
        raise ExerciseFailed(text)
    return result


def run_checks(name: str, student_fn: Callable, cases: list[Case],
               compare: Callable[[Any, Any], str | None], *, time_limit: float = DEFAULT_TIME_LIMIT,
               strict: bool | None = None, quiet: bool = False) -> CheckResult:
    """Run ``student_fn`` on every case; stop at the first failure and explain it.

    compare(expected, obtained) returns None when they agree, else a sentence saying how
    they differ (wrong shape, wrong dtype, wrong values at ...). The global random
    states of torch and NumPy are restored afterwards, so that checking an exercise does
    not change what the notebook's later seeded cells draw.
    """
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            return _run_checks(name, student_fn, cases, compare, time_limit, strict, quiet)
        finally:
            np.random.set_state(numpy_state)


def _run_checks(name, student_fn, cases, compare, time_limit, strict, quiet):
    if not callable(student_fn):
        return _finish(name, 0, len(cases), f"✗ {name}: expected a function, got {type(student_fn).__name__} "
                       f"({show(student_fn, 80)}). Pass the function itself, without calling it.",
                       strict, quiet)
    for index, case in enumerate(cases):
        args, kwargs = copy.deepcopy(case.args), copy.deepcopy(case.kwargs)
        header = f"✗ {name}: case {index + 1} of {len(cases)} — {case.describe}"
        try:
            obtained = _call_with_time_limit(student_fn, args, kwargs, time_limit)
        except NotImplementedError:
            return _finish(name, index, len(cases),
                           f"✗ {name}: {NOT_WRITTEN} — the function still raises NotImplementedError. "
                           f"Replace the `raise NotImplementedError(...)` line with your code.", strict, quiet)
        except _TooSlow:
            return _finish(name, index, len(cases),
                           f"{header}\n  your function took more than {time_limit:g} s on this input "
                           f"(the package needs milliseconds). Look for a loop that never ends, or loop "
                           f"over fewer things (vectorize with tensor operations).", strict, quiet)
        except Exception as error:  # the student's bug, reported in their terms
            return _finish(name, index, len(cases),
                           f"{header}\n  your function raised {type(error).__name__}: {error}\n"
                           f"  input: {_describe_args(case)}"
                           + (f"\n  hint: {case.hint}" if case.hint else ""), strict, quiet)
        try:
            problem = compare(case.expected, obtained)
        except Exception as error:  # e.g. a result that cannot be read as numbers at all
            problem = f"the result could not be compared ({type(error).__name__}: {error})"
        if problem:
            return _finish(name, index, len(cases),
                           f"{header}\n  {problem}\n  input: {_describe_args(case)}\n"
                           f"  expected: {show(case.expected)}\n  obtained: {show(obtained)}"
                           + (f"\n  hint: {case.hint}" if case.hint else ""), strict, quiet)
    return _finish(name, len(cases), len(cases), "", strict, quiet)


def _describe_args(case: Case) -> str:
    parts = [show(a, 300) for a in case.args] + [f"{k}={show(v, 200)}" for k, v in case.kwargs.items()]
    return "(" + ", ".join(parts) + ")"


# ------------------------------------------------------------------ comparisons

def _as_array(value, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def compare_arrays(*, atol: float = 1e-5, rtol: float = 1e-5, dtype_kind: str | None = None,
                   tensor: bool | None = None) -> Callable[[Any, Any], str | None]:
    """A compare() for arrays or tensors: same shape, then (if given) the same kind of
    dtype ("f" float, "i" integer, "b" bool), then values within atol + rtol |expected|.
    tensor=True requires a torch.Tensor, False a NumPy array or list."""
    def compare(expected, obtained):
        if tensor is True and not isinstance(obtained, torch.Tensor):
            return f"expected a torch.Tensor, got {type(obtained).__name__}"
        if obtained is None:
            return "your function returned None (did you forget `return`?)"
        expected_array = _as_array(expected, "expected")
        obtained_array = _as_array(obtained, "obtained")
        if obtained_array.dtype == object:
            return f"the result is not a regular array of numbers ({type(obtained).__name__})"
        if obtained_array.shape != expected_array.shape:
            return f"wrong shape: expected {list(expected_array.shape)}, got {list(obtained_array.shape)}"
        if dtype_kind is not None:
            kind = obtained_array.dtype.kind
            kind = "i" if kind == "u" else kind
            if kind != dtype_kind:
                names = {"f": "floating point", "i": "integer", "b": "bool"}
                return f"wrong dtype: expected {names[dtype_kind]}, got {obtained_array.dtype}"
        if expected_array.size == 0:
            return None
        if expected_array.dtype.kind in "biu" and obtained_array.dtype.kind in "biu":
            wrong = expected_array != obtained_array
        else:
            e64 = expected_array.astype(np.float64)
            o64 = obtained_array.astype(np.float64)
            wrong = ~np.isclose(o64, e64, atol=atol, rtol=rtol, equal_nan=True)
        if wrong.any():
            first = tuple(int(i) for i in np.argwhere(wrong)[0])
            where = f" at index {first}" if expected_array.ndim else ""
            e = expected_array[first] if expected_array.ndim else expected_array
            o = obtained_array[first] if obtained_array.ndim else obtained_array
            e, o = (v.item() if hasattr(v, "item") else v for v in (e, o))  # 0.5, not np.float64(0.5)
            return (f"wrong values: {int(wrong.sum())} of {wrong.size} differ; the first{where}: "
                    f"expected {e!r}, got {o!r}")
        return None
    return compare


def compare_exact(expected, obtained) -> str | None:
    """A compare() for plain Python values (ints, lists, tuples, bools)."""
    if obtained is None and expected is not None:
        return "your function returned None (did you forget `return`?)"
    if isinstance(obtained, (np.ndarray, torch.Tensor)):
        obtained = obtained.tolist()
    if isinstance(obtained, (np.generic,)):
        obtained = obtained.item()
    if isinstance(expected, (list, tuple)) and isinstance(obtained, (list, tuple)):
        if len(expected) != len(obtained):
            return f"wrong length: expected {len(expected)} items, got {len(obtained)}"
        for i, (e, o) in enumerate(zip(expected, obtained)):
            problem = compare_exact(e, o)
            if problem:
                return f"item {i}: {problem}"
        return None
    if isinstance(expected, bool) or isinstance(obtained, bool):
        return None if bool(expected) == obtained and isinstance(obtained, (bool, np.bool_)) \
            else f"expected {expected!r}, got {obtained!r}"
    if isinstance(expected, float) or isinstance(obtained, float):
        try:
            return None if abs(float(expected) - float(obtained)) <= 1e-9 * max(1.0, abs(float(expected))) \
                else f"expected {expected!r}, got {obtained!r}"
        except (TypeError, ValueError):
            return f"expected a number, got {obtained!r}"
    return None if expected == obtained else f"expected {expected!r}, got {obtained!r}"


def compare_scalar(atol: float = 1e-6):
    """A compare() for one number (a float, a 0-d tensor or a 0-d array)."""
    def compare(expected, obtained):
        if obtained is None:
            return "your function returned None (did you forget `return`?)"
        if isinstance(obtained, torch.Tensor):
            if obtained.numel() != 1:
                return f"expected one number, got a tensor of shape {list(obtained.shape)}"
            obtained = obtained.item()
        try:
            value = float(obtained)
        except (TypeError, ValueError):
            return f"expected one number, got {type(obtained).__name__}"
        expected = float(expected)
        if not np.isclose(value, expected, atol=atol, rtol=1e-6):
            return f"expected {expected:.6g}, got {value:.6g} (difference {value - expected:+.3g})"
        return None
    return compare
