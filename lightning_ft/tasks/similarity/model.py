"""The model: a bi-encoder (backbone + pooling), cosine or in-batch contrastive loss, sentence-transformers export."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from transformers import AutoModel

from lightning_ft import packing
from lightning_ft.backbones import resolve_name
from lightning_ft.errors import UserError
from lightning_ft.metrics.similarity import CosineCorrelation, PairRetrieval
from lightning_ft.tasks.base import TaskModule
from lightning_ft.tasks.similarity.data import POOLINGS, TEXT_GROUPS


# ---- pooling and losses --------------------------------------------------------------------------------------------
def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per text from the token vectors (as sentence-transformers' ``Pooling`` computes it)."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the summed gradient of its own slice. (torch's
    ``torch.distributed.nn.functional.all_gather`` does the same but is deprecated since torch 2.13 and warns at
    every step.)"""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        size = grad.shape[0] // torch.distributed.get_world_size()
        start = torch.distributed.get_rank() * size
        return grad[start : start + size]


def contrastive_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float = 0.05,
    gather: bool = False,
) -> torch.Tensor:
    """In-batch negatives (InfoNCE): each anchor must pick its own positive among all positives and hard negatives.

    With ``gather`` under torch.distributed, the candidates are those of every rank (gathered with their gradients),
    so 2 ranks of batch B train like one process with batch 2B. Every rank must hold the same number of anchors,
    which Lightning's ``DistributedSampler`` guarantees.
    """
    candidates = [positives] if negatives is None else [positives, negatives]
    offset = 0
    if gather and torch.distributed.is_available() and torch.distributed.is_initialized():
        candidates = [_GatherWithGrad.apply(c) for c in candidates]
        offset = torch.distributed.get_rank() * len(anchors)
    scores = F.normalize(anchors, dim=-1) @ F.normalize(torch.cat(candidates), dim=-1).T / temperature
    targets = torch.arange(offset, offset + len(anchors), device=anchors.device)
    return F.cross_entropy(scores, targets)


