"""Learning-rate schedules as pure functions of the iteration, and fitting a schedule to a time budget.

The learning rate of iteration ``i`` is ``base_lr * lr_factor(i, ...)``: a linear warm-up
from ``warmup_factor`` to 1 over the first ``warmup_iters`` iterations, multiplied by the
main schedule, either *step* (times ``gamma`` at each of ``steps``, given as fractions
of ``max_iter``) or *cosine* (from 1 down to 0 at ``max_iter``). Because nothing but the
iteration goes in, resuming a run needs no scheduler state beyond the iteration itself,
and a time budget can change ``max_iter`` and the whole schedule follows.

Under a time budget, :class:`BudgetPlanner` times the first iterations (and a few
predictions, to reserve the evaluation's time) and picks ``max_iter`` with
:func:`iterations_within_budget`; :func:`stretch_warmup` keeps the warm-up's fraction.
"""

from __future__ import annotations

import math
import time

import torch

from minimrcnn.engine.checkpoint import unwrap_model
from minimrcnn.engine.distributed import all_reduce_max

SCHEDULES = ("step", "cosine")
CALIBRATION_SKIP = 2  # first iterations fill caches (JIT, allocator) and are not timed
CALIBRATION_ITERS = 5  # timed iterations that set max_iter under a time budget
REPLAN_FRACTION = 0.3  # re-measure the speed once, this far into a budgeted run
EARLY_PLAN_FRACTION = 0.5  # plan before calibration ends if this much of the budget is gone
FINAL_RESERVE_SECONDS = 5.0  # last checkpoint, loss curve, start-up of the evaluation
EVAL_ESTIMATE_IMAGES = 8  # val images predicted to estimate the evaluation time
EVAL_OVERHEAD = 1.35  # COCO matching and RLE encoding add about a third to prediction on CPU


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


# ---------------------------------------------------------------- fitting a time budget


def synchronize(device) -> None:
    """Wait for the device (only for timing: the training loop itself never waits)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def estimate_eval_seconds(model, val_dataset, device, num_images: int) -> float:
    """Seconds to predict ``num_images`` val images, from timing a few of them."""
    if val_dataset is None or len(val_dataset) == 0:
        return 0.0
    model = unwrap_model(model)  # inside DDP
    sample_count = min(EVAL_ESTIMATE_IMAGES, len(val_dataset))
    images = [val_dataset[i][0].to(device) for i in range(sample_count)]
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        synchronize(device)
        start = time.perf_counter()
        model.predict(images)
        synchronize(device)
        seconds = time.perf_counter() - start
    model.train(was_training)
    return EVAL_OVERHEAD * seconds / sample_count * num_images


class BudgetPlanner:
    """Chooses ``max_iter`` so that the run, evaluation included, ends within a wall-clock budget.

    Iterations ``CALIBRATION_SKIP`` .. ``CALIBRATION_SKIP + CALIBRATION_ITERS`` are timed
    (the first ones fill caches; on a machine so slow that half the budget is gone before
    that, it plans at once), then a second, longer measurement at ``REPLAN_FRACTION``
    of the run corrects for speed that changes as the model learns (more positive RoIs;
    fewer detections to paste at evaluation). Each plan also times the prediction of a
    few val images to reserve the evaluation's time. All processes take the slowest
    measurement, so they agree on ``max_iter``.
    """

    def __init__(self, budget_seconds: float, call_start: float, device, model, val_dataset):
        self.budget_seconds = budget_seconds
        self.call_start = call_start
        self.device = device
        self.model = model
        self.val_dataset = val_dataset
        self.first_timed = CALIBRATION_SKIP
        self.last_timed = CALIBRATION_SKIP + CALIBRATION_ITERS
        self.replan_at = None
        self.has_planned = False
        self.timer_start = None

    def after_iteration(self, done: int, iteration: int) -> tuple[int, bool] | None:
        """``(new max_iter, is_first_plan)`` after ``done`` iterations of this call, or None."""
        planned = self.has_planned
        if planned and done != self.replan_at:
            return None
        synchronize(self.device)  # only in the first few iterations and once more
        now = time.perf_counter()
        if done == self.first_timed:
            self.timer_start = now
        if not planned and done < self.last_timed:
            # A machine so slow that calibration would eat much of the budget plans at once
            # (decided together: every process must take part in the plan's all-reduce).
            too_slow = now - self.call_start > EARLY_PLAN_FRACTION * self.budget_seconds
            if not all_reduce_max(float(too_slow))[0]:
                return None
        if self.timer_start is not None and done > self.first_timed:
            seconds_per_iter = (now - self.timer_start) / (done - self.first_timed)
        else:  # not timed yet: start-up included, a pessimistic estimate
            seconds_per_iter = (now - self.call_start) / done
        num_val = len(self.val_dataset) if self.val_dataset is not None else 0
        eval_seconds = estimate_eval_seconds(self.model, self.val_dataset, self.device, num_val)
        elapsed = time.perf_counter() - self.call_start
        # Every input of the plan is agreed on, so every process computes the same max_iter.
        seconds_per_iter, eval_seconds, elapsed = all_reduce_max(seconds_per_iter, eval_seconds, elapsed)
        new_max = iterations_within_budget(iteration, elapsed, seconds_per_iter, self.budget_seconds,
                                           eval_seconds + FINAL_RESERVE_SECONDS)
        is_first = not planned
        self.has_planned = True
        if is_first:
            replan_at = round(REPLAN_FRACTION * new_max)
            self.replan_at = replan_at if replan_at > done else None
        else:
            self.replan_at = None
        return new_max, is_first
