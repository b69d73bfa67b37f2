"""Panoptic fusion: the score order, the score, overlap and stuff-area rules on hand-built
cases, the COCO segments_info, and random cases against a plain NumPy re-statement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minimrcnn.modeling.panoptic import fuse, segment_bbox

H, W = 8, 10


def box_mask(x1, y1, x2, y2):
    """[H, W] bool, True on columns x1..x2-1 and rows y1..y2-1."""
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[y1:y2, x1:x2] = True
    return mask


def instances(*entries):
    """entries: (mask, score, label) -> masks [D, H, W], scores [D], labels [D]."""
    masks = torch.stack([m for m, _, _ in entries]) if entries else torch.zeros(0, H, W, dtype=torch.bool)
    scores = torch.tensor([s for _, s, _ in entries], dtype=torch.float32)
    labels = torch.tensor([lab for _, _, lab in entries], dtype=torch.int64)
    return masks, scores, labels


ALL_THING = torch.zeros(H, W, dtype=torch.int64)  # semantic: every pixel "thing" -> no stuff


def test_higher_score_takes_the_shared_pixels_whatever_the_input_order():
    a, b = box_mask(0, 0, 4, 4), box_mask(2, 0, 6, 4)  # 16 pixels each, 8 shared
    for order in ((0, 1), (1, 0)):
        entries = [(a, 0.9, 1), (b, 0.8, 2)]
        masks, scores, labels = instances(*(entries[i] for i in order))
        panoptic, info = fuse(masks, scores, labels, ALL_THING, stuff_area_thresh=1)
        assert [s["category_id"] for s in info] == [1, 2]  # placed best score first
        assert [s["score"] for s in info] == pytest.approx([0.9, 0.8])
        assert torch.equal(panoptic == 1, a)
        assert torch.equal(panoptic == 2, b & ~a)  # only b's still-free pixels
        assert [s["area"] for s in info] == [16, 8]
        assert info[1]["bbox"] == [4, 0, 2, 4]
        assert info[1]["instance_id"] == order.index(1)


def test_score_threshold_stops_placing():
    masks, scores, labels = instances((box_mask(0, 0, 2, 2), 0.49, 1), (box_mask(4, 4, 6, 6), 0.5, 2))
    panoptic, info = fuse(masks, scores, labels, ALL_THING, score_thresh=0.5, stuff_area_thresh=1)
    assert [s["category_id"] for s in info] == [2]  # 0.5 is kept, 0.49 is not
    assert not (panoptic[0:2, 0:2]).any()


def test_overlap_rule_drops_mostly_covered_instances_strictly_above_the_fraction():
    first = box_mask(0, 0, 4, 2)  # 8 pixels
    half = box_mask(2, 0, 6, 2)  # 8 pixels, 4 (= 0.5) already taken: kept
    more = box_mask(1, 0, 5, 2)  # 8 pixels, by now 8 taken: dropped
    masks, scores, labels = instances((first, 0.9, 1), (half, 0.8, 2), (more, 0.7, 3))
    panoptic, info = fuse(masks, scores, labels, ALL_THING, overlap_thresh=0.5, stuff_area_thresh=1)
    assert [s["category_id"] for s in info] == [1, 2]
    assert torch.equal(panoptic == 2, half & ~first)
    # A stricter fraction drops the half-covered one too.
    _, info = fuse(masks, scores, labels, ALL_THING, overlap_thresh=0.4, stuff_area_thresh=1)
    assert [s["category_id"] for s in info] == [1]


def test_empty_masks_are_skipped():
    masks, scores, labels = instances((torch.zeros(H, W, dtype=torch.bool), 0.9, 1), (box_mask(0, 0, 1, 1), 0.8, 2))
    panoptic, info = fuse(masks, scores, labels, ALL_THING, stuff_area_thresh=1)
    assert [(s["id"], s["category_id"]) for s in info] == [(1, 2)]
    assert int(panoptic.sum()) == 1


def test_stuff_fills_free_pixels_above_the_area_threshold_and_skips_the_thing_class():
    semantic = torch.zeros(H, W, dtype=torch.int64)
    semantic[:4] = 1  # 40 pixels of stuff class 1 ("sky")
    semantic[4:, :3] = 2  # 12 pixels of stuff class 2
    semantic[4:, 3:] = 0  # the rest says "thing" but no instance is there: void
    thing = box_mask(0, 0, 5, 2)  # covers 10 of the sky pixels
    masks, scores, labels = instances((thing, 0.9, 4))
    panoptic, info = fuse(masks, scores, labels, semantic, stuff_area_thresh=13,
                          stuff_category_ids=[None, 5, 6])
    assert [(s["category_id"], s["isthing"], s["area"]) for s in info] == [(4, 1, 10), (5, 0, 30)]
    assert info[1]["bbox"] == [0, 0, 10, 4] and "score" not in info[1]
    assert torch.equal(panoptic == 2, (semantic == 1) & ~thing)
    assert (panoptic[4:] == 0).all()  # stuff 2 (12 < 13 pixels) and the "thing" pixels stay void
    # The threshold counts free pixels and keeps a region of exactly that size.
    _, info = fuse(masks, scores, labels, semantic, stuff_area_thresh=12, stuff_category_ids=[None, 5, 6])
    assert [s["category_id"] for s in info] == [4, 5, 6]
    _, info = fuse(masks, scores, labels, semantic, stuff_area_thresh=31, stuff_category_ids=[None, 5, 6])
    assert [s["category_id"] for s in info] == [4]  # 30 free sky pixels < 31


def test_segments_info_is_coco_panoptic_and_matches_the_map():
    semantic = torch.ones(H, W, dtype=torch.int64)
    masks, scores, labels = instances((box_mask(1, 1, 3, 4), 0.7, 2), (box_mask(5, 2, 9, 7), 0.95, 1))
    panoptic, info = fuse(masks, scores, labels, semantic, stuff_area_thresh=1,
                          thing_category_ids=[0, 11, 12], stuff_category_ids=[None, 21])
    assert [s["id"] for s in info] == [1, 2, 3]
    assert [s["category_id"] for s in info] == [11, 12, 21]
    for segment in info:
        inside = panoptic == segment["id"]
        assert segment["area"] == int(inside.sum())
        assert segment["bbox"] == segment_bbox(inside)
        assert segment["iscrowd"] == 0 and segment["isthing"] == (segment["category_id"] < 20)
    assert info[0]["bbox"] == [5, 2, 4, 5]
    assert set(panoptic.unique().tolist()) == {1, 2, 3}


def test_no_instances_and_bad_shapes():
    masks, scores, labels = instances()
    panoptic, info = fuse(masks, scores, labels, torch.full((H, W), 1), stuff_area_thresh=1)
    assert info == [{"id": 1, "category_id": 1, "isthing": 0, "area": H * W, "bbox": [0, 0, W, H], "iscrowd": 0}]
    with pytest.raises(ValueError, match="semantic"):
        fuse(masks, scores, labels, torch.zeros(H, W + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="scores"):
        fuse(torch.zeros(2, H, W, dtype=torch.bool), scores, labels, ALL_THING)


def reference_fuse(masks, scores, labels, semantic, score_thresh, overlap_thresh, stuff_area_thresh):
    """The rule restated over NumPy arrays: (panoptic [H, W], [(category, isthing, area)])."""
    panoptic = np.zeros(semantic.shape, dtype=np.int64)
    segments = []
    for index in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        if scores[index] < score_thresh:
            break
        area = masks[index].sum()
        if area == 0 or (masks[index] & (panoptic > 0)).sum() / area > overlap_thresh:
            continue
        free = masks[index] & (panoptic == 0)
        segments.append((int(labels[index]), 1, int(free.sum())))
        panoptic[free] = len(segments)
    for semantic_class in sorted(set(semantic.flatten().tolist()) - {0}):
        free = (semantic == semantic_class) & (panoptic == 0)
        if free.sum() >= stuff_area_thresh:
            segments.append((semantic_class, 0, int(free.sum())))
            panoptic[free] = len(segments)
    return panoptic, segments


@pytest.mark.parametrize("seed", range(5))
def test_random_cases_match_the_numpy_restatement(seed):
    rng = np.random.default_rng(seed)
    num = 12
    masks = np.zeros((num, 32, 32), dtype=bool)
    for mask in masks:
        x, y = rng.integers(0, 28, 2)
        w, h = rng.integers(0, 12, 2)
        mask[y:y + h, x:x + w] = True
    scores = rng.choice([0.3, 0.55, 0.6, 0.8, 0.9], num)  # ties on purpose
    labels = rng.integers(1, 5, num)
    semantic = rng.integers(0, 4, (32, 32))
    semantic[:16] = 1  # one big stuff region; classes 2, 3 hover around the area threshold (90)
    expected_map, expected = reference_fuse(masks, scores, labels, semantic, 0.5, 0.5, 90)
    panoptic, info = fuse(torch.from_numpy(masks), torch.from_numpy(scores), torch.from_numpy(labels),
                          torch.from_numpy(semantic), score_thresh=0.5, overlap_thresh=0.5, stuff_area_thresh=90)
    assert [(s["category_id"], s["isthing"], s["area"]) for s in info] == expected
    np.testing.assert_array_equal(panoptic.numpy(), expected_map)
