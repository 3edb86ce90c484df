"""task=similarity: metrics, losses (vs sentence-transformers), data checks, DDP, training, export, embed, search."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from cli import run_cli
from conftest import MINILM, QUICK, ROOT, compose_config, on_two_ranks, write_tsv
from scipy.stats import pearsonr, spearmanr

from lightning_ft.errors import UserError
from lightning_ft.metrics.similarity import CosineCorrelation, PairRetrieval
from lightning_ft.tasks.similarity.model import contrastive_loss, cosine_loss, pool
from lightning_ft.tasks.similarity.predict import SentenceEncoder
from lightning_ft.train import train

SAMPLE_RUN = ["task=similarity", *QUICK]


# ---- metrics -------------------------------------------------------------------------------------------------------
def test_cosine_correlation_equals_scipy_at_corpus_level_and_counts_repeated_rows_once():
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(50, 8, generator=gen), torch.randn(50, 8, generator=gen)
    score = torch.rand(50, generator=gen) * 5
    metric = CosineCorrelation()
    for start in range(0, 50, 7):  # batches of 7, as an epoch would feed them
        rows = slice(start, start + 7)
        metric.update(torch.arange(50)[rows], first[rows], second[rows], score[rows])
    metric.update(torch.arange(3), first[:3], second[:3], score[:3])  # a DistributedSampler's padding repeats
    got = metric.compute()
    cosine = torch.nn.functional.cosine_similarity(first, second).numpy()
    assert got["spearman"].item() == pytest.approx(spearmanr(cosine, score.numpy()).statistic, abs=1e-5)
    assert got["pearson"].item() == pytest.approx(pearsonr(cosine, score.numpy()).statistic, abs=1e-5)


def test_pair_retrieval_hand_computed():
    # query 0 finds its pair first; query 1's pair ranks 2nd (behind document 0); query 2's ranks 3rd.
    queries = torch.tensor([[1.0, 0.0], [0.8, 0.6], [1.0, 0.0]])
    documents = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.1]])
    metric = PairRetrieval(recall_at=(1, 2))
    metric.update(torch.arange(3), queries, documents)
    got = {k: round(v.item(), 6) for k, v in metric.compute().items()}
    assert got == {"recall@1": round(1 / 3, 6), "recall@2": round(2 / 3, 6), "mrr": round((1 + 1 / 2 + 1 / 3) / 3, 6)}


def test_pair_retrieval_blocks_equal_a_brute_force_ranking():
    gen = torch.Generator().manual_seed(1)
    queries, documents = torch.randn(37, 6, generator=gen), torch.randn(37, 6, generator=gen)
    documents[:20] += 2 * queries[:20]  # some queries find their pair easily
    metric = PairRetrieval(recall_at=(1, 5), block_size=8)  # several blocks, the last one short
    metric.update(torch.arange(37), queries, documents)
    got = metric.compute()
    similarity = np.asarray(torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(
        documents, dim=-1).T)
    ranks = np.array([1 + sum(similarity[i, j] > similarity[i, i] for j in range(37) if j != i) for i in range(37)])
    assert got["recall@1"].item() == pytest.approx(np.mean(ranks <= 1))
    assert got["recall@5"].item() == pytest.approx(np.mean(ranks <= 5))
    assert got["mrr"].item() == pytest.approx(np.mean(1 / ranks), abs=1e-6)


# ---- losses --------------------------------------------------------------------------------------------------------
class _Unused(torch.nn.Module):  # sentence-transformers' losses keep a model they do not need for these calls
    pass


@pytest.mark.parametrize("with_negatives", [False, True])
def test_contrastive_loss_equals_sentence_transformers_multiple_negatives_ranking_loss(with_negatives):
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    gen = torch.Generator().manual_seed(2)
    embeddings = [torch.randn(6, 10, generator=gen) for _ in range(3 if with_negatives else 2)]
    reference = MultipleNegativesRankingLoss(_Unused(), scale=20.0).compute_loss_from_embeddings(embeddings, None)
    ours = contrastive_loss(*embeddings, temperature=0.05)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_cosine_loss_equals_sentence_transformers_cosine_similarity_loss():
    from sentence_transformers.losses import CosineSimilarityLoss

    gen = torch.Generator().manual_seed(3)
    first, second, scores = torch.randn(9, 5, generator=gen), torch.randn(9, 5, generator=gen), torch.rand(9)
    reference = CosineSimilarityLoss(_Unused()).compute_loss_from_embeddings([first, second], scores)
    assert cosine_loss(first, second, scores).item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_pooling_equals_sentence_transformers_pooling(mode):
    from sentence_transformers.models import Pooling

    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 5, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    reference = Pooling(4, pooling_mode=mode)({"token_embeddings": hidden, "attention_mask": mask})
    assert torch.allclose(pool(hidden, mask, mode), reference["sentence_embedding"], atol=1e-6)


def _ddp_worker(rank: int) -> dict:
    torch.manual_seed(0)
    encoder = torch.nn.Linear(6, 4)  # the same weights on both ranks, as DDP keeps them
    texts = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(5))  # anchors, positives, negatives
    mine = slice(4 * rank, 4 * rank + 4)  # each rank holds half of the 8 examples
    loss = contrastive_loss(*(encoder(t[mine]) for t in texts), temperature=0.1, gather=True)
    loss.backward()
    for p in encoder.parameters():  # what DDP does to gradients: the mean over ranks
        dist.all_reduce(p.grad)
        p.grad /= 2
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    # The metric: each rank sees half the rows plus one repeated row (DistributedSampler padding).
    metric = PairRetrieval(recall_at=(1,))
    rows = torch.tensor([0, 1, 2, 3, 0]) if rank == 0 else torch.tensor([4, 5, 6, 7, 4])
    metric.update(rows, texts[0][rows, :4], texts[1][rows, :4])
    scores = metric.compute()
    return {"loss": torch.stack(losses).mean().item(), "grad": encoder.weight.grad.tolist(),
            "mrr": scores["mrr"].item()}


def test_in_batch_negatives_gathered_over_two_ranks_train_like_one_process_with_the_whole_batch():
    got = on_two_ranks(_ddp_worker)[0]
    torch.manual_seed(0)
    encoder = torch.nn.Linear(6, 4)
    texts = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(5))
    loss = contrastive_loss(*(encoder(t) for t in texts), temperature=0.1)
    loss.backward()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert torch.allclose(torch.tensor(got["grad"]), encoder.weight.grad, atol=1e-6)
    metric = PairRetrieval(recall_at=(1,))
    metric.update(torch.arange(8), texts[0][:, :4], texts[1][:, :4])
    assert got["mrr"] == pytest.approx(metric.compute()["mrr"].item())


# ---- data ----------------------------------------------------------------------------------------------------------
def _pairs(tmp_path: Path, negatives: bool = True) -> Path:
    topics = ["a cat sleeps on the sofa", "stocks fell on monday", "the team won the final", "rain is expected",
              "a new phone was released", "the bridge is closed"]
    rows = [[f"{t} number {i}", f"report: {t} ({i})", f"{topics[(k + 1) % 6]} again"] for i in range(8)
            for k, t in enumerate(topics)]
    header = ["anchor", "positive", "negative"]
    write_tsv(tmp_path / "pairs" / "train.tsv", header if negatives else header[:2],
              [r if negatives else r[:2] for r in rows[:36]])
    write_tsv(tmp_path / "pairs" / "validation.tsv", header[:2], [r[:2] for r in rows[36:]])
    return tmp_path / "pairs"


def _datamodule(tmp_path, overrides):
    from hydra.utils import instantiate

    from lightning_ft.backbones import load_tokenizer

    cfg = compose_config(["task=similarity", *overrides], tmp_path)
    data = instantiate(cfg.dataset, tokenizer=load_tokenizer(MINILM), _convert_="all")
    data.prepare_data()
    return data


def test_the_sample_is_scored_and_pair_files_are_pairs(tmp_path):
    data = _datamodule(tmp_path / "a", [])
    assert data.model_kwargs() == {"scored_eval": {"val": True, "test": True}, "max_seq_length": 128}
    assert data.scored == {"train": True, "validation": True, "test": True}
    first = data.datasets["train"][0]
    assert 0.0 <= first["labels"] <= 1.0 and "pair_input_ids" in first and "negative_input_ids" not in first
    pairs = _datamodule(tmp_path / "b", [f"dataset.data_dir={_pairs(tmp_path)}", "dataset.text_column=anchor",
                                         "dataset.text_pair_column=positive", "dataset.negative_column=negative",
                                         "dataset.score_column=null"])
    assert pairs.scored == {"train": False, "validation": False}
    assert pairs.model_kwargs()["scored_eval"] == {"val": False, "test": False}
    batch = pairs.collate([pairs.datasets["train"][i] for i in range(4)])
    assert set(batch) == {"input_ids", "attention_mask", "pair_input_ids", "pair_attention_mask",
                          "negative_input_ids", "negative_attention_mask", "row_index"}
    # each text group is padded to its own longest text, not to the longest of the pair
    lengths = [len(pairs.datasets["train"][i]["input_ids"]) for i in range(4)]
    assert batch["input_ids"].shape[1] == max(lengths) and batch["row_index"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("overrides,message", [
    (["dataset.score_column=similarity"], "no split has the score column 'similarity'"),
    (["dataset.score_scale=1.0"], "outside [-1, 1] after dividing by dataset.score_scale=1"),
    (["dataset.text_pair_column=sentence3"], "column 'sentence3' is missing from the train split"),
    (["dataset.negative_column=sentence1"], "the cosine loss uses no negatives"),
    (["dataset.negative_column=hard"], "column 'hard' (dataset.negative_column) is missing"),
])
def test_bad_similarity_data_is_a_clear_error(tmp_path, overrides, message):
    with pytest.raises(UserError) as err:
        _datamodule(tmp_path, overrides)
    assert message in str(err.value)


def test_an_empty_text_names_its_row(tmp_path):
    write_tsv(tmp_path / "d" / "train.tsv", ["sentence1", "sentence2", "score"], [["a b", "a c", 3], ["x", " ", 1]])
    write_tsv(tmp_path / "d" / "validation.tsv", ["sentence1", "sentence2", "score"], [["a b", "a c", 3]])
    with pytest.raises(UserError, match="row 1 of the train split has no text in column 'sentence2'"):
        _datamodule(tmp_path, [f"dataset.data_dir={tmp_path / 'd'}"])


# ---- training, export, embed, search -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> Path:
    """A tiny bi-encoder trained on the embedded sample (cosine loss), as `lightning_ft.train task=similarity` does."""
    run = tmp_path_factory.mktemp("similarity_run")
    train(compose_config(SAMPLE_RUN, run))
    return run


def test_the_sample_run_reports_spearman_before_and_after_training(sample_run):
    metrics = json.loads((sample_run / "metrics.json").read_text())
    assert metrics["monitor"] == "val/spearman"
    before, after = metrics["before_training"], metrics["validation"]
    assert set(before) == set(after) == {"val/loss", "val/spearman", "val/pearson"}
    assert before["val/loss"] != after["val/loss"]  # the weights changed in between (ranks may not, in 10 steps)
    assert {"test/spearman", "test/pearson"} <= set(metrics["test"])


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("max", True)])
def test_export_loads_in_sentence_transformers_with_the_modules_embeddings(tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    from lightning_ft.backbones import load_tokenizer
    from lightning_ft.tasks.similarity import SimilarityTask

    backbone = {"name": MINILM, "pretrained": False, "config_overrides": {"hidden_size": 32, "num_hidden_layers": 1,
                                                                           "num_attention_heads": 2,
                                                                           "intermediate_size": 64}}
    module = SimilarityTask(backbone=backbone, pooling=pooling, normalize=normalize, max_seq_length=64).eval()
    tokenizer = load_tokenizer(MINILM)
    module.export(tmp_path, tokenizer)
    texts = ["A man is playing a guitar.", "short", "The quick brown fox jumps over the lazy dog near the river."]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = module.embed(encoded["input_ids"], encoded["attention_mask"])
    model = SentenceTransformer(str(tmp_path), device="cpu")
    theirs = model.encode(texts, convert_to_tensor=True)
    assert model.max_seq_length == 64
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(SentenceEncoder.from_directory(tmp_path).encode(texts), theirs, atol=1e-5)


def test_pretrained_minilm_is_evaluated_as_sentence_transformers_evaluates_it(tmp_path):
    """Before any training, the sample's validation Spearman equals sentence-transformers' own STS evaluator."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    from lightning_ft.backbones import resolve_name
    from lightning_ft.paths import sample_dir
    from lightning_ft.tasks.similarity.predict import read_texts

    # fp32 as sentence-transformers evaluates: under bf16 autocast the figure moves in the third decimal.
    cfg = compose_config(["task=similarity", "train=false", "test=false", "export=false", "~callbacks.progress_bar",
                          "trainer.precision=32-true"], tmp_path)
    train(cfg)
    ours = json.loads((tmp_path / "metrics.json").read_text())["validation"]["val/spearman"]
    _, rows = read_texts(sample_dir("stsb") / "validation.tsv", "sentence1")
    evaluator = EmbeddingSimilarityEvaluator([r["sentence1"] for r in rows], [r["sentence2"] for r in rows],
                                             [float(r["score"]) / 5 for r in rows], name="sample")
    model = SentenceTransformer(resolve_name(MINILM), device="cpu")
    model.max_seq_length = 128
    theirs = evaluator(model)["sample_spearman_cosine"]
    assert ours == pytest.approx(theirs, abs=1e-4) and ours > 0.7


