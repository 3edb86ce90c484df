"""Prediction: continuations of prompts (causal LM) or the fills of each mask token (masked LM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_ft.errors import UserError
from lightning_ft.tasks.spec import column_option, option


# ---- prediction (python -m lightning_ft.predict) -------------------------------------------------------------------
@dataclass
class ContinueOptions:
    """The options of ``python -m lightning_ft.predict`` for a causal LM."""

    column: str = column_option("prompt", "text", help="the prompt column")
    max_new_tokens: int = option(32, "tokens generated after each prompt")
    num_beams: int = option(1, "beam width (1: greedy, or sampling with do_sample)")
    do_sample: bool = option(False, "sample (top-k, seeded) instead of decoding greedily")
    top_k: int = option(50, "sampling: the k most likely tokens")
    temperature: float = option(1.0, "sampling temperature")
    seed: int = option(0, "sampling seed: a rerun gives the same text")


@dataclass
class FillOptions:
    """The options of ``python -m lightning_ft.predict`` for a masked LM."""

    column: str = column_option("text", help="the text column, with the mask token where a token is to be predicted")
    top_k: int = option(5, "fills listed per mask, most likely first")
    max_length: int = option(512, "tokens kept of each text")


def positions(config: Any) -> int | None:
    """The positions a decoder's config allows (GPT-2's ``n_positions``, most others' ``max_position_embeddings``);
    None where it names no limit."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


@torch.no_grad()
def generate_left_padded(model: Any, prompts: list[list[int]], pad: int, seed: int, **settings: Any) -> torch.Tensor:
    """The tokens ``model.generate`` adds to each tokenized prompt, the prompts left-padded into one batch; seeded,
    without touching the caller's random state (sampling draws from its own)."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=model.device)
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
    return generated[:, width:]


@torch.no_grad()
def predict_continuations(model: Any, tokenizer: Any, rows: list[dict], *, column: str, max_new_tokens: int,
                          num_beams: int, do_sample: bool, top_k: int, temperature: float, seed: int) -> list[dict]:
    """A causal LM's ``continuation`` of each row's ``column`` text (the new text only): greedy by default,
    ``do_sample=true`` samples (top-k, seeded, so a rerun gives the same text). Prompts are left-padded into one
    batch; an eos token the tokenizer appends is dropped (a prompt does not end a document), and a prompt longer
    than the model's positions allow keeps its last tokens."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = pad if pad is not None else eos if eos is not None else 0
    limit = positions(model.config)
    if limit and max_new_tokens >= limit:
        raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's {limit} "
                        "positions: lower it.")
    prompts = []
    for row in rows:
        ids = tokenizer(str(row[column]))["input_ids"]
        if len(ids) > 1 and ids[-1] == eos:
            ids = ids[:-1]
        ids = ids or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos]
        prompts.append(ids[-(limit - max_new_tokens):] if limit else ids)
    sampling = {"do_sample": True, "top_k": top_k, "temperature": temperature} if do_sample else {"do_sample": False}
    generated = generate_left_padded(model, prompts, pad, seed, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                     pad_token_id=pad, **sampling)
    return [{"continuation": text} for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]


def check_masked_rows(rows: list[dict], source: Any, tokenizer: Any, *, column: str, **_: Any) -> None:
    """Every text needs the tokenizer's mask token where a word is to be predicted."""
    mask = tokenizer.mask_token
    if mask is None:
        raise UserError("the model's tokenizer has no mask token: it cannot fill masks.")
    for number, row in enumerate(rows, start=1):
        if mask not in str(row[column]):
            raise UserError(f"row {number} of {source} has no {mask} in '{column}': put {mask} where a token is to be "
                            "predicted.")


@torch.no_grad()
def predict_masks(model: Any, tokenizer: Any, rows: list[dict], *, column: str, top_k: int,
                  max_length: int) -> list[dict]:
    """A masked LM's ``top_k`` candidates for every mask token of each row's ``column`` text, in order: ``fills``
    (a list per mask of ``{"token", "score"}``, the score a probability) and ``sequence``, the text with each mask
    replaced by its best candidate."""
    texts = [str(row[column]) for row in rows]
    encoding = tokenizer(texts, truncation=True, padding=True, return_tensors="pt",
                         max_length=min(max_length, tokenizer.model_max_length))
    logits = model(**encoding.to(model.device)).logits.float()
    out = []
    for row, text in enumerate(texts):
        positions = (encoding["input_ids"][row] == tokenizer.mask_token_id).nonzero().flatten()
        best = torch.softmax(logits[row, positions], -1).topk(min(top_k, logits.shape[-1]), dim=-1)
        fills = [[{"token": tokenizer.decode([i]).strip(), "score": p} for p, i in zip(values, indices)]
                 for values, indices in zip(best.values.tolist(), best.indices.tolist())]
        sequence = text
        for candidates in fills:  # masks cut off by max_length have no candidates and stay in the text
            sequence = sequence.replace(tokenizer.mask_token, candidates[0]["token"], 1)
        out.append({"fills": fills, "sequence": sequence})
    return out
