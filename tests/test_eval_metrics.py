"""The eval stage's numbers against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from align.models.metrics import pair_accuracy, perplexity, sequence_kl, token_nll, win_rate


def test_token_nll_scores_only_labelled_next_tokens():
    # vocab 2; position t predicts label t+1. logits row 0 -> p = softmax([0, ln 3]) = [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[-100, 1, 0]])  # scored: label 1 at t=1 (from row 0), label 0 at t=2 (from row 1)
    nll, n = token_nll(logits, labels)
    assert n == 2
    assert nll == pytest.approx(-math.log(3 / 4) - math.log(1 / 2), abs=1e-6)
    assert perplexity(nll, n) == pytest.approx(math.exp((-math.log(0.75) - math.log(0.5)) / 2), abs=1e-6)
    assert token_nll(logits, torch.full((1, 3), -100)) == (0.0, 0)
    assert math.isnan(perplexity(0.0, 0))


def test_win_rate_counts_ties_half():
    assert win_rate(torch.tensor([2.0, 1.0, 0.0, 5.0]), torch.tensor([1.0, 1.0, 3.0, 4.0])) == pytest.approx(
        (1 + 0.5 + 0 + 1) / 4)
    with pytest.raises(ValueError, match="two equal, non-empty score vectors"):
        win_rate(torch.tensor([1.0]), torch.tensor([1.0, 2.0]))


def test_sequence_kl_sums_log_ratios_over_response_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-1.0, -0.5, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(sequence_kl(logp, ref, mask), torch.tensor([0.5 - 1.0, 0.5 + 0.0 - 8.0]))


def test_pair_accuracy_counts_ties_as_wrong():
    assert pair_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 1.0, 1.0])) == 0.5
    assert math.isnan(pair_accuracy(torch.tensor([]), torch.tensor([])))
