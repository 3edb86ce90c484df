"""Corpus-level metrics of sentence embeddings: cosine-vs-score correlation and pair retrieval (recall@k, MRR).

Both keep one row per example, keyed by its row index in the split, and compute once over the whole split. Under
DDP the states are gathered from every rank first, and rows a ``DistributedSampler`` repeated to even out the ranks
are counted once (by their row index), so the numbers equal a single-process run over the same split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef
from torchmetrics.utilities import dim_zero_cat


def first_of_each_row(index: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each distinct row index, in row-index order."""
    ordered, order = index.sort(stable=True)
    keep = torch.ones_like(ordered, dtype=torch.bool)
    keep[1:] = ordered[1:] != ordered[:-1]
    return order[keep]


class CosineCorrelation(Metric):
    """Pearson and Spearman correlation between the cosine similarity of two embeddings and a gold score."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("row_index", default=[], dist_reduce_fx="cat")
        self.add_state("cosine", default=[], dist_reduce_fx="cat")
        self.add_state("score", default=[], dist_reduce_fx="cat")

    def update(self, row_index: torch.Tensor, first: torch.Tensor, second: torch.Tensor, score: torch.Tensor) -> None:
        self.row_index.append(row_index.long())
        self.cosine.append(F.cosine_similarity(first.float(), second.float(), dim=-1))
        self.score.append(score.float())

    def compute(self) -> dict[str, torch.Tensor]:
        keep = first_of_each_row(dim_zero_cat(self.row_index))
        cosine, score = dim_zero_cat(self.cosine)[keep], dim_zero_cat(self.score)[keep]
        return {"spearman": spearman_corrcoef(cosine, score), "pearson": pearson_corrcoef(cosine, score)}


class PairRetrieval(Metric):
    """Each query (first text of a pair) searches all second texts of the split; its own pair is the one relevant hit.

    Reports ``recall@k`` for each ``k`` and the mean reciprocal rank (``mrr``, no cut-off). Ties count against the
    query (its hit ranks below every equally similar text). torchmetrics' retrieval metrics take one score per
    (query, document) pair as input, i.e. a split-squared tensor; here the similarities are computed in blocks of
    queries at compute time instead, from one embedding per text.
    """

    full_state_update = False

    def __init__(self, recall_at: tuple[int, ...] = (1, 5, 10), block_size: int = 1024) -> None:
        super().__init__()
        self.recall_at = tuple(int(k) for k in recall_at)
        self.block_size = block_size
        self.add_state("row_index", default=[], dist_reduce_fx="cat")
        self.add_state("queries", default=[], dist_reduce_fx="cat")
        self.add_state("documents", default=[], dist_reduce_fx="cat")

    def update(self, row_index: torch.Tensor, queries: torch.Tensor, documents: torch.Tensor) -> None:
        self.row_index.append(row_index.long())
        self.queries.append(F.normalize(queries.float(), dim=-1))
        self.documents.append(F.normalize(documents.float(), dim=-1))

    def compute(self) -> dict[str, torch.Tensor]:
        keep = first_of_each_row(dim_zero_cat(self.row_index))
        queries, documents = dim_zero_cat(self.queries)[keep], dim_zero_cat(self.documents)[keep]
        ranks = []
        for start in range(0, len(queries), self.block_size):
            block = queries[start : start + self.block_size] @ documents.T
            own = block[torch.arange(len(block)), torch.arange(start, start + len(block))]
            # 1-based rank of the query's own pair: the texts at least as similar to the query, itself included
            ranks.append((block >= own[:, None]).sum(dim=1))
        rank = torch.cat(ranks).float()
        scores = {f"recall@{k}": (rank <= k).float().mean() for k in self.recall_at}
        scores["mrr"] = (1.0 / rank).mean()
        return scores
