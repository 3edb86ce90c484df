"""Prediction: the model's answer to each prompt or conversation, rendered with its chat template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_ft.errors import UserError
from lightning_ft.tasks.language_modeling.predict import generate_left_padded
from lightning_ft.tasks.sft.data import add_chat_markers, check_conversation
from lightning_ft.tasks.spec import column_option, option


@dataclass
class RespondOptions:
    """The options of ``python -m lightning_ft.predict`` for an instruction-tuned model."""

    column: str = column_option("messages", "prompt", "question", "text",
                                help="the prompt (text) or conversation (a list of {role, content} turns) column")
    system_prompt: str = option("", "a system turn put before each prompt that has none")
    max_new_tokens: int = option(256, "the longest answer, in tokens")
    do_sample: bool = option(False, "sample instead of decoding greedily")
    temperature: float = option(1.0, "sampling temperature")
    seed: int = option(0, "sampling seed: a rerun gives the same text")


def conversation_of(value: Any, system_prompt: str) -> list[dict]:
    """A prompt as turns: a text is one user turn; a conversation ending in an assistant turn is asked for its
    next answer after the last user turn (the assistant's last answer left out)."""
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else [dict(t) for t in value]
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if system_prompt and messages and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def check_prompts(rows: list[dict], source: Any, tokenizer: Any, *, column: str, **_: Any) -> None:
    """Every row holds a text or a conversation that ends with a user turn."""
    for number, row in enumerate(rows, start=1):
        value = row[column]
        if isinstance(value, str):
            continue
        problem = check_conversation(list(value) + [{"role": "assistant", "content": ""}]) \
            if isinstance(value, list) and value and value[-1].get("role") == "user" else check_conversation(value)
        if problem:
            raise UserError(f"row {number} of {source}: {problem}: give a text, or turns ending with a user turn.")


@torch.no_grad()
def predict_responses(model: Any, tokenizer: Any, rows: list[dict], *, column: str, system_prompt: str,
                      max_new_tokens: int, do_sample: bool, temperature: float, seed: int) -> list[dict]:
    """Each row's ``response``: the prompt rendered with the chat template and its generation prompt, answered with
    the model's generation settings (it stops at the end-of-turn token its export names)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the model's tokenizer has no chat template: export it from a task=sft run, or set one in "
                        "its tokenizer_config.json.")
    prompts = [tokenizer.apply_chat_template(conversation_of(row[column], system_prompt), tokenize=False,
                                             add_generation_prompt=True) for row in rows]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
    out = generate_left_padded(model, encoded, pad, seed, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
    return [{"response": text.strip()} for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


def from_module(module: Any, tokenizer: Any) -> Any:
    """A checkpoint's model, its tokenizer given the chat template (and ChatML markers) the run trained with."""
    if module.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = module.chat_template
    add_chat_markers(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return module.model.eval()
