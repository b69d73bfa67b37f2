import torch

from minimrcnn.modeling.matcher import Matcher
from minimrcnn.modeling.sampling import subsample_labels


def rpn_matcher(low_quality=True):
    return Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=low_quality)


def test_intervals_are_half_open():
    iou = torch.tensor([[0.0, 0.29, 0.3, 0.69, 0.7, 1.0]])
    matched, label = rpn_matcher(low_quality=False)(iou)
    assert label.tolist() == [0, 0, -1, -1, 1, 1]
    assert matched.tolist() == [0] * 6


def test_best_ground_truth_is_matched():
    iou = torch.tensor([[0.8, 0.1, 0.4], [0.75, 0.9, 0.2]])
    matched, label = rpn_matcher(low_quality=False)(iou)
    assert matched.tolist() == [0, 1, 0]
    assert label.tolist() == [1, 1, -1]


def test_no_ground_truth_is_all_background():
    matched, label = rpn_matcher()(torch.zeros(0, 5))
    assert label.tolist() == [0] * 5 and matched.tolist() == [0] * 5


def test_low_quality_matches_promote_ties_only():
    # all IoUs low: gt 0's best is 0.2 (twice, a tie), gt 1's best is 0.25
    iou = torch.tensor([[0.2, 0.2, 0.1, 0.0], [0.0, 0.05, 0.25, 0.0]])
    matched, label = rpn_matcher()(iou)
    assert label.tolist() == [1, 1, 1, 0]
    assert matched.tolist() == [0, 0, 1, 0]
    _, label_strict = rpn_matcher(low_quality=False)(iou)
    assert label_strict.tolist() == [0, 0, 0, 0]


def test_ground_truth_overlapping_nothing_promotes_nobody():
    iou = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.5, 0.0]])
    _, label = rpn_matcher()(iou)
    assert label.tolist() == [0, 1, 0]


def test_subsample_respects_budget_and_fraction():
    labels = torch.tensor([1] * 30 + [0] * 100 + [-1] * 20)
    generator = torch.Generator().manual_seed(0)
    positive, negative = subsample_labels(labels, 64, 0.25, bg_label=0, generator=generator)
    assert len(positive) == 16 and len(negative) == 48
    assert torch.all(labels[positive] == 1) and torch.all(labels[negative] == 0)
    assert len(set(positive.tolist()) | set(negative.tolist())) == 64


def test_subsample_picks_at_random_among_the_eligible():
    """Not the first k: different seeds pick differently, and over many draws every eligible
    index is picked about as often as the others (ignored ones never)."""
    labels = torch.tensor([-1] * 10 + [1] * 20 + [0] * 50)
    picks = []
    for seed in range(400):
        positive, negative = subsample_labels(labels, 16, 0.25, bg_label=0,
                                              generator=torch.Generator().manual_seed(seed))
        picks.append((positive.tolist(), negative.tolist()))
    assert picks[0] != picks[1]
    positive_counts = torch.bincount(torch.tensor([i for p, _ in picks for i in p]), minlength=80)
    negative_counts = torch.bincount(torch.tensor([i for _, n in picks for i in n]), minlength=80)
    # 4 of 20 foreground and 12 of 50 background per draw: 80 and 96 picks each on average.
    assert positive_counts[:10].sum() == negative_counts[:10].sum() == 0
    assert positive_counts[10:30].min() > 40 and positive_counts[10:30].max() < 120
    assert negative_counts[30:].min() > 48 and negative_counts[30:].max() < 144


def test_subsample_fills_with_background_and_handles_empty():
    labels = torch.tensor([2, 3] + [0] * 10)  # foreground labels may be class ids
    positive, negative = subsample_labels(labels, 8, 0.5, bg_label=0)
    assert sorted(positive.tolist()) == [0, 1] and len(negative) == 6
    positive, negative = subsample_labels(torch.zeros(0, dtype=torch.int64), 8, 0.5, bg_label=0)
    assert len(positive) == 0 and len(negative) == 0
