"""EntityScores against seqeval on random tag sequences (IOB2, IOB1, BIOES, malformed), in batches and across two
real DDP processes."""

import random
import warnings

import pytest
import torch
from conftest import on_two_ranks
from seqeval.metrics import accuracy_score, classification_report
from seqeval.metrics.sequence_labeling import get_entities as seqeval_entities

from lightning_ft.metrics.entity import EntityScores, get_entities, is_entity_scheme

TYPES = ["PER", "LOC", "ORG"]
IOB = ["O"] + [f"{p}-{t}" for t in TYPES for p in "BI"]
BIOES = ["O"] + [f"{p}-{t}" for t in TYPES for p in "BIES"]


def iob2_sentence(rng: random.Random, n: int) -> list[str]:
    """A well-formed IOB2 sequence: every entity starts with B-."""
    tags, i = [], 0
    while i < n:
        if rng.random() < 0.6:
            tags.append("O")
            i += 1
            continue
        type_, length = rng.choice(TYPES), rng.randint(1, 3)
        tags += [f"B-{type_}"] + [f"I-{type_}"] * (length - 1)
        i += length
    return tags[:n]


def to_iob1(tags: list[str]) -> list[str]:
    """IOB1: B- only where an entity follows another of the same type."""
    out = []
    for i, tag in enumerate(tags):
        if tag.startswith("B-") and not (i and tags[i - 1] != "O" and tags[i - 1][2:] == tag[2:]):
            tag = "I-" + tag[2:]
        out.append(tag)
    return out


def corrupt(rng: random.Random, tags: list[str], labels: list[str], rate: float) -> list[str]:
    return [rng.choice(labels) if rng.random() < rate else t for t in tags]


def corpus(kind: str, seed: int) -> tuple[list[list[str]], list[list[str]], list[str]]:
    rng = random.Random(seed)
    gold = [iob2_sentence(rng, rng.randint(1, 15)) for _ in range(rng.randint(1, 40))]
    labels = IOB
    if kind == "iob1":
        gold = [to_iob1(t) for t in gold]
    elif kind == "bioes":
        labels = BIOES
        gold = [[rng.choice(BIOES) for _ in t] for t in gold]
    elif kind == "malformed":  # I- without B-, type switches inside an entity
        gold = [corrupt(rng, t, IOB, 0.3) for t in gold]
    preds = [corrupt(rng, t, labels, 0.25) for t in gold]
    return gold, preds, labels


def scores(gold, preds, labels, batch=7) -> dict[str, float]:
    metric = EntityScores(labels)
    for start in range(0, len(gold), batch):
        metric.update(preds[start:start + batch], gold[start:start + batch])
    return {k: float(v) for k, v in metric.compute().items()}


@pytest.mark.parametrize("kind", ["iob2", "iob1", "bioes", "malformed"])
def test_entity_scores_equal_seqeval_on_random_corpora(kind):
    for seed in range(60):
        gold, preds, labels = corpus(kind, seed)
        for sentence in gold + preds:
            assert get_entities(sentence) == seqeval_entities(sentence)
        ours = scores(gold, preds, labels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seqeval warns about undefined metrics (zero division)
            report = classification_report(gold, preds, output_dict=True, zero_division=0)
        micro = report["micro avg"]
        assert ours["precision"] == pytest.approx(micro["precision"], abs=1e-12)
        assert ours["recall"] == pytest.approx(micro["recall"], abs=1e-12)
        assert ours["f1"] == pytest.approx(micro["f1-score"], abs=1e-12)
        assert ours["accuracy"] == pytest.approx(accuracy_score(gold, preds), abs=1e-12)
        for type_ in TYPES:
            if type_ in report:  # seqeval lists the types that occur in gold or predictions
                for ours_name, theirs in [("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"),
                                          ("support", "support")]:
                    assert ours[f"{type_}/{ours_name}"] == pytest.approx(report[type_][theirs], abs=1e-12)
            else:
                assert ours[f"{type_}/support"] == 0 and ours[f"{type_}/f1"] == 0


def test_hand_computed_example():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["I-ORG", "I-ORG", "O"]]  # the second: IOB1 / malformed, one ORG
    preds = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG", "O"]]
    out = scores(gold, preds, IOB)
    # gold: PER(0-1), LOC(3), ORG(0-1); predicted: PER(0-1), ORG(3), ORG(0-1); two exact matches
    assert out["precision"] == out["recall"] == pytest.approx(2 / 3)
    assert out["LOC/recall"] == 0 and out["ORG/precision"] == 0.5 and out["PER/f1"] == 1
    assert out["accuracy"] == pytest.approx(5 / 7)  # B-ORG for B-LOC, B-ORG for I-ORG


def test_non_entity_tags_get_word_accuracy_only():
    labels = ["NN", "VB", "DT"]
    assert not is_entity_scheme(labels) and is_entity_scheme(["O", "B-X"])
    metric = EntityScores(labels)
    metric.update([["NN", "VB"], ["DT"]], [["NN", "NN"], ["DT"]])
    assert {k: float(v) for k, v in metric.compute().items()} == {"accuracy": pytest.approx(2 / 3)}


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 tags for 3 gold"):
        EntityScores(IOB).update([["O", "O"]], [["O", "O", "O"]])


def _rank_worker(rank: int, gold, preds) -> dict:
    metric = EntityScores(IOB)
    # Uneven shards, as a DistributedSampler with a ragged end gives them.
    half = len(gold) // 3
    mine = slice(0, half) if rank == 0 else slice(half, None)
    metric.update(preds[mine], gold[mine])
    return {k: float(v) for k, v in metric.compute().items()}  # compute() syncs states over ranks


def test_states_synced_across_two_ddp_processes_give_the_corpus_scores():
    gold, preds, labels = corpus("malformed", seed=3)
    results = on_two_ranks(_rank_worker, gold, preds)
    whole = scores(gold, preds, labels, batch=len(gold))
    local_only = scores(gold[: len(gold) // 3], preds[: len(gold) // 3], labels)
    assert results[0] == pytest.approx(whole) and results[1] == pytest.approx(whole)
    assert local_only != pytest.approx(whole)  # the sync is what makes rank 0 right
    assert torch.distributed.is_available()
