"""Instruction tuning of decoder LMs (supervised fine-tuning, as TRL's ``SFTTrainer`` does it): conversations or
prompt/completion rows, rendered with the tokenizer's chat template, the loss on the assistant turns only.

Data: ``messages`` rows (``{role, content}`` turns, an optional system turn first), prompt/completion rows (column
names configurable), or ``str.format`` templates over any columns (GSM8K: ``{question}`` -> ``{answer}``); from
jsonl/csv/parquet files or a hub dataset. Each assistant turn's tokens are found from the rendered template's
character offsets (the conversation rendered up to the turn and through it), never by searching for a response
string; every turn ends with the template's end-of-turn token (ChatML's ``<|im_end|>``), or the eos token where
the template has none, so the tuned model stops. Truncated examples, and those left with no answer token (left
out), are counted in ``metrics.json``.

Packing (``dataset.packing``; null: where the backbone isolates packed examples, which the task checks on the
model): examples are packed whole into rows of ``max_length`` (best-fit decreasing), position ids restarting at each
example and no attention mask, which transformers turns into a block-diagonal mask; the first label of each example
is masked, so no example learns to predict the next. Otherwise batches are padded per batch (length-grouped).

Evaluation: answer-token loss and perplexity; greedy answers to a capped number of prompts, scored by ROUGE-L and,
for GSM8K-style references, by the exact match of the final answer (``task.answer_pattern``). The export keeps the
chat template, and its ``generation_config.json`` stops at the end-of-turn token: ``pipeline("text-generation")``
answers a list of messages and stops."""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from lightning_ft.tasks.sft.data import InstructionData
from lightning_ft.tasks.sft.model import InstructionTuningTask
from lightning_ft.tasks.sft.predict import RespondOptions, check_prompts, from_module, predict_responses
from lightning_ft.tasks.spec import Prediction, TaskSpec

SPEC = TaskSpec(
    name="sft",
    aliases=("instruction_tuning", "chat"),
    module=InstructionTuningTask,
    data=InstructionData,
    auto_class=AutoModelForCausalLM,
    architectures=("ForCausalLM", "LMHeadModel"),
    encoder_decoder=False,
    chat=True,  # a causal LM with a chat template answers (an instruct model from elsewhere too), else it is clm's
    pipeline="text-generation",
    prediction=Prediction(
        title="instruction tuning (task=sft)", rows=predict_responses, options=RespondOptions, noun="prompts",
        verb="answer", past="answered", check=check_prompts, from_module=from_module,
    ),
)
