"""The token-level diagnostic (the paper's Sec. 2): its math on hand-computed tensors, then the
whole measurement on two pico Llama snapshots."""

from __future__ import annotations

import math

import pytest
import torch

from dtm.evaluation.diagnostics import (
    frequency_ranks,
    interval_summary,
    loss_drop_by_token,
    per_token_losses,
    token_counts,
    token_loss_diagnostic,
    top_dropping,
)


def test_per_token_losses_shift_by_one_and_skip_unlabelled_positions():
    # vocabulary of 2; position t's logits predict labels[t + 1]
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    ids, losses = per_token_losses(logits, labels)
    assert ids.tolist() == [0, 1]
    # position 0 (uniform) predicts 0: log 2; position 1 (p = [3/4, 1/4]) predicts 1: log 4
    assert losses.tolist() == pytest.approx([math.log(2.0), math.log(4.0)])


def test_loss_drop_by_token_sums_and_counts_per_id():
    ids = torch.tensor([2, 0, 2, 1])
    before = torch.tensor([3.0, 1.0, 2.0, 0.5])
    after = torch.tensor([1.0, 1.5, 1.0, 0.5])
    drop, count = loss_drop_by_token(ids, before, after, vocab_size=4)
    assert drop.tolist() == pytest.approx([-0.5, 0.0, 3.0, 0.0])
    assert count.tolist() == [1, 1, 2, 0]
    with pytest.raises(ValueError, match="do not align"):
        loss_drop_by_token(ids, before[:3], after, vocab_size=4)


def test_frequency_ranks_share_the_best_rank_on_ties():
    assert frequency_ranks(torch.tensor([5, 0, 9, 5, 1])).tolist() == [2, 5, 1, 2, 4]


def test_token_counts_count_response_targets_only():
    examples = [{"labels": [-100, -100, 3, 3, 1]}, {"labels": [2, 1, -100]}]  # a label at position 0 is never predicted
    assert token_counts(examples, vocab_size=5).tolist() == [0, 2, 0, 2, 0]


def test_top_dropping_ranks_by_mean_drop_among_tokens_seen_often_enough():
    drop = torch.tensor([6.0, 2.0, 3.0, 0.0, 9.0], dtype=torch.float64)
    count = torch.tensor([3, 1, 1, 0, 9])
    # means: 2, 2, 3, -, 1
    assert top_dropping(drop, count, n=3) == [2, 0, 1]  # ties on the mean: lower id first
    assert top_dropping(drop, count, n=3, min_count=2) == [0, 4]  # a rare token's mean is noise: left out


def test_interval_summary_reports_top_tokens_with_their_frequency_rank():
    drop = torch.tensor([6.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    count = torch.tensor([3, 1, 1, 0])
    freq = torch.tensor([100, 1, 7, 0])
    out = interval_summary(drop, count, frequency_ranks(freq), freq, top=2, min_count=1, decode=lambda i: f"t{i}")
    assert [t["token"] for t in out["top"]] == ["t2", "t0"]
    assert out["top"][0] == {"id": 2, "token": "t2", "mean_drop": 3.0, "count": 1, "frequency": 7, "rank": 2}
    assert out["median_rank_top"] == 1.5 and out["median_rank_all"] == 2
    assert out["mean_drop"] == pytest.approx(11 / 5)
    assert [row[0] for row in out["tokens"]] == [0, 1, 2]


def test_token_loss_diagnostic_on_two_snapshots(tmp_path, tokenizer):
    from conftest import make_llama

    from dtm.data.template import conversation

    dirs = []
    for seed in (0, 1):
        d = tmp_path / f"m{seed}"
        make_llama(seed=seed).save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs.append(d)
    train = [conversation("the cat", "sat on the mat", id=str(i)) for i in range(4)] + [conversation("What is 1 + 2?", "3", id="q")]
    out = token_loss_diagnostic([(0.5, dirs[1]), (0.0, dirs[0])], train[:3], train, template="alpaca", top=3, min_count=1, device="cpu")
    assert out["fractions"] == [0.0, 0.5]
    (interval,) = out["intervals"]
    assert (interval["from"], interval["to"]) == (0.0, 0.5)
    assert out["sample_examples"] == 3 and out["sample_tokens"] > 0 and out["train_tokens"] > out["sample_tokens"]
    # the mean drop over all tokens is the drop of the mean loss
    assert interval["mean_drop"] == pytest.approx(out["mean_loss"][0] - out["mean_loss"][1], abs=1e-5)
    drops = [t["mean_drop"] for t in interval["top"]]
    assert drops == sorted(drops, reverse=True) and len(drops) == 3
    assert all(t["frequency"] > 0 and t["rank"] >= 1 for t in interval["top"])
