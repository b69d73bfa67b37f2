"""Learning-rate schedules: hand-computed values, warm-up, steps, cosine, time-budget stretching."""

import math

import pytest

from minimrcnn.engine.schedule import (iterations_within_budget, lr_factor, stretch_warmup,
                                       warmup_factor_at)


def test_warmup_is_linear_from_factor_to_one():
    assert warmup_factor_at(0, 10, 0.001) == pytest.approx(0.001)
    assert warmup_factor_at(5, 10, 0.001) == pytest.approx(0.001 * 0.5 + 0.5)
    assert warmup_factor_at(10, 10, 0.001) == 1.0
    assert warmup_factor_at(3, 0, 0.001) == 1.0  # no warm-up at all


def test_step_schedule_matches_detectron2_1x():
    # 90k iterations, steps at 60k and 80k, warm-up 1000 from 0.001 (Detectron2's 1x).
    def factor(i):
        return lr_factor(i, 90_000, 1000, 0.001, "step", (60_000 / 90_000, 80_000 / 90_000), 0.1)

    assert factor(0) == pytest.approx(0.001)
    assert factor(500) == pytest.approx(0.5005)
    assert factor(1000) == 1.0
    assert factor(59_999) == 1.0
    assert factor(60_000) == pytest.approx(0.1)
    assert factor(79_999) == pytest.approx(0.1)
    assert factor(80_000) == pytest.approx(0.01)
    assert factor(89_999) == pytest.approx(0.01)


def test_cosine_schedule_with_warmup():
    def factor(i):
        return lr_factor(i, 100, 10, 0.1, "cosine")

    assert factor(0) == pytest.approx(0.1)
    assert factor(5) == pytest.approx((0.1 * 0.5 + 0.5) * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert factor(50) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(0.0, abs=1e-12)
    values = [factor(i) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # decays monotonically after warm-up


def test_schedule_stretches_with_max_iter():
    # Steps are fractions, so a budget that allows 300 iterations instead of 1500 keeps the shape.
    long = [lr_factor(i, 1500, 100, 0.001, "step", (0.5,), 0.1) for i in range(0, 1500, 5)]
    warmup = stretch_warmup(100, 1500, 300)
    short = [lr_factor(i, 300, warmup, 0.001, "step", (0.5,), 0.1) for i in range(300)]
    assert warmup == 20
    assert long == pytest.approx(short)


def test_stretch_warmup_keeps_at_least_one_iteration():
    assert stretch_warmup(100, 1500, 3) == 1
    assert stretch_warmup(0, 1500, 3000) == 0
    assert stretch_warmup(100, 1500, 3000) == 200


def test_iterations_within_budget():
    # 10 iterations took 30 s (start-up included); 2 s each from now; 600 s budget, 50 s reserved.
    assert iterations_within_budget(10, 30.0, 2.0, 600.0, 50.0) == 10 + 260
    # A budget already spent keeps the iterations done.
    assert iterations_within_budget(10, 700.0, 2.0, 600.0) == 10
    assert iterations_within_budget(0, 700.0, 2.0, 600.0) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(iteration=0, max_iter=0), "max_iter"),
    (dict(iteration=11, max_iter=10), "iteration"),
    (dict(iteration=1, max_iter=10, schedule="linear"), "schedule"),
])
def test_bad_arguments_are_named(kwargs, message):
    arguments = dict(warmup_iters=0, warmup_factor=1.0, schedule="step")
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        lr_factor(**arguments)
    with pytest.raises(ValueError, match="seconds_per_iter"):
        iterations_within_budget(0, 0.0, 0.0, 10.0)


def test_budget_planner_plans_after_calibration_then_once_more(monkeypatch):
    from minimrcnn.engine import schedule

    clock = {"now": 0.0}
    monkeypatch.setattr(schedule.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(schedule, "estimate_eval_seconds", lambda *args: 10.0)
    planner = schedule.BudgetPlanner(budget_seconds=1000.0, call_start=0.0, device="cpu", model=None,
                                     val_dataset=None)
    plans = {}
    for done in range(1, 400):
        clock["now"] = 5.0 + 2.0 * done  # 5 s of start-up, then 2 s per iteration
        plan = planner.after_iteration(done, done)
        if plan is not None:
            plans[done] = plan
    last_timed = schedule.CALIBRATION_SKIP + schedule.CALIBRATION_ITERS
    # (1000 - 10 - 5 - (5 + 2 * 7)) / 2 = 483 more iterations after the 7 done.
    first = last_timed + (1000 - 10 - schedule.FINAL_RESERVE_SECONDS - (5 + 2 * last_timed)) // 2
    assert plans[last_timed] == (first, True)
    replan_at = round(schedule.REPLAN_FRACTION * first)
    assert list(plans) == [last_timed, replan_at]
    assert plans[replan_at][1] is False


def test_budget_planner_plans_early_on_a_very_slow_machine(monkeypatch):
    from minimrcnn.engine import schedule

    clock = {"now": 0.0}
    monkeypatch.setattr(schedule.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(schedule, "estimate_eval_seconds", lambda *args: 0.0)
    planner = schedule.BudgetPlanner(budget_seconds=100.0, call_start=0.0, device="cpu", model=None,
                                     val_dataset=None)
    clock["now"] = 30.0
    assert planner.after_iteration(1, 1) is None
    clock["now"] = 60.0  # over half the budget after 2 iterations: plan now, with 30 s per iteration
    assert planner.after_iteration(2, 2) == (2 + int((100 - 5 - 60) // 30), True)
