"""Checkers for notebook 08 (the paper's ablations): RoIWarp's quantization and the
softmax (multinomial) mask loss that Table 2b compares with the per-class sigmoid."""

from __future__ import annotations

import torch

from minimrcnn.course.harness import Case, compare_arrays, compare_scalar, run_checks
from minimrcnn.course.head_checks import _mask_loss_inputs
from minimrcnn.modeling.mask_head import mask_loss
from minimrcnn.ops.roi_align import roi_align
from minimrcnn.ops.roi_pool import round_half_away


try:
    from minimrcnn.ops.roi_warp import roi_warp as _package_roi_warp
except ImportError:  # the RoIWarp op is not in this tree: the rule itself
    _package_roi_warp = None


def roi_warp_reference(features, rois, output_size, spatial_scale):
    """RoIWarp: corners quantized as RoIPool does (C rounding), then RoIAlign's bilinear average."""
    if _package_roi_warp is not None:
        return _package_roi_warp(features, rois, output_size, spatial_scale, 2, aligned=True, quantize=True,
                                 reduction="avg", backend="reference")
    quantized = rois.clone()
    quantized[:, 1:] = torch.tensor([[round_half_away(float(v) * spatial_scale) for v in roi[1:]] for roi in rois],
                                    dtype=rois.dtype).reshape(-1, 4)
    return roi_align(features, quantized, output_size, spatial_scale=1.0, sampling_ratio=2, aligned=True,
                     backend="reference")


def _warp_cases() -> list[Case]:
    rounding = ("quantize like RoIPool: round(x * spatial_scale) with C rounding (halves away from zero, "
                "math.floor(v + 0.5) for v >= 0), then call roi_align with spatial_scale=1.0 on the rounded corners.")
    generator = torch.Generator().manual_seed(15)
    features = torch.randn(2, 3, 12, 14, generator=generator, dtype=torch.float64)
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    settings = [
        ("one RoI at stride 1 with fractional corners", t([[0, 2.3, 1.6, 9.8, 7.2]]), 1.0, rounding),
        ("corners exactly half-way (2.5, 4.5)", t([[0, 2.5, 4.5, 8.5, 10.5]]), 1.0, rounding),
        ("stride 16 (spatial_scale 1/16)", t([[1, 40.0, 24.0, 150.0, 120.0], [0, 8.0, 8.0, 200.0, 180.0]]),
         1.0 / 16, "multiply by spatial_scale before rounding: 40 / 16 = 2.5 rounds to 3"),
        ("a RoI partly outside the map", t([[0, -10.0, -3.3, 6.6, 4.4]]), 1.0,
         "negative values round away from zero too: -3.3 -> -3, -2.5 -> -3"),
        ("no RoIs", torch.zeros(0, 5, dtype=torch.float64), 1.0, "an empty [0, C, ph, pw] result"),
    ]
    random_rois = torch.cat([torch.randint(0, 2, (6, 1), generator=generator).double(),
                             torch.rand(6, 2, generator=generator, dtype=torch.float64) * 100,
                             100 + torch.rand(6, 2, generator=generator, dtype=torch.float64) * 100], 1)
    settings.append(("6 random RoIs at stride 16", random_rois, 1.0 / 16, rounding))
    return [Case(f"{text}: rois {r.tolist()}, 2x2 output, spatial_scale {s:g}, sampling_ratio 2, aligned",
                 (features, r, (2, 2), s), roi_warp_reference(features, r, (2, 2), s), hint=hint)
            for text, r, s, hint in settings]


def check_roi_warp(student_fn, **options):
    """student_fn(features [N, C, H, W], rois [K, 5], output_size, spatial_scale) -> [K, C, ph, pw]:
    RoIPool's corner rounding, then roi_align(..., spatial_scale=1, sampling_ratio=2, aligned=True)."""
    # The student calls roi_align's default backend: compile it now, not inside their time limit.
    # (float64, like the cases: Numba compiles one kernel per dtype)
    tiny = torch.zeros(1, 1, 2, 2, dtype=torch.float64), torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    roi_align(*tiny, (1, 1))
    if _package_roi_warp is not None:
        _package_roi_warp(*tiny, (1, 1))
    options.setdefault("time_limit", 20.0)
    return run_checks("roi_warp", student_fn, _warp_cases(),
                      compare_arrays(atol=1e-9, dtype_kind="f", tensor=True), **options)


def check_softmax_mask_loss(student_fn, **options):
    """student_fn(mask_logits [R, K, M, M], gt_classes [R], mask_targets [R, M, M]) -> scalar loss:
    per-pixel cross-entropy over [background, class 1..K], background logit fixed at 0."""
    hint = ("prepend a channel of zeros as the background logit ([R, K+1, M, M]); the pixel target is the "
            "RoI's class inside the mask and 0 outside; F.cross_entropy averages over the R*M*M pixels.")
    cases = [Case(text, (logits, classes, targets), mask_loss(logits, classes, targets, "softmax"), hint=hint)
             for text, logits, classes, targets in _mask_loss_inputs(seed=16)]
    cases.append(Case("no foreground RoIs at all",
                      (torch.zeros(0, 3, 4, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.int64),
                       torch.zeros(0, 4, 4)), 0.0, hint="with no RoIs the loss is 0"))
    return run_checks("softmax_mask_loss", student_fn, cases, compare_scalar(atol=1e-6), **options)
