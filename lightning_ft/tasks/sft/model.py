"""The model: a causal LM tuned on the answers; answer-token perplexity, generated answers scored at corpus level."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torchmetrics import MetricCollection
from transformers import AutoModelForCausalLM

from lightning_ft import chunked_loss as chunked
from lightning_ft.backbones import evaluating
from lightning_ft.errors import UserError
from lightning_ft.metrics.generation import RougeScores
from lightning_ft.metrics.language_modeling import Perplexity
from lightning_ft.tasks.base import TaskModule
from lightning_ft.tasks.language_modeling.model import isolates_packed_documents, score_tokens
from lightning_ft.tasks.language_modeling.predict import generate_left_padded, positions

log = logging.getLogger(__name__)

GSM8K_ANSWER = r"####\s*(-?[$0-9.,]+)"  # GSM8K's final line: "#### 1,000"


def final_answer(text: str, pattern: re.Pattern) -> str | None:
    """The last answer ``pattern`` finds in ``text`` (its first group, else the match), commas, a dollar sign and a
    trailing full stop stripped, and a number written one way (``18.0`` and ``18`` are one answer); None if none."""
    found = list(pattern.finditer(text))
    if not found:
        return None
    match = found[-1]
    answer = (match.group(1) if match.groups() else match.group(0)).replace(",", "").replace("$", "").strip()
    answer = answer.rstrip(".")
    try:
        number = float(answer)
    except ValueError:
        return answer
    return str(int(number)) if number.is_integer() else str(number)


class InstructionTuningTask(TaskModule):
    """A decoder LM tuned on conversations or prompt/completion pairs, the loss on the answers.

    Evaluation: loss and perplexity over the answer tokens of the split; then answers generated (greedy by default)
    for the first ``generate_limit`` validation prompts (``test_generate_limit`` at test), printed and written to
    ``predictions_<stage>.json``, scored by ROUGE-L and, where the references hold an answer ``answer_pattern``
    finds (GSM8K's ``#### <number>``), the exact match of that final answer. Each prompt is generated in the same
    batch of ``generate_batch_size`` whatever the number of ranks, so the scores are equal under 1 and 2 ranks.

    Args:
        packing, max_length, end_of_turn, stop_token_ids, vocab_size, chat_template: from the data
            (``head_kwargs``).
        train_on_prompt: read by the data (``dataset.train_on_prompt`` follows ``task.train_on_prompt``).
        generate_limit, test_generate_limit: prompts generated for at each validation / at test (null: all).
        max_new_tokens, do_sample, temperature, top_p: generation settings, kept in the export's generation
            config.
        answer_pattern: a regular expression for the final answer (its first group); null: no exact match.
        show_examples: generated answers printed after each evaluation.
        chunked_loss: the training loss computed chunk by chunk over the answer tokens only, without the full
            logits (``lightning_ft.chunked_loss``); false (default): off, null: where the backbone allows it,
            true: required.
    """

    auto_class = AutoModelForCausalLM
    default_monitor = ("val/loss", "min")

    def __init__(
        self,
        *,
        packing: bool | None = None,
        max_length: int | None = None,
        end_of_turn: str | None = None,
        stop_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
        vocab_size: int | None = None,
        chat_template: str | None = None,
        train_on_prompt: bool = False,
        generate_limit: int | None = 5,
        test_generate_limit: int | None = 20,
        generate_batch_size: int = 8,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        answer_pattern: str | None = GSM8K_ANSWER,
        show_examples: int = 3,
        chunked_loss: bool | None = False,
        **kwargs: Any,
    ) -> None:
        for key, value in (("generate_limit", generate_limit), ("test_generate_limit", test_generate_limit)):
            if value is not None and value < 0:
                raise UserError(f"task.{key}={value} is negative: give a number of prompts (0: none, null: all).")
        if generate_batch_size < 1 or max_new_tokens < 1:
            raise UserError("task.generate_batch_size and task.max_new_tokens must be at least 1.")
        try:
            self.answer_pattern = re.compile(answer_pattern) if answer_pattern else None
        except re.error as err:
            raise UserError(f"task.answer_pattern {answer_pattern!r} is not a regular expression ({err}).") from err
        self._vocab_size = vocab_size  # read by adjust_model, during the base's set-up
        super().__init__(**kwargs)
        self.answers_shown = show_examples
        self.generate_limit = generate_limit
        self.test_generate_limit = test_generate_limit
        self.generate_batch_size = generate_batch_size
        self.chat_template = chat_template
        self.end_of_turn = end_of_turn
        limit = positions(self.model.config)
        if max_length and limit and max_length > limit:
            raise UserError(f"dataset.max_length={max_length} is more than the {limit} positions of backbone "
                            f"{self.model.config.model_type}: lower dataset.max_length to at most {limit}.")
        isolates = isolates_packed_documents(self.model)
        if packing and not isolates:
            raise UserError(f"backbone {self.model.config.model_type} does not keep packed examples apart (its "
                            "attention ignores restarting position ids): set dataset.packing=false.")
        self.packing = isolates if packing is None else bool(packing)  # the data's loaders read it
        log.info("batches: %s", "packed (examples isolated by position ids)" if self.packing else "padded")
        stops = list(dict.fromkeys(stop_token_ids or [])) or None
        self.model.generation_config.update(
            eos_token_id=stops, pad_token_id=pad_token_id, max_new_tokens=max_new_tokens, do_sample=do_sample,
            **({"temperature": temperature, "top_p": top_p} if do_sample else {"temperature": None, "top_p": None,
                                                                                  "top_k": None}))
        self.chunked_loss = chunked.resolve(self.model, chunked_loss)
        self.rouge = RougeScores(sync_on_compute=False)  # fed every rank's answers: no sync

    def adjust_model(self, model: Any) -> None:
        """Grow the embeddings for the chat markers the data added to a tokenizer that lacked them."""
        embeddings = model.get_input_embeddings().num_embeddings
        if self._vocab_size and self._vocab_size > embeddings:
            log.info("embeddings resized from %d to %d tokens for the chat template's markers (new rows train)",
                     embeddings, self._vocab_size)
            model.resize_token_embeddings(self._vocab_size)

    def make_metrics(self, prefix: str) -> MetricCollection:
        return MetricCollection({"perplexity": Perplexity()}, prefix=prefix)

    def forward(self, **inputs: Any) -> Any:
        # No cache: training does not use one, and with one transformers would not read packed examples from the
        # position ids.
        return super().forward(**inputs, use_cache=False)

    # ---- evaluation --------------------------------------------------------------------------------------------
    def _eval_step(self, stage: str, batch: dict) -> None:
        score_tokens(self, stage, batch, causal=True)  # the loss and perplexity of the answer tokens

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._answer("val", self.generate_limit)
        self._end_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._answer("test", self.test_generate_limit)
        self._end_evaluation("test")

    def _answer(self, stage: str, limit: int | None) -> None:
        """Generate answers for the first ``limit`` prompts of the split, score and keep them."""
        if limit == 0:
            return
        split = "validation" if stage == "val" else "test"
        prompts = self.data.generation_prompts(split, limit)
        size = self.generate_batch_size
        batches = [prompts[i:i + size] for i in range(0, len(prompts), size)]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        answers: dict[int, str] = {}
        for batch in batches[rank::world]:  # batch k on rank k % world: the same batches under any number of ranks
            answers.update(zip((p["row"] for p in batch), self.generate([p["input_ids"] for p in batch])))
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, answers)
            answers = {row: text for part in gathered for row, text in part.items()}
        predictions, correct, scored = {}, 0, 0
        for prompt in prompts:
            row, reference = prompt["row"], prompt["reference"]
            entry = {"source": prompt["prompt"], "prediction": answers[row], "references": [reference]}
            expected = final_answer(reference, self.answer_pattern) if self.answer_pattern else None
            if expected is not None:
                entry["answer"] = final_answer(answers[row], self.answer_pattern)
                entry["correct"] = entry["answer"] == expected
                scored += 1
                correct += entry["correct"]
            predictions[str(row)] = entry
        self.rouge.update([answers[p["row"]] for p in prompts], [[p["reference"]] for p in prompts])
        values = {f"{stage}/rougeL": self.rouge.compute()["rougeL"], f"{stage}/answered": float(len(prompts))}
        self.rouge.reset()
        if scored:
            values[f"{stage}/exact_match"] = 100.0 * correct / scored
        self.log_dict(values, prog_bar=stage == "val")
        self.predictions[stage] = predictions
        self.examples[stage] = [{"row": int(row), **entry} for row, entry in
                                list(predictions.items())[: self.answers_shown]]
        for example in self.examples[stage]:
            log.info("answer: %r -> %r", example["source"][:200], example["prediction"][:300])

    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> list[str]:
        """The answers to tokenized prompts (left-padded into one batch), as text, the end-of-turn token cut."""
        tokenizer = self.data.tokenizer
        limit = positions(self.model.config)
        room = limit - self.model.generation_config.max_new_tokens if limit else None
        if room is not None and room < 1:
            raise UserError(f"task.max_new_tokens={self.model.generation_config.max_new_tokens} leaves no room for "
                            f"a prompt in the model's {limit} positions: lower it.")
        prompts = [ids[-room:] if room else ids for ids in prompts]  # a prompt too long keeps its end
        with evaluating(self.model):  # seed 0: sampling (do_sample) draws nothing from the training's random state
            out = generate_left_padded(self.model, prompts, tokenizer.pad_token_id, seed=0)
        return [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]
