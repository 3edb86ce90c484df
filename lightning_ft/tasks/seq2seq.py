"""Translation and summarization with encoder-decoder models (T5, BART, Marian, mBART), as the HF
``run_translation``/``run_summarization`` examples do them.

Data: parallel plain-text files (``train.de`` + ``train.en``, gz allowed), rows with ``source``/``target`` columns
(jsonl, csv...; a list source is joined, a list target gives several references, the first one trains), or the hub's
``translation: {de: ..., en: ...}`` layout. ``source_prefix`` is prepended (T5's "translate German to English: "),
sources and targets are cut to ``max_source_length``/``max_target_length`` (counted), label padding is ignored by the
loss, and rows with no target are left out (counted).

Evaluation generates (``predict_with_generate``) with the model's generation settings (``num_beams``,
``max_new_tokens``, ``length_penalty``, ``no_repeat_ngram_size``), which the export keeps, so a pipeline generates
what the module does. While training, only the first ``val_generate_limit`` validation rows generate (the loss
covers all of them); ``trainer.validate`` and ``test`` generate the whole split. Scores are corpus-level against the
raw reference texts (not decoded labels): sacreBLEU and chrF for translation, ROUGE-1/2/L/Lsum for summarization.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Any

import torch
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.text import SacreBLEUScore
from transformers import AutoModelForSeq2SeqLM

from lightning_ft.data.base import TaskDataModule
from lightning_ft.errors import UserError
from lightning_ft.metrics.generation import ChrF, RougeScores
from lightning_ft.tasks.base import TaskModule

log = logging.getLogger(__name__)
_SPLIT_STEMS = {"train": ["train"], "validation": ["validation", "valid", "val", "dev"], "test": ["test"]}
SOURCE_CUT, TARGET_CUT = 1, 2  # bits of the "truncated" column


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\r\n") for line in handle]


class Seq2SeqData(TaskDataModule):
    """Source/target text pairs, tokenized for an encoder-decoder model.

    Args:
        source_lang, target_lang: language keys: the suffixes of parallel files (``train.de``/``train.en``) or the
            keys of a ``translation`` column. Both null: ``source_column``/``target_column`` hold the texts.
        parallel_files: the file stem of a split, when not train/validation/test (e.g. ``{test: test_2016_flickr}``).
        source_prefix: text put before every source (T5: "translate German to English: ", "summarize: ").
    """

    keep_row_index = True

    def __init__(
        self,
        *,
        source_column: str = "source",
        target_column: str = "target",
        source_lang: str | None = None,
        target_lang: str | None = None,
        parallel_files: dict[str, str] | None = None,
        source_prefix: str = "",
        max_source_length: int = 128,
        max_target_length: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_length=max_source_length, **kwargs)
        if (source_lang is None) != (target_lang is None):
            raise UserError("dataset.source_lang and dataset.target_lang go together: give both, or neither.")
        self.source_column = source_column
        self.target_column = target_column
        self.source_lang = source_lang
        self.target_lang = target_lang
        self.parallel_files = dict(parallel_files or {})
        self.source_prefix = source_prefix
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.problems: dict[str, dict[str, int]] = {}  # split -> kind of bad input -> rows
        self._references: dict[str, list[list[str]]] = {}
        self._sources: dict[str, list[str]] = {}
        self._parallel = False
        self._raw: dict[str, Any] | None = None

    # ---- reading -----------------------------------------------------------------------------------------------
    def _parallel_paths(self) -> dict[str, tuple[Path, Path]] | None:
        """``split -> (source file, target file)`` when ``data_dir`` holds parallel text files, else None."""
        if not (self.data_dir and self.source_lang):
            return None
        root = Path(self.data_dir).expanduser()
        if not root.is_dir():
            return None  # the base reader names the bad path

        def find(stem: str, lang: str) -> Path | None:
            return next((p for p in (root / f"{stem}.{lang}", root / f"{stem}.{lang}.gz") if p.is_file()), None)

        if not any(root.glob(f"*.{self.source_lang}")) and not any(root.glob(f"*.{self.source_lang}.gz")):
            return None
        pairs = {}
        for split in _SPLIT_STEMS:
            stems = [self.parallel_files[split]] if split in self.parallel_files else _SPLIT_STEMS[split]
            if split == "test" and split not in self.parallel_files:  # e.g. Multi30k's test_2016_flickr
                stems = stems + sorted({p.name.split(".")[0] for p in root.glob(f"test*.{self.source_lang}*")})
            for stem in stems:
                source, target = find(stem, self.source_lang), find(stem, self.target_lang)
                if source and not target:
                    raise UserError(f"'{source}' has no parallel '{stem}.{self.target_lang}[.gz]' in {root}: add it, "
                                    "or fix dataset.target_lang.")
                if source:
                    pairs[split] = (source, target)
                    break
            if split in self.parallel_files and split not in pairs:
                raise UserError(f"dataset.parallel_files.{split} '{self.parallel_files[split]}': no "
                                f"{self.parallel_files[split]}.{self.source_lang}[.gz] in {root}.")
        return pairs

    def read_splits(self) -> dict[str, Any]:
        pairs = self._parallel_paths()
        self._parallel = pairs is not None
        if pairs is None:
            return super().read_splits()
        import datasets

        raw = {}
        for split, (source_path, target_path) in pairs.items():
            sources, targets = _read_lines(source_path), _read_lines(target_path)
            if len(sources) != len(targets):
                raise UserError(
                    f"parallel files differ in length: {source_path} has {len(sources)} lines, {target_path} has "
                    f"{len(targets)}. They need one sentence a line, line i of one translating line i of the other."
                )
            raw[split] = datasets.Dataset.from_dict({"source": sources, "target": targets})
        return raw

    def load_raw(self) -> dict[str, Any]:
        if self._raw is None:  # read once: training a tokenizer reads the training text before tokenizing
            self._raw = {split: self._normalize(split, data) for split, data in super().load_raw().items()}
            for split, data in self._raw.items():
                self._sources[split] = data["source"]
                self._references[split] = data["references"]
        return self._raw

    def _normalize(self, split: str, data: Any) -> Any:
        """Columns ``source`` (text), ``target`` (the training target) and ``references`` (every target)."""
        names = data.column_names
        layout = "translation" if "translation" in names and self.source_lang else "columns"
        if layout == "columns":
            # Parallel files are read into source/target columns whatever the column options say.
            source_column, target_column = ("source", "target") if self._parallel else (self.source_column,
                                                                                          self.target_column)
            for option, column in (("source_column", source_column), ("target_column", target_column)):
                if column not in names:
                    raise UserError(f"column '{column}' is missing from the {split} split (it has: {', '.join(names)})"
                                    f": set dataset.{option} to one of those, or dataset.source_lang/target_lang for a "
                                    "'translation' column.")
        else:
            keys = set(data[0]["translation"])
            for option, lang in (("source_lang", self.source_lang), ("target_lang", self.target_lang)):
                if lang not in keys:
                    raise UserError(f"the {split} split's 'translation' column has languages {sorted(keys)}, not "
                                    f"dataset.{option} '{lang}': set it to one of those.")

        def texts(value: Any) -> list[str]:
            if value is None:
                return []
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]

        def normalize(batch: dict[str, list]) -> dict[str, list]:
            if layout == "translation":
                sources = [row[self.source_lang] for row in batch["translation"]]
                targets = [texts(row[self.target_lang]) for row in batch["translation"]]
            else:
                sources = [" ".join(texts(s)) for s in batch[source_column]]
                targets = [texts(t) for t in batch[target_column]]
            references = [[t for t in ts if t.strip()] for ts in targets]
            return {"source": sources, "target": [r[0] if r else "" for r in references], "references": references}

        data = data.map(normalize, batched=True, remove_columns=names, desc=f"Reading {split}")
        empty = data.filter(lambda batch: [not t for t in batch["target"]], batched=True)
        if len(empty):
            self.problems.setdefault(split, {})["empty_target"] = len(empty)
            log.warning("%d %s rows have an empty target and are left out (first: row with source %r).",
                        len(empty), split, empty[0]["source"][:80])
            data = data.filter(lambda batch: [bool(t) for t in batch["target"]], batched=True)
            if len(data) == 0:
                raise UserError(f"every target of the {split} split is empty: check dataset.target_column.")
        return data

    # ---- tokenizing --------------------------------------------------------------------------------------------
    def required_columns(self, split: str) -> list[str]:
        return ["source", "target"]

    def training_texts(self):
        """Source and target texts of the training split, to train a tokenizer on (a shared vocabulary)."""
        train = self.load_raw()["train"]
        for row in train.select_columns(["source", "references"]):
            yield row["source"]
            yield from row["references"]

    def preprocessing_settings(self) -> dict[str, Any]:
        return {"max_source_length": self.max_source_length, "max_target_length": self.max_target_length,
                "source_prefix": self.source_prefix}

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        inputs = self.tokenizer([self.source_prefix + s for s in batch["source"]],
                                max_length=self.max_source_length, truncation=True)
        labels = self.tokenizer(text_target=batch["target"], max_length=self.max_target_length, truncation=True)
        cut = [SOURCE_CUT * bool(s.overflowing) + TARGET_CUT * bool(t.overflowing)
               for s, t in zip(inputs.encodings, labels.encodings)]
        return {**inputs, "labels": labels["input_ids"], "truncated": cut}

    def check_encoded(self, split: str, data: Any) -> None:
        # From the stored column, so a run that reads the tokenized cache reports the same counts.
        cut = data["truncated"]
        for kind, bit, limit in (("source_truncated", SOURCE_CUT, "max_source_length"),
                                 ("target_truncated", TARGET_CUT, "max_target_length")):
            count = sum(1 for c in cut if c & bit)
            if count:
                self.problems.setdefault(split, {})[kind] = count
                log.warning("%d of %d %s %ss were longer than dataset.%s=%d tokens and were cut: raise it to keep "
                            "them whole.", count, len(cut), split, kind.split("_")[0], limit,
                            getattr(self, limit))

    @property
    def preparation(self) -> dict[str, Any]:
        problems = {split: counts for split, counts in self.problems.items() if counts}
        return {**super().preparation, **({"problems": problems} if problems else {})}

    def collate(self, features: list[dict]) -> dict:
        from transformers import DataCollatorForSeq2Seq

        if not hasattr(self, "_collator"):
            # Labels padded with -100: the loss ignores them (the model turns them into pad for its decoder input).
            self._collator = DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=-100,
                                                    pad_to_multiple_of=self.pad_to_multiple_of)
        return self._collator([{k: v for k, v in f.items() if k != "truncated"} for f in features])

    def references(self, split: str) -> list[list[str]]:
        """Every reference text of each row of ``split``, by row index."""
        self._prepare()
        return self._references[split]

    def sources(self, split: str) -> list[str]:
        self._prepare()
        return self._sources[split]

    def model_kwargs(self) -> dict[str, Any]:
        return {"source_prefix": self.source_prefix, "max_source_length": self.max_source_length}


class Seq2SeqTask(TaskModule):
    """An encoder-decoder with its LM head: teacher-forced loss, generation-based corpus metrics.

    Args:
        num_beams, max_new_tokens, length_penalty, no_repeat_ngram_size: generation settings, stored in the
            model's generation config (and so in the export).
        val_generate_limit: validation rows that generate while training (null: all); the full split at test.
        predict_with_generate: false scores by loss alone (no generation).
        show_examples: generations printed at the end of the run.
        source_prefix, max_source_length: from the data; kept in the export so a pipeline prepares text the same.
    """

    auto_class = AutoModelForSeq2SeqLM
    non_model_keys = ("row_index",)
    metric_scale: dict[str, float] = {}  # factors that put a metric on a 0-100 scale

    def __init__(
        self,
        *,
        num_beams: int = 4,
        max_new_tokens: int = 64,
        length_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        val_generate_limit: int | None = 200,
        predict_with_generate: bool = True,
        show_examples: int = 3,
        source_prefix: str = "",
        max_source_length: int = 512,
        **kwargs: Any,
    ) -> None:
        model_config = {**(kwargs.pop("model_config", None) or {}), "prefix": source_prefix or None}
        super().__init__(model_config=model_config, **kwargs)
        config = self.model.config
        if getattr(config, "num_decoder_layers", config.num_hidden_layers) != config.num_hidden_layers:
            # transformers sizes T5's generation cache by num_layers: beam search then fails with an IndexError.
            raise UserError(
                f"backbone has {config.num_hidden_layers} encoder and {config.num_decoder_layers} decoder layers; "
                "T5 generation in this transformers version needs them equal: set backbone.config_overrides."
                "num_decoder_layers to num_layers."
            )
        self.model.generation_config.update(num_beams=num_beams, max_new_tokens=max_new_tokens,
                                            length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
        self.val_generate_limit = val_generate_limit
        self.predict_with_generate = predict_with_generate
        self.show_examples = show_examples
        self.max_source_length = max_source_length
        self.predictions: dict[str, dict[str, dict]] = {}  # stage -> row index -> source, prediction, references
        self.examples: dict[str, list[dict]] = {}
        self._generated: dict[int, str] = {}
        self.generated_length = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    @property
    def monitor(self) -> tuple[str, str]:
        if not self.predict_with_generate or self.val_generate_limit == 0:
            return ("val/loss", "min")
        return self.default_monitor

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids generated with the model's generation settings."""
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask)

    def _eval_step(self, stage: str, batch: dict) -> None:
        outputs = self(**batch)
        rows = batch["row_index"]
        self.log(f"{stage}/loss", outputs.loss, prog_bar=stage == "val", sync_dist=True, batch_size=len(rows))
        keep = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        keep[: self.own_rows(stage, len(rows))] = True  # the rest repeat other ranks' rows (DDP padding)
        if self._limited(stage):
            keep &= rows < self.val_generate_limit
        if not self._generating(stage) or not keep.any():
            return
        datamodule = self.trainer.datamodule
        split = "validation" if stage == "val" else "test"
        generated = self.generate(batch["input_ids"][keep], batch["attention_mask"][keep])
        texts = [t.strip() for t in datamodule.tokenizer.batch_decode(generated, skip_special_tokens=True)]
        indices = rows[keep].tolist()
        references = datamodule.references(split)
        self.metrics[stage].update(texts, [references[i] for i in indices])
        pad_id = datamodule.tokenizer.pad_token_id
        lengths = (generated[:, 1:] != pad_id).sum(1).float()  # without the decoder start token
        self.generated_length[stage].update(lengths)
        self._generated.update(zip(indices, texts))

    def _limited(self, stage: str) -> bool:
        return stage == "val" and self.trainer.state.fn == "fit" and self.val_generate_limit is not None

    def _generating(self, stage: str) -> bool:
        return self.predict_with_generate and not (self._limited(stage) and self.val_generate_limit == 0)

    def _log_epoch_metrics(self, stage: str) -> None:
        if not self._generating(stage):
            return
        values = {k: v * self.metric_scale.get(k.split("/")[-1], 1.0) for k, v in self.metrics[stage].compute().items()}
        values[f"{stage}/gen_len"] = self.generated_length[stage].compute()
        self.log_dict(values, prog_bar=stage == "val")
        self.metrics[stage].reset()
        self.generated_length[stage].reset()
        self._keep_predictions(stage)

    def _keep_predictions(self, stage: str) -> None:
        generated = self._generated
        self._generated = {}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict] = [{} for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(gathered, generated)
            generated = {k: v for part in gathered for k, v in part.items()}
        datamodule = self.trainer.datamodule
        split = "validation" if stage == "val" else "test"
        sources, references = datamodule.sources(split), datamodule.references(split)
        self.predictions[stage] = {
            str(i): {"source": sources[i], "prediction": generated[i], "references": references[i]}
            for i in sorted(generated)
        }
        self.examples[stage] = [{"row": int(i), **row} for i, row in
                                list(self.predictions[stage].items())[: self.show_examples]]

    def export(self, directory: str | Path, tokenizer: Any) -> Path:
        # The pipeline cuts inputs at the tokenizer's model_max_length: make it the length the model trained on.
        limit, tokenizer.model_max_length = tokenizer.model_max_length, self.max_source_length
        try:
            return super().export(directory, tokenizer)
        finally:
            tokenizer.model_max_length = limit


class TranslationTask(Seq2SeqTask):
    """Translation scored by corpus sacreBLEU (13a tokenization) and chrF, 0-100."""

    default_monitor = ("val/bleu", "max")
    metric_scale = {"bleu": 100.0}  # torchmetrics gives 0-1; sacreBLEU's convention (and chrF's here) is 0-100

    def make_metrics(self, prefix: str) -> MetricCollection:
        return MetricCollection({"bleu": SacreBLEUScore(tokenize="13a"), "chrf": ChrF()},
                                prefix=prefix)


class SummarizationTask(Seq2SeqTask):
    """Summarization scored by ROUGE-1/2/L/Lsum (mean F-measure over the split, best reference), 0-100."""

    default_monitor = ("val/rougeL", "max")

    def make_metrics(self, prefix: str) -> MetricCollection:
        return MetricCollection({"rouge": RougeScores()}, prefix=prefix, compute_groups=False)


# ---- prediction (python -m lightning_ft.predict) -------------------------------------------------------------------
# The column predict reads when none is named: the first of these the input has.
PREDICT_COLUMNS = {"column": ("source", "text", "document")}


@torch.no_grad()
def predict_rows(model: Any, tokenizer: Any, rows: list[dict], *, column: str = "source",
                 max_new_tokens: int | None = None, num_beams: int | None = None) -> list[dict]:
    """The text generated from each row's ``column`` (a list of sentences is joined, as training joined it), as the
    translation/summarization pipeline of ``lightning_ft.seq2seq_pipeline`` generates it: the model config's
    ``prefix`` (the training ``source_prefix``) first, cut at the tokenizer's ``model_max_length`` (the training
    ``max_source_length``), generated with the model's generation config (the task's ``num_beams``,
    ``max_new_tokens``...) unless ``max_new_tokens``/``num_beams`` are given."""
    prefix = getattr(model.config, "prefix", None) or ""
    sources = [" ".join(map(str, v)) if isinstance(v, list) else str(v) for v in (row[column] for row in rows)]
    encoding = tokenizer([prefix + source for source in sources], truncation=True, padding=True, return_tensors="pt")
    settings = {k: v for k, v in {"max_new_tokens": max_new_tokens, "num_beams": num_beams}.items() if v is not None}
    generated = model.generate(input_ids=encoding["input_ids"].to(model.device),
                               attention_mask=encoding["attention_mask"].to(model.device), **settings)
    return [{"generated_text": text.strip()}
            for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
