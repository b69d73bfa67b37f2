"""Checkers for notebook 02: a residual block's output shape, the pyramid's map sizes."""

from __future__ import annotations

import functools

import torch

from minimrcnn.course.harness import Case, compare_exact, run_checks
from minimrcnn.modeling.backbone import BasicBlock, Bottleneck, ResNet
from minimrcnn.modeling.fpn import FPN


def residual_block_output_shape_reference(input_shape, planes, stride, bottleneck=False):
    """The shape a real BasicBlock / Bottleneck returns for a zero input of ``input_shape``."""
    block_type = Bottleneck if bottleneck else BasicBlock
    block = block_type(input_shape[1], planes, stride).eval()
    with torch.no_grad():
        return tuple(block(torch.zeros(input_shape)).shape)


def _block_cases() -> list[Case]:
    size = "a 3x3 conv with padding 1 and stride s gives floor((H + 2 - 3) / s) + 1 = ceil(H / s) rows."
    channels = "a BasicBlock returns `planes` channels; a Bottleneck expands them 4 times (planes * 4)."
    settings = [
        ((1, 64, 32, 32), 64, 1, False, size), ((2, 64, 32, 32), 128, 2, False, size),
        ((1, 16, 7, 9), 32, 2, False, size + " With an odd size 7, stride 2 gives 4, not 3."),
        ((1, 8, 1, 1), 8, 2, False, size), ((1, 64, 56, 56), 64, 1, True, channels),
        ((1, 256, 56, 56), 128, 2, True, channels), ((3, 32, 15, 10), 16, 2, True, channels + " " + size),
        ((1, 4, 5, 3), 4, 1, True, channels),
    ]
    return [Case(f"input shape {shape}, planes {planes}, stride {stride}, "
                 f"{'Bottleneck' if bottleneck else 'BasicBlock'}", (shape, planes, stride),
                 residual_block_output_shape_reference(shape, planes, stride, bottleneck),
                 kwargs={"bottleneck": bottleneck}, hint=hint)
            for shape, planes, stride, bottleneck, hint in settings]


def check_residual_block_output_shape(student_fn, **options):
    """student_fn(input_shape (N, C, H, W), planes, stride, bottleneck=False) -> output shape tuple."""
    return run_checks("residual_block_output_shape", student_fn, _block_cases(), compare_exact, **options)


@functools.lru_cache(maxsize=1)
def _tiny_backbone_and_fpn():
    with torch.random.fork_rng(devices=[]):  # leave the notebook's random state alone
        torch.manual_seed(0)
        backbone = ResNet(depth=18, width=8).eval()
        return backbone, FPN(backbone.out_channels, out_channels=8, levels=(2, 3, 4, 5, 6)).eval()


def pyramid_shapes_reference(height, width, levels=(2, 3, 4, 5, 6)):
    """{level: (h, w)} of the pyramid maps a real ResNet + FPN gives for an image of this size."""
    backbone, fpn = _tiny_backbone_and_fpn()
    with torch.no_grad():
        maps = fpn(backbone(torch.zeros(1, 3, height, width)))
    return {level: tuple(m.shape[-2:]) for level, m in zip(fpn.levels, maps) if level in levels}


def _pyramid_cases() -> list[Case]:
    ceil = ("every stride-2 step (stem conv, max-pool, first conv of a stage, P6's pool) turns n pixels into "
            "ceil(n / 2), so P_l has ceil(H / 2**l) rows, not H // 2**l.")
    settings = [((128, 128), (2, 3, 4, 5, 6), "P_l has stride 2**l"), ((800, 1216), (2, 3, 4, 5, 6), ceil),
                ((100, 75), (2, 3, 4, 5), ceil), ((33, 65), (2, 3, 4, 5, 6), ceil),
                ((7, 9), (2, 3, 4, 5, 6), ceil), ((1, 1), (2, 3), ceil), ((130, 31), (4, 5, 6), ceil)]
    return [Case(f"an image of height {h} and width {w}, levels {levels}", (h, w, levels),
                 pyramid_shapes_reference(h, w, levels), hint=hint) for (h, w), levels, hint in settings]


def _compare_shape_dict(expected, obtained):
    if not isinstance(obtained, dict):
        return f"expected a dict {{level: (height, width)}}, got {type(obtained).__name__}"
    if sorted(obtained) != sorted(expected):
        return f"wrong levels: expected keys {sorted(expected)}, got {sorted(obtained)}"
    for level in sorted(expected):
        problem = compare_exact(list(expected[level]), list(obtained[level]))
        if problem:
            return f"level {level}: {problem}"
    return None


def check_pyramid_shapes(student_fn, **options):
    """student_fn(height, width, levels) -> {level: (h, w)} of the FPN maps P_level."""
    return run_checks("pyramid_shapes", student_fn, _pyramid_cases(), _compare_shape_dict, **options)
