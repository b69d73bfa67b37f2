"""Checkers for notebooks 04 and 05: balanced sampling, FPN level assignment,
the per-class mask loss and mask pasting."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from minimrcnn.course.harness import Case, compare_arrays, compare_scalar, run_checks, show
from minimrcnn.modeling.mask_head import mask_loss
from minimrcnn.modeling.masks import paste_masks_in_image
from minimrcnn.modeling.poolers import assign_boxes_to_levels
from minimrcnn.modeling.sampling import subsample_labels

# ------------------------------------------------------------------ 04: balanced sampling


def _sampling_cases() -> list[Case]:
    generator = torch.Generator().manual_seed(7)
    settings = [
        ("many of both", torch.tensor([1] * 40 + [0] * 100 + [-1] * 10), 64, 0.25,
         "take min(int(num_samples * positive_fraction), available foreground) foreground"),
        ("few foreground: background fills the rest", torch.tensor([2, 0, 0, 3] + [0] * 60 + [-1] * 5), 32, 0.5,
         "background fills what foreground leaves: num_negative = min(num_samples - num_positive, available)"),
        ("few of both", torch.tensor([1, 0, -1, 0, 5, -1]), 512, 0.25, "never take more than there is"),
        ("only ignored labels", torch.tensor([-1, -1, -1]), 8, 0.5, "-1 is neither foreground nor background"),
        ("no labels at all", torch.zeros(0, dtype=torch.int64), 8, 0.5, "return two empty int64 tensors"),
        ("several foreground classes", torch.randint(-1, 4, (300,), generator=generator), 128, 0.25,
         "every label other than -1 and bg_label (0) is foreground"),
        ("positive_fraction 1.0", torch.randint(-1, 3, (50,), generator=generator), 16, 1.0,
         "with positive_fraction 1 background only fills in for missing foreground"),
        ("int(num_samples * fraction) rounds down", torch.tensor([1] * 20 + [0] * 20), 10, 0.25,
         "int(10 * 0.25) = 2 foreground, then 8 background"),
    ]
    cases = []
    for text, labels, num_samples, fraction, hint in settings:
        pos, neg = subsample_labels(labels, num_samples, fraction, bg_label=0, generator=generator)
        expected = {"labels": labels, "num_positive": len(pos), "num_negative": len(neg)}
        cases.append(Case(f"{text}: {len(labels)} labels ({int(((labels != -1) & (labels != 0)).sum())} foreground, "
                          f"{int((labels == 0).sum())} background), num_samples {num_samples}, "
                          f"positive_fraction {fraction}", (labels, num_samples, fraction), expected, hint=hint))
    return cases


def _compare_sampling(expected, obtained):
    if not isinstance(obtained, (tuple, list)) or len(obtained) != 2:
        return "expected a pair (positive_indices, negative_indices)"
    labels = expected["labels"]
    for name, indices, count, wanted in (("positive", obtained[0], expected["num_positive"], "foreground"),
                                         ("negative", obtained[1], expected["num_negative"], "background")):
        if not isinstance(indices, torch.Tensor):
            return f"{name}_indices: expected a torch.Tensor, got {type(indices).__name__}"
        if indices.dtype not in (torch.int64, torch.int32) or indices.dim() != 1:
            return f"{name}_indices: expected a 1-D integer tensor, got shape {list(indices.shape)} {indices.dtype}"
        if len(indices) != count:
            return f"{name}_indices: expected {count} indices, got {len(indices)}"
        if len(torch.unique(indices)) != len(indices):
            return f"{name}_indices: an index appears twice (sample without replacement)"
        if len(indices) and (indices.min() < 0 or indices.max() >= len(labels)):
            return f"{name}_indices: an index is outside 0..{len(labels) - 1}"
        chosen = labels[indices.long()]
        is_foreground = (chosen != -1) & (chosen != 0)
        ok = is_foreground if wanted == "foreground" else chosen == 0
        if not bool(ok.all()):
            return f"{name}_indices: picked labels {show(chosen, 120)}; they must all be {wanted}"
    return None


def check_subsample_labels(student_fn, **options):
    """student_fn(labels [P], num_samples, positive_fraction) -> (positive_indices, negative_indices).

    labels: -1 ignore, 0 background, > 0 foreground. Random choice is fine: the checker
    tests the counts and that every index has the right kind of label."""
    return run_checks("subsample_labels", student_fn, _sampling_cases(), _compare_sampling, **options)


# ------------------------------------------------------------------ 04: FPN level


def _level_cases() -> list[Case]:
    floor = "k = floor(4 + log2(sqrt(w h) / 224)): floor, not round (a 150-pixel box is on level 3)."
    clamp = "clamp to [2, 5]: tiny boxes go to P2, huge ones to P5."
    t = lambda sides: torch.tensor([[0.0, 0.0, w, h] for w, h in sides])  # noqa: E731
    generator = torch.Generator().manual_seed(8)
    random_boxes = torch.rand(40, 2, generator=generator) * 50
    random_boxes = torch.cat([random_boxes, random_boxes + torch.rand(40, 2, generator=generator) ** 2 * 600], 1)
    settings = [
        ("squares of side 150, 300, 100, 60", t([(150, 150), (300, 300), (100, 100), (60, 60)]), floor),
        ("squares exactly on the boundaries: 56, 112, 224, 448", t([(56, 56), (112, 112), (224, 224), (448, 448)]),
         "sqrt(w h) = 112 is exactly level 3 (floor(3.0) = 3); beware of adding the small eps after the floor"),
        ("non-square boxes: 56 x 224 and 448 x 112", t([(56, 224), (448, 112)]), "the size is sqrt(w * h)"),
        ("tiny and huge boxes", t([(2, 3), (10, 10), (1000, 1000), (2000, 900)]), clamp),
        ("a zero-area box", t([(0, 10), (0, 0)]), clamp + " log2(0) is -inf: a zero-area box goes to P2."),
        ("boxes not at the origin", torch.tensor([[100.0, 50.0, 300.0, 250.0], [-20.0, -20.0, 80.0, 30.0]]),
         "width = x2 - x1, height = y2 - y1"),
        ("no boxes", torch.zeros(0, 4), "an empty [0] int64 result"),
        ("40 random boxes", random_boxes, floor),
    ]
    return [Case(text, (boxes,), assign_boxes_to_levels(boxes, 2, 5), hint=hint) for text, boxes, hint in settings]


def check_fpn_level(student_fn, **options):
    """student_fn(boxes [R, 4] xyxy) -> level [R] int64 in 2..5 (FPN Eqn. 1, k0 = 4, canonical 224)."""
    return run_checks("fpn_level", student_fn, _level_cases(), compare_arrays(dtype_kind="i", tensor=True), **options)


# ------------------------------------------------------------------ 05: mask loss


def _mask_loss_inputs(seed=9):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for rois, classes, size in ((1, 3, 4), (5, 3, 6), (8, 1, 5), (12, 6, 14)):
        logits = torch.randn(rois, classes, size, size, generator=generator, dtype=torch.float64) * 3
        gt_classes = torch.randint(1, classes + 1, (rois,), generator=generator)
        targets = (torch.rand(rois, size, size, generator=generator) < 0.4).to(torch.float64)
        out.append((f"{rois} RoIs, {classes} classes, {size}x{size} masks, classes {gt_classes.tolist()}",
                    logits, gt_classes, targets))
    logits = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    logits[:, 0] = 5.0  # confident on class 1's channel, which is not the gt class
    out.append(("RoIs of class 2 whose class-1 channel is confident", logits, torch.tensor([2, 2]),
                torch.ones(2, 3, 3, dtype=torch.float64)))
    return out


def _mask_loss_cases(loss_type: str, hint: str) -> list[Case]:
    cases = [Case(text, (logits, classes, targets), mask_loss(logits, classes, targets, loss_type), hint=hint)
             for text, logits, classes, targets in _mask_loss_inputs()]
    empty = torch.zeros(0, 3, 4, 4, dtype=torch.float64)
    cases.append(Case("no foreground RoIs at all", (empty, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4, 4)),
                      0.0, hint="with no RoIs the loss is 0 (the mean of nothing would be NaN)"))
    return cases


def check_mask_loss(student_fn, **options):
    """student_fn(mask_logits [R, K, M, M], gt_classes [R] in 1..K, mask_targets [R, M, M]) -> scalar loss:
    binary cross-entropy on each RoI's ground-truth class channel (channel gt_class - 1), mean over R*M*M."""
    hint = ("use only channel gt_classes[r] - 1 of RoI r (e.g. logits[torch.arange(R), gt_classes - 1]); "
            "the other K - 1 channels must not enter the loss. F.binary_cross_entropy_with_logits takes the mean.")
    return run_checks("mask_loss", student_fn, _mask_loss_cases("sigmoid", hint), compare_scalar(atol=1e-6), **options)