def cosine_loss(first: torch.Tensor, second: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the cosine similarity of each pair and its (scaled) score."""
    return F.mse_loss(F.cosine_similarity(first, second, dim=-1), scores.to(first.dtype))


def pooling_of(backbone_name: str | None) -> str | None:
    """The pooling a sentence-transformers directory was trained with (its ``modules.json``), if it is one."""
    if not backbone_name:
        return None
    root = Path(resolve_name(backbone_name))
    if not (root / "modules.json").is_file():
        return None
    for module in json.loads((root / "modules.json").read_text()):
        if module.get("type", "").endswith("Pooling") and (root / module["path"] / "config.json").is_file():
            config = json.loads((root / module["path"] / "config.json").read_text())
            if "pooling_mode" in config:  # sentence-transformers >= 6
                return config["pooling_mode"] if config["pooling_mode"] in POOLINGS else None
            for mode, key in (("cls", "cls_token"), ("max", "max_tokens"), ("mean", "mean_tokens")):
                if config.get(f"pooling_mode_{key}"):
                    return mode
    return None


# ---- the module ----------------------------------------------------------------------------------------------------
class SimilarityTask(TaskModule):
    """A bi-encoder: backbone + pooling (+ L2 normalisation), trained with the cosine loss on scored pairs and the
    contrastive loss on unscored ones.

    Args:
        scored_eval: per stage (``val``, ``test``), whether its split has scores (correlation) or not (retrieval);
            from ``SimilarityData.model_kwargs()``. The loss follows each batch: scores -> cosine, none -> contrastive.
        pooling: ``mean``, ``cls`` or ``max``; null takes the backbone's own (a sentence-transformers directory), or
            ``mean``.
        normalize: L2-normalise the embeddings (what cosine similarity sees is the same either way; the exported
            model then returns unit vectors, ready for dot-product search).
        temperature: of the contrastive loss (0.05 = sentence-transformers' scale 20).
        gather_negatives: under DDP, use every rank's positives as negatives (a larger effective batch).
        recall_at: the k of the retrieval recall@k metrics.
        max_seq_length: saved with the export for sentence-transformers (the data's max_length).
    """

    auto_class = AutoModel
    non_model_keys = ("labels", "row_index")
    packed_output = "last_hidden_state"

    def __init__(
        self,
        *,
        scored_eval: dict[str, bool] | None = None,
        pooling: str | None = None,
        normalize: bool = True,
        temperature: float = 0.05,
        gather_negatives: bool = True,
        recall_at: list[int] | tuple[int, ...] = (1, 5, 10),
        max_seq_length: int = 128,
        **kwargs: Any,
    ) -> None:
        pooling = pooling or pooling_of(kwargs.get("backbone", {}).get("name")) or "mean"
        if pooling not in POOLINGS:
            raise UserError(f"task.pooling '{pooling}' is not one of {', '.join(POOLINGS)}.")
        if temperature <= 0:
            raise UserError(f"task.temperature must be positive (got {temperature}).")
        self.scored_eval = dict(scored_eval or {"val": True, "test": True})
        self.pooling = pooling
        self.normalize = normalize
        self.temperature = temperature
        self.gather_negatives = gather_negatives
        self.recall_at = tuple(recall_at)
        self.max_seq_length = max_seq_length
        super().__init__(**kwargs)

    @property
    def monitor(self) -> tuple[str, str]:
        return ("val/spearman", "max") if self.scored_eval.get("val") else ("val/mrr", "max")

    def make_metrics(self, prefix: str) -> Metric:
        if self.scored_eval.get(prefix.rstrip("/"), True):
            return CosineCorrelation()
        return PairRetrieval(self.recall_at)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings of a padded batch of token ids."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = pool(hidden, attention_mask, self.pooling)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, **batch: torch.Tensor) -> SimpleNamespace:
        """Embeddings of every text group of the batch, and the loss its data calls for."""
        if packing.is_packed(batch):  # every text packed in rows (SimilarityData.collate_packed), group by group
            hidden = TaskModule.forward(self, **batch).last_hidden_state  # one row per text
            lengths = batch["example_lengths"].to(hidden.device)
            mask = (torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]).long()
            pooled = pool(hidden, mask, self.pooling)
            pooled = F.normalize(pooled, dim=-1) if self.normalize else pooled
            embeddings = list(pooled.chunk(len(lengths) // len(batch["row_index"])))
        else:
            embeddings = [self.embed(batch[f"{p}input_ids"], batch[f"{p}attention_mask"]) for p in TEXT_GROUPS
                          if f"{p}input_ids" in batch]
        if "labels" in batch:
            loss = cosine_loss(embeddings[0], embeddings[1], batch["labels"])
        else:
            negatives = embeddings[2] if len(embeddings) > 2 else None
            # Other ranks' negatives only while training: evaluation batches need no gradient-carrying gather.
            gather = self.training and self.gather_negatives
            loss = contrastive_loss(embeddings[0], embeddings[1], negatives, self.temperature, gather)
        return SimpleNamespace(loss=loss, embeddings=embeddings)

    def update_metrics(self, metrics: Metric, outputs: SimpleNamespace, batch: dict) -> None:
        first, second = outputs.embeddings[:2]
        if isinstance(metrics, CosineCorrelation):
            metrics.update(batch["row_index"], first, second, batch["labels"])
        else:
            metrics.update(batch["row_index"], first, second)

    def _log_epoch_metrics(self, stage: str) -> None:
        values = self.metrics[stage].compute()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")
        self.metrics[stage].reset()

    # ---- export ------------------------------------------------------------------------------------------------
    def export(self, directory: str | Path, tokenizer: Any) -> Path:
        """The Hugging Face directory plus sentence-transformers' module files (pooling, normalisation)."""
        directory = super().export(directory, tokenizer)
        write_sentence_transformers_config(directory, self.model.config.hidden_size, self.pooling, self.normalize,
                                           self.max_seq_length)
        return directory


def write_sentence_transformers_config(
    directory: Path, dimension: int, pooling: str, normalize: bool, max_seq_length: int
) -> None:
    """The files that make a Hugging Face directory a sentence-transformers model, in the layout every
    sentence-transformers version since 2.0 reads (the one the pretrained all-MiniLM-L6-v2 ships in)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (directory / "2_Normalize").mkdir(exist_ok=True)
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    (directory / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2)
    )
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dimension,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2))
    (directory / "config_sentence_transformers.json").write_text(
        json.dumps({"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None}, indent=2)
    )
