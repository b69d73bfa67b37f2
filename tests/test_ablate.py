"""Tests for minimrcnn.engine.ablate: the resumable ablation table."""

import json
import math

import pytest

from minimrcnn.cli import build_parser
from minimrcnn.config import get_config
from minimrcnn.engine import ablate as ablate_module
from minimrcnn.engine.ablate import ROWS, ablate, direction_verdict, format_table, mean_std, row_changes


def tiny_base(tmp_path):
    """A JSON config: shapes-cpu made tiny, so that a run takes seconds."""
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({
        "base": "shapes-cpu", "backbone_width": 8, "fpn_channels": 16, "box_head_dim": 32, "mask_head_dim": 16,
        "rpn_pre_nms_topk_train": 100, "rpn_post_nms_topk_train": 50, "rpn_pre_nms_topk_test": 100,
        "rpn_post_nms_topk_test": 50, "roi_batch_size_per_image": 32, "batch_size": 2, "warmup_iters": 1,
        "detections_per_image": 20,
    }))
    return str(path)


def test_runner_writes_a_complete_table_and_resumes_without_redoing_runs(tmp_path, tiny_shapes, monkeypatch):
    out = tmp_path / "table"
    settings = dict(seeds=2, only=["baseline", "roiwarp_max"], iterations=3, base_config=tiny_base(tmp_path),
                    data_root=str(tiny_shapes), threads=1, val_limit=4, progress=lambda message: None)
    started = []
    real_run = ablate_module._run_in_child

    def interrupted_after_three(spec_path, *args):
        if len(started) == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived during the fourth run
        started.append(spec_path.parent.name)
        return real_run(spec_path, *args)

    monkeypatch.setattr(ablate_module, "_run_in_child", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt):
        ablate(out, **settings)
    state = json.loads((out / "runs.json").read_text())
    assert sorted(state["runs"]) == sorted(started) == ["baseline-s0", "baseline-s1", "roiwarp_max-s0"]
    first_records = dict(state["runs"])

    resumed = []
    monkeypatch.setattr(ablate_module, "_run_in_child",
                        lambda spec_path, *args: resumed.append(spec_path.parent.name) or real_run(spec_path, *args))
    state = ablate(out, **settings)
    assert resumed == ["roiwarp_max-s1"]  # finished runs are not redone
    assert sorted(state["runs"]) == ["baseline-s0", "baseline-s1", "roiwarp_max-s0", "roiwarp_max-s1"]
    assert all(state["runs"][key] == first_records[key] for key in first_records)
    for key, run in state["runs"].items():
        assert run["iterations"] == 3 and run["seed"] == int(key[-1]) and run["peak_mib"] > 0
        assert 0.0 <= run["segm_AP"] <= 1.0 and 0.0 <= run["bbox_AP"] <= 1.0
        spec = json.loads((out / "runs" / key / "spec.json").read_text())
        assert spec["args"]["config_dict"]["roi_op"] == ("warp_max" if key.startswith("roiwarp_max") else "align")
        assert spec["args"]["config_dict"]["seed"] == run["seed"]
    assert len(json.loads((out / "instances_val_first4.json").read_text())["images"]) == 4
    table = (out / "table.md").read_text()
    assert "first 4 val images" in table
    lines = [line for line in table.splitlines() if line.startswith("| baseline") or line.startswith("| roiwarp_max")]
    assert len(lines) == 2 and all(line.count("|") == 15 for line in lines)
    assert "| 2 |" in lines[0] and "27.2/49.2/27.1 (-3.1)" in lines[1]  # two seeds; the paper's Table 2c row
    # other settings into the same folder are refused, not mixed
    with pytest.raises(ValueError, match="other settings"):
        ablate(out, **{**settings, "iterations": 4})


def test_rows_and_arguments():
    base = get_config("shapes-cpu")
    assert row_changes("mask28", base) == {"mask_resolution": 28}  # shapes-cpu uses 14
    assert row_changes("mask28", get_config("coco-r50-fpn")) == {"mask_resolution": 14}
    assert set(ROWS) == {"baseline", "roipool", "roiwarp", "roiwarp_max", "roialign_max", "softmax",
                         "class_agnostic", "mlp", "mask28", "c4"}
    with pytest.raises(ValueError, match="unknown row 'fpn'"):
        row_changes("fpn", base)
    with pytest.raises(ValueError, match="exactly one"):
        ablate("unused", iterations=3, time_budget=1.0)
    args = build_parser().parse_args(["ablate", "--iterations", "5", "--seeds", "2", "--only", "baseline,c4"])
    assert (args.iterations, args.seeds, args.only, args.time_budget) == (5, 2, "baseline,c4", None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ablate", "--iterations", "5", "--time-budget", "2"])


def test_direction_rule():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    base = [0.50, 0.51, 0.49]
    assert direction_verdict([0.40, 0.41, 0.39], base, -3.4)[0] == "yes"
    assert direction_verdict([0.60, 0.61, 0.59], base, -3.4)[0] == "opposite"
    assert direction_verdict([0.50, 0.52, 0.47], base, -3.4)[0] == "not resolved"
    assert direction_verdict([0.50, 0.52, 0.47], base, -0.1)[0] == "yes (no difference)"
    assert direction_verdict([0.40, 0.41, 0.39], base, -0.1)[0] == "no (a difference)"
    assert direction_verdict([0.40], base, -3.4)[0].startswith("n/a")
    verdict, t = direction_verdict([0.40, 0.41, 0.39], base, -3.4)
    assert t == pytest.approx(-0.10 / math.sqrt(0.01**2 / 3 + 0.01**2 / 3))
    empty = format_table({"settings": {"base_config": "x", "data_root": "d", "iterations": 1, "time_budget": None,
                                       "val_limit": None},
                          "runs": {}})
    assert empty.count("not run") == len(ROWS)


def test_parallel_jobs_pin_each_run_to_its_own_cpus(tmp_path, tiny_shapes, monkeypatch):
    monkeypatch.setattr(ablate_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert ablate_module.cpu_slots(2) == [{0, 1}, {2, 3}]
    assert ablate_module.cpu_slots(1) == [None] and ablate_module.cpu_slots(5) == [None] * 5
    with pytest.raises(ValueError, match="jobs"):
        ablate("unused", iterations=3, jobs=0)

    calls = []
    real_run = ablate_module._run_in_child
    monkeypatch.setattr(ablate_module, "cpu_slots", lambda jobs: [None] * jobs)  # this machine may have 1 CPU

    def recorded(spec_path, result_path, log_path, nice, cpus):
        calls.append(spec_path.parent.name)
        return real_run(spec_path, result_path, log_path, nice, cpus)

    monkeypatch.setattr(ablate_module, "_run_in_child", recorded)
    state = ablate(tmp_path / "table", seeds=2, only=["baseline"], iterations=2, base_config=tiny_base(tmp_path),
                   data_root=str(tiny_shapes), threads=1, val_limit=2, jobs=2, progress=lambda message: None)
    assert sorted(calls) == sorted(state["runs"]) == ["baseline-s0", "baseline-s1"]
    assert "| baseline | 2 |" in (tmp_path / "table" / "table.md").read_text()
    args = build_parser().parse_args(["ablate", "--iterations", "5", "--jobs", "2"])
    assert args.jobs == 2
