"""The model: a causal or masked LM head; corpus perplexity, sampled continuations of validation prompts."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from lightning_ft import chunked_loss as chunked
from lightning_ft.backbones import evaluating
from lightning_ft.errors import UserError
from lightning_ft.metrics.language_modeling import Perplexity
from lightning_ft.tasks.base import TaskModule
from lightning_ft.tasks.language_modeling.data import OBJECTIVES

log = logging.getLogger(__name__)


def isolates_packed_documents(model: Any, causal: bool = True) -> bool:
    """Whether ``model`` keeps packed documents apart when given restarting position ids and no attention mask:
    a short document's logits packed after another equal its logits alone."""
    vocab = model.get_input_embeddings().num_embeddings
    first, second = torch.arange(5, 10) % vocab, torch.arange(10, 14) % vocab
    extra = {"use_cache": False} if causal else {}
    with evaluating(model):
        alone = model(input_ids=second[None], **extra).logits[0]
        packed = model(input_ids=torch.cat([first, second])[None],
                       position_ids=torch.tensor([[*range(5), *range(4)]]), **extra).logits[0, 5:]
    return torch.allclose(alone.float(), packed.float(), atol=1e-4)


def score_tokens(module: TaskModule, stage: str, batch: dict, causal: bool) -> None:
    """An evaluation step of a language model: the token losses computed once, here (the model returns only their
    mean), counted for the rows this rank owns, into the corpus loss and perplexity (the base's loss metric and the
    task's ``perplexity``). Replaces the base's step and its ``update_metrics``."""
    labels = batch["labels"]
    logits = module(**{k: v for k, v in batch.items() if k != "labels"}).logits
    if causal:  # position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                             reduction="none").view(labels.shape)
    own = module.own_rows(stage, len(labels))  # rows DistributedSampler repeats to even out the ranks come last
    summed, counted = losses[:own].sum(), (labels[:own] != -100).sum()
    module.eval_loss[stage].update(summed / counted.clamp(min=1), counted)  # the mean over every token of the split
    module.metrics[stage]["perplexity"].update(summed, counted)


class LanguageModelingTask(TaskModule):
    """A causal LM (``objective=clm``: GPT-2, Llama...) or masked LM (``objective=mlm``: BERT, RoBERTa...) trained
    on text, scored by corpus perplexity.

    Args:
        objective: ``clm`` or ``mlm`` (the data's ``objective`` follows it in the shipped configs).
        document_attention: from the data; ``isolated`` is checked against the backbone.
        show_examples: causal LM only: continuations of this many validation prompts, printed and logged after
            each validation.
        prompt_tokens, sample_tokens: the prompt length (the first tokens of a validation block) and how many
            tokens each example generates.
        chunked_loss: causal LM only: the training loss computed chunk by chunk without the full logits
            (``lightning_ft.chunked_loss``); false (default): off, null: where the backbone allows it, true: required.
    """

    default_monitor = ("val/perplexity", "min")

    def __init__(
        self,
        *,
        objective: str = "clm",
        document_attention: str = "shared",
        show_examples: int = 3,
        prompt_tokens: int = 16,
        sample_tokens: int = 32,
        chunked_loss: bool | None = False,
        **kwargs: Any,
    ) -> None:
        if objective not in OBJECTIVES:
            raise UserError(f"task.objective '{objective}' is not one of {', '.join(OBJECTIVES)}.")
        self.auto_class = AutoModelForCausalLM if objective == "clm" else AutoModelForMaskedLM
        super().__init__(**kwargs)
        self.objective = objective
        self.show_examples = show_examples if objective == "clm" else 0
        self.prompt_tokens = prompt_tokens
        self.sample_tokens = sample_tokens
        self._prompts: torch.Tensor | None = None  # the first validation blocks, continued after the validation
        if document_attention == "isolated":
            self._check_isolation()
        self.chunked_loss = chunked.resolve(self.model, chunked_loss, causal=objective == "clm")

    def make_metrics(self, prefix: str) -> MetricCollection:
        return MetricCollection({"perplexity": Perplexity()}, prefix=prefix)

    def forward(self, **inputs: Any) -> Any:
        if self.objective == "clm":
            # No cache: it is not used in training, and with one transformers would not read packed documents from
            # the position ids.
            inputs["use_cache"] = False
        return super().forward(**inputs)

    def _check_isolation(self) -> None:
        """Refuse ``isolated`` for a backbone that lets a packed document see the one before it."""
        if not isolates_packed_documents(self.model, causal=self.objective == "clm"):
            raise UserError(
                f"backbone {self.model.config.model_type} does not isolate packed documents (its attention ignores "
                "restarting position ids): use dataset.document_attention=shared, or dataset.packing=line_by_line.")

    def _eval_step(self, stage: str, batch: dict) -> None:
        score_tokens(self, stage, batch, causal=self.objective == "clm")
        if stage == "val" and self._prompts is None and self.show_examples:
            self._prompts = batch["input_ids"][: self.show_examples].detach().cpu()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        prompts, self._prompts = self._prompts, None
        if prompts is not None and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.examples["val"] = self._continuations(prompts)
            for example in self.examples["val"]:
                log.info("sample: %r -> %r", example["source"], example["prediction"])

    def _continuations(self, blocks: torch.Tensor) -> list[dict]:
        """Sampled continuations of each block's first ``prompt_tokens`` tokens (top-k 50, seeded, without
        touching the training random state)."""
        tokenizer = self.data.tokenizer
        prompts = blocks[:, : self.prompt_tokens].to(self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                evaluating(self.model):
            torch.manual_seed(0)
            generated = self.model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                            do_sample=True, top_k=50, max_new_tokens=self.sample_tokens,
                                            pad_token_id=tokenizer.pad_token_id)
        width = self.prompt_tokens
        return [{"row": row, "source": tokenizer.decode(prompts[row], skip_special_tokens=True),
                 "prediction": tokenizer.decode(generated[row, width:], skip_special_tokens=True),
                 "references": [tokenizer.decode(blocks[row, width:width + self.sample_tokens],
                                                 skip_special_tokens=True)]}
                for row in range(len(prompts))]