# ------------------------------------------------------------------ 05: mask pasting


def _pasted_probabilities_float64(mask_probs, box, image_size):
    """The bilinear value at every pixel centre, in float64 (to find pixels too close to call)."""
    height, width = image_size
    x1, y1, x2, y2 = [float(v) for v in box]
    xs = (torch.arange(width, dtype=torch.float64) + 0.5 - x1) / max(x2 - x1, 1e-12) * 2 - 1
    ys = (torch.arange(height, dtype=torch.float64) + 0.5 - y1) / max(y2 - y1, 1e-12) * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=2)[None]  # (1, H, W, 2) as (x, y)
    return F.grid_sample(mask_probs.to(torch.float64)[None, None], grid, mode="bilinear",
                         padding_mode="zeros", align_corners=False)[0, 0]


def _paste_cases() -> list[Case]:
    centre = ("pixel (i, j) has its centre at (j + 0.5, i + 0.5); in mask cells that is "
              "u = (j + 0.5 - x1) / (x2 - x1) * M - 0.5; read the mask bilinearly there, 0 outside, then >= 0.5.")
    generator = torch.Generator().manual_seed(10)
    ones = torch.ones(4, 4)
    ramp = torch.linspace(0, 1, 5)[None].repeat(5, 1)
    settings = [
        ("an all-ones 4x4 mask in an integer box", ones, [2.0, 3.0, 10.0, 9.0], (12, 14), centre),
        ("an all-ones 4x4 mask in a box with half-pixel corners", ones, [2.5, 3.5, 9.5, 8.5], (12, 14),
         centre + " A box edge at x = 2.5 runs through the middle of pixel 2."),
        ("a left-to-right ramp mask", ramp, [1.25, 0.75, 11.75, 8.25], (10, 13), centre),
        ("a box partly outside the image", ones, [-4.25, -2.75, 5.25, 6.75], (8, 8),
         "pixels outside the image are simply not there; the rest is pasted as usual"),
        ("a box entirely outside the image", ones, [20.25, 20.25, 30.75, 30.75], (8, 8), "an all-False mask"),
        ("a box smaller than one pixel", ones, [3.25, 3.25, 3.75, 3.75], (6, 6), centre),
    ]
    for size in (7, 14, 28):
        probs = torch.rand(size, size, generator=generator)
        x1, y1 = (torch.rand(2, generator=generator) * 20).tolist()
        w, h = (torch.rand(2, generator=generator) * 30 + 3).tolist()
        settings.append((f"random {size}x{size} probabilities", probs, [x1, y1, x1 + w, y1 + h], (40, 48), centre))
    cases = []
    for text, probs, box, size, hint in settings:
        box_tensor = torch.tensor(box, dtype=torch.float32)
        expected = paste_masks_in_image(probs[None], box_tensor[None], size)[0]
        values = _pasted_probabilities_float64(probs, box, size)
        cases.append(Case(f"{text}: {probs.shape[0]}x{probs.shape[1]} mask, box {[round(v, 3) for v in box]}, "
                          f"image {size[0]}x{size[1]}", (probs, box_tensor, size),
                          {"mask": expected, "too_close": (values - 0.5).abs() < 1e-4}, hint=hint))
    return cases


