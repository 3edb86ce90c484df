"""Semantic similarity with a bi-encoder: one sentence embedding per text (backbone + pooling [+ normalisation]).

Training data are text pairs. A split with a score column (STS-B style, e.g. 0-5) is *scored*: training fits the
cosine similarity of the two embeddings to the score scaled to [0, 1] (MSE, sentence-transformers'
``CosineSimilarityLoss``) and evaluation reports Pearson/Spearman of cosine against score. A split without scores
holds (anchor, positive[, hard negative]) *pairs*: training uses in-batch negatives (cross-entropy over the scaled
cosine of each anchor with every positive and negative of the batch, sentence-transformers'
``MultipleNegativesRankingLoss``; under DDP optionally with the negatives of every rank) and evaluation reports
retrieval recall@k and MRR of each anchor among all positives of the split.

The export is a Hugging Face directory that ``sentence_transformers.SentenceTransformer`` loads as is (pooling and
normalisation saved with it) and ``transformers.AutoModel`` / ``pipeline("feature-extraction")`` too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from transformers import AutoModel

from lightning_ft.backbones import resolve_name
from lightning_ft.data.base import TaskDataModule, iter_jsonl
from lightning_ft.errors import UserError
from lightning_ft.metrics.similarity import CosineCorrelation, PairRetrieval
from lightning_ft.tasks.base import TaskModule

log = logging.getLogger(__name__)

POOLINGS = ("mean", "cls", "max")
TEXT_GROUPS = ("", "pair_", "negative_")  # key prefixes of the anchor, its pair and the optional hard negative


# ---- data ----------------------------------------------------------------------------------------------------------
class SimilarityData(TaskDataModule):
    """Text pairs in ``text_column`` and ``text_pair_column``, with a score in ``score_column`` (scored splits) or not
    (pair splits), and optionally a hard negative in ``negative_column`` for training.

    Args:
        score_scale: scores are divided by it for the cosine loss (5 for STS-B's 0-5 scale); scaled scores must lie in
            [-1, 1]. Correlations do not depend on it.
        score_column: null reads every split as pairs (contrastive training, retrieval evaluation).
    """

    keep_row_index = True

    def __init__(
        self,
        *,
        text_column: str = "sentence1",
        text_pair_column: str = "sentence2",
        score_column: str | None = "score",
        negative_column: str | None = None,
        score_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if score_scale <= 0:
            raise UserError(f"dataset.score_scale must be positive (got {score_scale}).")
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.score_column = score_column
        self.negative_column = negative_column
        self.score_scale = float(score_scale)
        self.scored: dict[str, bool] = {}

    def _check_columns(self, raw: dict[str, Any]) -> None:
        self.scored = {split: bool(self.score_column) and self.score_column in data.column_names
                       for split, data in raw.items()}
        if self.score_column and not any(self.scored.values()):
            raise UserError(
                f"no split has the score column '{self.score_column}' (train has: "
                f"{', '.join(raw['train'].column_names)}): fix dataset.score_column, or set dataset.score_column=null "
                "to read every split as (anchor, positive) pairs."
            )
        if self.negative_column and self.negative_column not in raw["train"].column_names:
            raise UserError(
                f"column '{self.negative_column}' (dataset.negative_column) is missing from the train split (it has: "
                f"{', '.join(raw['train'].column_names)}): fix the name or set dataset.negative_column=null."
            )
        if self.negative_column and self.scored["train"]:
            raise UserError(
                "the train split has scores and hard negatives: the cosine loss uses no negatives. Set "
                "dataset.negative_column=null, or dataset.score_column=null to train with in-batch negatives."
            )
        super()._check_columns(raw)
        kinds = ", ".join(f"{split} {'scored' if scored else 'pairs'}" for split, scored in self.scored.items())
        log.info("similarity splits: %s", kinds)

    def _text_columns(self, split: str) -> list[str]:
        columns = [self.text_column, self.text_pair_column]
        return columns + ([self.negative_column] if split == "train" and self.negative_column else [])

    def required_columns(self, split: str) -> list[str]:
        return self._text_columns(split) + ([self.score_column] if self.scored.get(split) else [])

    def check_split(self, split: str, data: Any) -> None:
        for column in self._text_columns(split):
            for row, text in enumerate(data[column]):
                if not isinstance(text, str) or not text.strip():
                    raise UserError(
                        f"row {row} of the {split} split has no text in column '{column}': fill or drop the row."
                    )
        if not self.scored.get(split):
            return
        for row, value in enumerate(data[self.score_column]):
            if not isinstance(value, (int, float)) or value != value:
                raise UserError(f"row {row} of the {split} split has a non-numeric score {value!r}.")
            if not -1.0 <= value / self.score_scale <= 1.0:
                raise UserError(
                    f"score {value} in row {row} of the {split} split is outside [-1, 1] after dividing by "
                    f"dataset.score_scale={self.score_scale:g}: set dataset.score_scale to the top of the score range "
                    "(5 for STS-B)."
                )

    def model_kwargs(self) -> dict[str, Any]:
        """Which evaluation each split gets (and the length limit the export records)."""
        self._prepare()
        return {
            "scored_eval": {stage: self.scored.get(split, False) for stage, split in (("val", "validation"),
                                                                                       ("test", "test"))},
            "max_seq_length": self.max_length,
        }

    def preprocessing_settings(self) -> dict[str, Any]:
        return {
            **super().preprocessing_settings(),
            "columns": [self.text_column, self.text_pair_column, self.negative_column, self.score_column],
            "score_scale": self.score_scale,
        }

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {}
        columns = [self.text_column, self.text_pair_column, self.negative_column]
        for prefix, column in zip(TEXT_GROUPS, columns):
            if column and column in batch:
                encoding = self.tokenizer(batch[column], truncation=True, max_length=self.max_length)
                self.count_truncated(encoding)
                out[f"{prefix}input_ids"] = encoding["input_ids"]
                out[f"{prefix}attention_mask"] = encoding["attention_mask"]
        if self.score_column and self.score_column in batch:
            out["labels"] = [float(v) / self.score_scale for v in batch[self.score_column]]
        return out

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        # Each text of the pair is padded on its own (no padding of short anchors to long positives).
        batch: dict[str, torch.Tensor] = {}
        multiple = self.pad_to_multiple_of or 1
        pad_id = self.tokenizer.pad_token_id or 0
        for prefix in TEXT_GROUPS:
            key = f"{prefix}input_ids"
            if key not in features[0]:
                continue
            longest = max(len(f[key]) for f in features)
            longest = -(-longest // multiple) * multiple
            ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
            mask = torch.zeros((len(features), longest), dtype=torch.long)
            for i, f in enumerate(features):
                ids[i, : len(f[key])] = torch.tensor(f[key])
                mask[i, : len(f[key])] = 1
            batch[key], batch[f"{prefix}attention_mask"] = ids, mask
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.float)
        batch["row_index"] = torch.tensor([f["row_index"] for f in features], dtype=torch.long)
        return batch


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


# ---- using an exported model ---------------------------------------------------------------------------------------
class SentenceEncoder:
    """Embeds texts with an exported bi-encoder (or any sentence-transformers directory) without
    sentence-transformers: the Hugging Face model plus the pooling and normalisation saved beside it."""

    def __init__(self, model: Any, tokenizer: Any, pooling: str, normalize: bool, max_length: int) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.pooling, self.normalize, self.max_length = pooling, normalize, max_length

    @classmethod
    def from_directory(cls, name: str | Path) -> SentenceEncoder:
        """From an exported directory, a run directory, or a sentence-transformers directory or hub name."""
        from lightning_ft.backbones import load_tokenizer

        root = Path(resolve_name(str(name)))
        if (root / "hf_model" / "config.json").is_file():  # a run directory
            root = root / "hf_model"
        modules = json.loads((root / "modules.json").read_text()) if (root / "modules.json").is_file() else []
        normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        settings = root / "sentence_bert_config.json"
        max_length = json.loads(settings.read_text()).get("max_seq_length") if settings.is_file() else None
        tokenizer = load_tokenizer(str(root))
        return cls(AutoModel.from_pretrained(root), tokenizer, pooling_of(str(root)) or "mean", normalize,
                   int(max_length or min(tokenizer.model_max_length, 512)))

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """One embedding per text (rows in input order); texts are batched by length to save padding."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        device = self.model.device
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(device)
            hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            pooled = pool(hidden, enc["attention_mask"], self.pooling)
            out[rows] = (F.normalize(pooled, dim=-1) if self.normalize else pooled).float().cpu()
        return out


def read_texts(source: Path, column: str | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """Texts to embed and their rows: ``.txt`` (a text a line), ``.jsonl``, ``.csv`` or ``.tsv`` (``column``, by
    default ``text`` or ``sentence``)."""
    import csv

    suffix = source.suffix.lower()
    if suffix == ".txt":
        rows = [{"text": line.rstrip("\r\n")} for line in source.open(encoding="utf-8") if line.strip()]
    elif suffix in {".jsonl", ".json"}:
        rows = []
        for number, row in iter_jsonl(source):
            if not isinstance(row, dict):
                raise UserError(f"{source}:{number} is not a JSON object: write one object a line.")
            rows.append(row)
    elif suffix in {".csv", ".tsv"}:
        with source.open(encoding="utf-8", newline="") as handle:
            delimiter = "\t" if suffix == ".tsv" else ","
            rows = list(csv.DictReader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t"
                                       else csv.QUOTE_MINIMAL))
    else:
        raise UserError(f"input '{source}' has an unknown extension '{suffix}': use .txt, .jsonl, .csv or .tsv.")
    if not rows:
        raise UserError(f"{source} has no texts.")
    keys = list(rows[0])
    column = column or next((k for k in ("text", "sentence", "sentence1") if k in keys), None)
    if column is None or column not in keys:
        raise UserError(
            f"{source} has no text column {('' if column is None else repr(column) + ' ')}(it has: {', '.join(keys)})"
            ": name it with --column."
        )
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get(column), str):
            raise UserError(f"row {number} of {source} has no text in '{column}'.")
    return [row[column] for row in rows], rows


# ---- prediction (python -m lightning_ft.predict) -------------------------------------------------------------------
# The column predict reads when none is named: the first of these the input has.
PREDICT_COLUMNS = {"column": ("text", "sentence", "sentence1")}


def predict_rows(model: SentenceEncoder, tokenizer: Any, rows: list[dict], *, column: str = "text") -> list[dict]:
    """The ``embedding`` (a list of floats; unit length when the model normalises) of each row's ``column`` text.
    ``model`` is a ``SentenceEncoder`` (its own tokenizer, pooling and normalisation)."""
    vectors = model.encode([str(row[column]) for row in rows], batch_size=max(len(rows), 1))
    return [{"embedding": vector} for vector in vectors.tolist()]