def test_contrastive_training_on_pairs_reports_retrieval(tmp_path):
    data_dir = _pairs(tmp_path)
    overrides = ["task=similarity", *QUICK, f"dataset.data_dir={data_dir}", "dataset.text_column=anchor",
                 "dataset.text_pair_column=positive", "dataset.negative_column=negative", "dataset.score_column=null",
                 "test=false",
                 "dataset.batch_size=6"]
    best = train(compose_config(overrides, tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["monitor"] == "val/mrr" and metrics["best_score"] == best
    assert {"val/recall@1", "val/recall@5", "val/recall@10", "val/mrr"} <= set(metrics["validation"])
    assert 1 / 12 <= metrics["validation"]["val/mrr"] <= 1.0  # 12 validation pairs: the worst rank is 12


def test_predict_embeds_a_text_file(sample_run, tmp_path, capsys):
    (tmp_path / "texts.txt").write_text("A man is playing a guitar.\nA woman is slicing an onion.\n")
    result = run_cli([str(sample_run), "texts.txt", "out.jsonl"], tmp_path, module="lightning_ft.predict")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["A man is playing a guitar.", "A woman is slicing an onion."]
    expected = SentenceEncoder.from_directory(sample_run / "hf_model").encode([r["text"] for r in rows])
    assert torch.allclose(torch.tensor([r["embedding"] for r in rows]), expected, atol=1e-5)
    # the same entry point in this process (the command line itself ran above)
    from lightning_ft.predict import main

    assert main([str(sample_run), str(ROOT / "data/stsb/test.tsv"), str(tmp_path / "out.npy"), "--column",
                 "sentence2"]) == 0
    assert np.load(tmp_path / "out.npy").shape == (200, 32)
    assert main([str(sample_run), str(tmp_path / "texts.txt"), str(tmp_path / "out.npy"), "--column", "nope"]) == 2
    assert "no text column 'nope'" in capsys.readouterr().err


def test_search_finds_a_sentence_itself_first(sample_run, tmp_path):
    from lightning_ft.search import nearest, sample_corpus

    corpus = sample_corpus()
    encoder = SentenceEncoder.from_directory(sample_run)
    hits = nearest(encoder, [corpus[5], corpus[100]], corpus, top_k=3)
    assert [h[0][0] for h in hits] == [corpus[5], corpus[100]] and all(len(h) == 3 for h in hits)
    assert all(h[0][1] >= h[1][1] >= h[2][1] for h in hits)
    result = run_cli([str(sample_run), "A man is playing a guitar.", "--top-k", "2"], tmp_path,
                     module="lightning_ft.search")
    assert result.returncode == 0 and "nearest to: A man is playing a guitar." in result.stdout


def test_search_refuses_a_missing_model_and_one_that_is_not_a_sentence_encoder(tmp_path, tiny_pretrained, capsys):
    from lightning_ft.search import main  # in this process: the command line itself runs in the test above

    assert main([str(tmp_path / "nowhere"), "query"]) == 2
    assert "is not an exported model" in capsys.readouterr().err
    assert main([tiny_pretrained, "query"]) == 2
    assert "holds a BertModel" in capsys.readouterr().err
