"""SQuAD EM/F1 against hand-computed cases and the official scripts' rules; the span-candidate collector."""

import pytest
import torch
from conftest import on_two_ranks

from lightning_ft.metrics.squad import SpanCandidates, exact_match, normalize_answer, squad_scores, token_f1


@pytest.mark.parametrize("text,expected", [
    ("The Denver Broncos", "denver broncos"),             # lower case, article dropped
    ("  an   apple,  a pear!", "apple pear"),             # articles, punctuation, whitespace
    ("self-driving car's", "selfdriving cars"),           # punctuation is deleted, not replaced by a space
    ("Theatre thesis", "theatre thesis"),                 # only whole-word articles go
    ("A", ""),
])
def test_normalisation_follows_the_official_rules(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0
    # prediction 3 tokens, gold 2, overlap 2: P = 2/3, R = 1, F1 = 0.8
    assert token_f1("Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    # a repeated token overlaps as often as both sides have it: overlap 1, P = 1/2, R = 1
    assert token_f1("broncos broncos", "broncos") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("Paris", "London") == 0.0


def test_empty_answers_follow_each_versions_script():
    assert token_f1("", "") == 0.0                    # v1.1: no common token, so 0
    assert token_f1("", "", version_2=True) == 1.0    # v2.0: both empty is a right "no answer"
    assert token_f1("the", "", version_2=True) == 1.0  # "the" normalises to nothing
    assert token_f1("Paris", "", version_2=True) == 0.0


def test_corpus_scores_by_hand():
    references = {"q1": ["Denver Broncos", "Broncos"], "q2": ["Denver Broncos"], "q3": ["Paris"], "q4": ["x y"]}
    predictions = {"q1": "broncos", "q2": "Denver Broncos team", "q3": "London"}  # q4 unanswered
    scores = squad_scores(predictions, references)
    # EM: 1, 0, 0, 0 -> 25; F1: 1, 0.8, 0, 0 -> 45 (a question with no prediction scores 0)
    assert scores["exact_match"] == pytest.approx(25.0)
    assert scores["f1"] == pytest.approx(45.0)
    assert scores["total"] == 4


def test_version_2_splits_answerable_and_unanswerable():
    references = {"a": ["Paris"], "b": [], "c": [], "d": ["Rome"]}
    predictions = {"a": "Paris", "b": "", "c": "Rome", "d": ""}
    scores = squad_scores(predictions, references, version_2=True)
    assert scores["HasAns_exact"] == pytest.approx(50.0) and scores["HasAns_total"] == 2
    assert scores["NoAns_exact"] == pytest.approx(50.0) and scores["NoAns_total"] == 2
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(50.0)


def test_span_candidates_mask_outside_the_context_and_count_each_window_once():
    collector = SpanCandidates(top_k=2)
    start = torch.tensor([[9.0, 8.0, 1.0, 3.0, 2.0, 7.0]])  # 0 is CLS, 1 a question token, 5 padding
    end = torch.tensor([[5.0, 9.0, 1.0, 2.0, 4.0, 9.0]])
    args = (torch.tensor([3]), torch.tensor([1]), start, end, torch.tensor([2]), torch.tensor([4]), torch.tensor([0]))
    collector.update(*args)
    collector.update(*args)  # the same window again, as a DistributedSampler repeats rows to even out the ranks
    result = collector.compute()
    assert result["example_index"].reshape(-1).tolist() == [3]
    assert result["start_index"].reshape(-1).tolist() == [3, 4]  # context only: 9 (CLS) and 8, 7 are outside
    assert result["end_index"].reshape(-1).tolist() == [4, 3]
    assert result["start_logit"].reshape(-1).tolist() == [3.0, 2.0]
    assert result["null_score"].item() == 14.0  # CLS start + CLS end


def test_span_candidates_pad_short_batches_to_top_k():
    collector = SpanCandidates(top_k=4)
    logits = torch.zeros(2, 3)
    collector.update(torch.tensor([0, 1]), torch.tensor([0, 0]), logits, logits, torch.tensor([1, 1]),
                     torch.tensor([2, 2]), torch.tensor([0, 0]))
    collector.update(torch.tensor([2]), torch.tensor([0]), torch.zeros(1, 6), torch.zeros(1, 6), torch.tensor([1]),
                     torch.tensor([5]), torch.tensor([0]))
    result = collector.compute()
    assert result["start_index"].shape == (3, 4)
    assert torch.isinf(result["start_logit"][0, 2:]).all()  # the padding is never a candidate


def _windows(seed: int = 0) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.tensor([i // 2]), torch.tensor([i % 2]), torch.randn(1, 12, generator=generator),
             torch.randn(1, 12, generator=generator), torch.tensor([3]), torch.tensor([10]), torch.tensor([0]))
            for i in range(9)]


def _as_lists(result: dict) -> dict:
    return {k: v.reshape(len(result["example_index"].reshape(-1)), -1).tolist() for k, v in result.items()}


def _rank_worker(rank: int) -> dict:
    windows = _windows()
    # A DistributedSampler gives rank r the windows r, r+2, ...; with 9 windows it repeats window 0 on rank 1.
    mine = windows[rank::2] + ([windows[0]] if rank == 1 else [])
    collector = SpanCandidates(top_k=3)
    for window in mine:
        collector.update(*window)
    return _as_lists(collector.compute())  # compute() gathers every rank's candidates


def test_candidates_gathered_over_two_ddp_processes_equal_one_process():
    results = on_two_ranks(_rank_worker)
    single = SpanCandidates(top_k=3)
    for window in _windows():
        single.update(*window)
    expected = _as_lists(single.compute())
    assert len(expected["example_index"]) == 9
    assert results[0] == expected and results[1] == expected
