"""Learning-rate schedules as pure functions of the iteration, and fitting a schedule to a time budget.

The learning rate of iteration ``i`` is ``base_lr * lr_factor(i, ...)``: a linear warm-up
from ``warmup_factor`` to 1 over the first ``warmup_iters`` iterations, multiplied by the
main schedule, either *step* (times ``gamma`` at each of ``steps``, given as fractions
of ``max_iter``) or *cosine* (from 1 down to 0 at ``max_iter``). Because nothing but the
iteration goes in, resuming a run needs no scheduler state beyond the iteration itself,
and a time budget can change ``max_iter`` and the whole schedule follows.
"""

from __future__ import annotations

import math

SCHEDULES = ("step", "cosine")


def warmup_factor_at(iteration: int, warmup_iters: int, warmup_factor: float) -> float:
    """Linear warm-up: ``warmup_factor`` at iteration 0, rising to 1 at ``warmup_iters``."""
    if iteration >= warmup_iters:
        return 1.0
    alpha = iteration / warmup_iters
    return warmup_factor * (1.0 - alpha) + alpha


def lr_factor(iteration: int, max_iter: int, warmup_iters: int, warmup_factor: float,
              schedule: str, steps: tuple[float, ...] = (), gamma: float = 0.1) -> float:
    """The multiplier of the base learning rate at ``iteration`` (0-based).

    ``steps`` are fractions of ``max_iter`` (Detectron2's 60k/80k of 90k is ``(2/3, 8/9)``);
    the rate is multiplied by ``gamma`` from the first iteration at or after each step.
    """
    if max_iter <= 0:
        raise ValueError(f"max_iter: expected a positive number of iterations, got {max_iter}")
    if not 0 <= iteration <= max_iter:
        raise ValueError(f"iteration: expected 0 <= iteration <= max_iter={max_iter}, got {iteration}")
    if schedule == "step":
        num_steps_passed = sum(1 for step in steps if iteration >= step * max_iter)
        main = gamma ** num_steps_passed
    elif schedule == "cosine":
        main = 0.5 * (1.0 + math.cos(math.pi * iteration / max_iter))
    else:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    return warmup_factor_at(iteration, warmup_iters, warmup_factor) * main


def stretch_warmup(warmup_iters: int, reference_max_iter: int, max_iter: int) -> int:
    """The warm-up length that keeps the config's warm-up *fraction* when ``max_iter`` changes.

    A config written for 1500 iterations with 100 warm-up iterations warms up for 20
    iterations when a time budget allows only 300. At least one iteration when the
    config asks for any warm-up at all.
    """
    if warmup_iters <= 0:
        return 0
    if reference_max_iter <= 0:
        raise ValueError(f"reference_max_iter: expected > 0, got {reference_max_iter}")
    return max(1, round(warmup_iters * max_iter / reference_max_iter))


def iterations_within_budget(iterations_done: int, seconds_elapsed: float, seconds_per_iter: float,
                             budget_seconds: float, reserve_seconds: float = 0.0) -> int:
    """The total iteration count that ends training ``reserve_seconds`` before the budget runs out.

    ``iterations_done`` iterations have taken ``seconds_elapsed`` so far (all of the run's
    time, start-up included); the rest run at ``seconds_per_iter``. Never fewer than the
    iterations already done, and at least one.
    """
    if seconds_per_iter <= 0:
        raise ValueError(f"seconds_per_iter: expected > 0, got {seconds_per_iter}")
    seconds_left = budget_seconds - reserve_seconds - seconds_elapsed
    more = max(0, math.floor(seconds_left / seconds_per_iter))
    return max(1, iterations_done + more)
