"""Semantic similarity with a bi-encoder: one sentence embedding per text (backbone + pooling [+ normalisation]).

Training data are text pairs. A split with a score column (STS-B style, e.g. 0-5) is *scored*: training fits the
cosine similarity of the two embeddings to the score scaled to [0, 1] (MSE, sentence-transformers'
``CosineSimilarityLoss``) and evaluation reports Pearson/Spearman of cosine against score. A split without scores
holds (anchor, positive[, hard negative]) *pairs*: training uses in-batch negatives (cross-entropy over the scaled
cosine of each anchor with every positive and negative of the batch, sentence-transformers'
``MultipleNegativesRankingLoss``; under DDP optionally with the negatives of every rank) and evaluation reports
retrieval recall@k and MRR of each anchor among all positives of the split.

The export is a Hugging Face directory that ``sentence_transformers.SentenceTransformer`` loads as is (pooling and
normalisation saved with it) and ``transformers.AutoModel`` / ``pipeline("feature-extraction")`` too."""

from __future__ import annotations

from typing import Any

from lightning_ft.tasks.similarity.data import SimilarityData
from lightning_ft.tasks.similarity.model import SimilarityTask
from lightning_ft.tasks.similarity.predict import EmbedOptions, SentenceEncoder, predict_rows
from lightning_ft.tasks.spec import Prediction, TaskSpec


def _checkpoint_encoder(module: SimilarityTask, tokenizer: Any) -> SentenceEncoder:
    return SentenceEncoder(module.model.eval(), tokenizer, module.pooling, module.normalize, module.max_seq_length)


SPEC = TaskSpec(
    name="similarity",
    aliases=("embedding",),
    module=SimilarityTask,
    data=SimilarityData,
    export_file="modules.json",  # a sentence-transformers directory: its architecture is the bare backbone's
    prediction=Prediction(
        title="sentence embedding (task=similarity)", rows=predict_rows, options=EmbedOptions, noun="texts",
        verb="embed", past="embedded", matrix_field="embedding", load_export=SentenceEncoder.from_directory,
        from_module=_checkpoint_encoder,
    ),
)