def _compare_paste(expected, obtained):
    if not isinstance(obtained, torch.Tensor):
        return f"expected a torch.Tensor, got {type(obtained).__name__}"
    mask = expected["mask"]
    if tuple(obtained.shape) != tuple(mask.shape):
        return f"wrong shape: expected {list(mask.shape)} (H, W), got {list(obtained.shape)}"
    if obtained.dtype != torch.bool:
        return f"wrong dtype: expected torch.bool (threshold the probabilities), got {obtained.dtype}"
    wrong = (obtained != mask) & ~expected["too_close"]
    if wrong.any():
        rows, cols = torch.nonzero(wrong, as_tuple=True)
        return (f"{int(wrong.sum())} pixels differ, the first at row {int(rows[0])}, column {int(cols[0])} "
                f"(expected {bool(mask[rows[0], cols[0]])})\n  expected:\n{mask.int().numpy()}\n"
                f"  obtained:\n{obtained.int().numpy()}")
    return None


def check_paste_mask(student_fn, **options):
    """student_fn(mask_probs [M, M], box [4] xyxy, image_size (H, W)) -> [H, W] bool mask (threshold 0.5)."""
    options.setdefault("time_limit", 10.0)
    return run_checks("paste_mask", student_fn, _paste_cases(), _compare_paste, **options)


__all__ = ["check_fpn_level", "check_mask_loss", "check_paste_mask", "check_subsample_labels"]
