"""Padding-free batches for the encoder tasks: a batch's examples packed into rows of up to ``max_length`` tokens.

A packed batch holds the same examples a padded one would (a random draw, in the same order), laid out several to
a row: position ids restart at each example and a block-diagonal 4D attention mask (causal within each block for a
decoder) keeps every example from seeing the others. What the model reads per example comes back in the batch's
example order (``unpack``), so losses and metrics see exactly the examples of the padded batch.

Batch keys of a packed batch, besides the model inputs (``input_ids``, ``token_type_ids``, ``position_ids``, and
per-token ``labels`` for token tasks, all rows x width):

- ``segment_ids`` (rows x width): 0 for padding, k for the k-th example of the row;
- ``example_rows``, ``example_starts``, ``example_lengths`` (one per example): where each example lies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_ft.errors import UserError

LAYOUT_KEYS = ("segment_ids", "example_rows", "example_starts", "example_lengths")


def is_packed(batch: dict) -> bool:
    return "segment_ids" in batch


def batch_examples(batch: dict) -> int:
    """How many rows of its split a batch holds, packed or not (a similarity row packs two or three texts, a
    multiple-choice row one text per choice: one label each)."""
    if "row_index" in batch:
        return len(batch["row_index"])
    if not is_packed(batch):
        return len(batch["input_ids"])
    labels = batch.get("labels")
    return len(labels) if isinstance(labels, torch.Tensor) and labels.dim() == 1 else len(batch["example_rows"])


# A packed row of width w costs about w * (1 + w / ROW_ATTENTION_WIDTH) positions' work: the linear layers grow with its
# width, attention over its block-diagonal mask (SDPA computes the whole row's square) with its width squared.
# Measured (benchmarks/RESULTS.md, 2026-12-06): MiniLM on CoNLL batches under bf16 on 2 CPU cores ran a step 13%
# faster in rows as narrow as the batch's longest example than in the fewest row positions (4% more positions), and
# the layouts this picks with 128, 256 or 512 here ran at the same speed.
ROW_ATTENTION_WIDTH = 256


def layout(lengths: list[int], capacity: int, multiple_of: int | None = None) -> list[list[int]]:
    """Rows of example indices for one batch, first fit (longest first) at the row width of the least work
    (``ROW_ATTENTION_WIDTH``): from the longest example's width (rounded up to ``multiple_of``) up to ``capacity``,
    stopping where no wider row can cost less. Narrow rows with a little padding beat fewer, wider rows."""
    step = multiple_of or 1

    def rounded(width: int) -> int:
        return min(capacity, -(-width // step) * step)

    def work(rows: int, width: int) -> float:
        return rows * width * (1 + width / ROW_ATTENTION_WIDTH)

    if not lengths:
        return []
    total = sum(lengths)
    best, least = None, float("inf")
    width = rounded(max(lengths))
    # A layout first fit makes within w whose widest row is narrower was already found at that width (first fit
    # decides the same), so a new one is w wide and holds at least `total` positions: past the w where that bound
    # passes the least work found, nothing wider can win.
    while best is None or (width <= capacity and total * (1 + width / ROW_ATTENTION_WIDTH) < least):
        rows = first_fit(lengths, width)
        cost = work(len(rows), _width(rows, lengths, step, capacity))
        if cost < least:
            best, least = rows, cost
        if width >= capacity:
            break
        width = rounded(width + step)
    return best


def _width(rows: list[list[int]], lengths: list[int], step: int, capacity: int) -> int:
    return min(capacity, -(-max(sum(lengths[i] for i in row) for row in rows) // step) * step)


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of example indices, each row's lengths summing to at most ``capacity`` (first fit, longest first): for
    a batch of a few dozen examples within a row's capacity, within one row of the fewest possible."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def pack_batch(batch: dict[str, torch.Tensor], capacity: int, token_keys: tuple[str, ...], pad_id: int,
               multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """A padded batch (each example a row, its real tokens where ``attention_mask`` is 1, on either side) repacked
    into rows of up to ``capacity`` tokens, laid out by ``layout``. ``token_keys`` are the per-token entries to pack
    (``input_ids``, ``token_type_ids``, a token task's ``labels``); every other entry stays one per example."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(-1).tolist()
    if max(lengths, default=0) > capacity:
        raise ValueError(f"an example of {max(lengths)} tokens does not fit a packed row of {capacity}")
    rows = layout(lengths, capacity, multiple_of)
    width = _width(rows, lengths, multiple_of or 1, capacity) if rows else 1
    fill = {key: (pad_id if key == "input_ids" else -100 if key == "labels" else 0) for key in token_keys}
    packed = {key: torch.full((len(rows), width), fill[key], dtype=batch[key].dtype) for key in token_keys
              if key in batch}
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segments = torch.zeros(len(rows), width, dtype=torch.long)
    example_rows, example_starts = [0] * len(lengths), [0] * len(lengths)
    for r, members in enumerate(rows):
        start = 0
        for k, i in enumerate(members, 1):
            n = lengths[i]
            for key in packed:
                packed[key][r, start:start + n] = batch[key][i][mask[i]]
            positions[r, start:start + n] = torch.arange(n)
            segments[r, start:start + n] = k
            example_rows[i], example_starts[i] = r, start
            start += n
    out = {key: value for key, value in batch.items() if key not in packed and key != "attention_mask"}
    return {**out, **packed, "position_ids": positions, "segment_ids": segments,
            "example_rows": torch.tensor(example_rows), "example_starts": torch.tensor(example_starts),
            "example_lengths": torch.tensor(lengths)}


def probe_ids(config: Any, count: int) -> list[int]:
    """``count`` small token ids that are none of the model's special tokens: the packing checks' examples."""
    special = {getattr(config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id",
                                                   "decoder_start_token_id")}
    return [i for i in range(3, 3 + count + len(special)) if i not in special][:count]


def padded(examples: list[list[int]], fill: int = 0) -> torch.Tensor:
    """Examples of token ids as one right-padded row each."""
    width = max(map(len, examples))
    return torch.tensor([x + [fill] * (width - len(x)) for x in examples])


def attention_mask(model: Any, segments: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask (rows x 1 x width x width) that confines attention to each example (padding sees padding only,
    so no query row is empty), in the form the model's attention takes: booleans for SDPA, additive for eager."""
    allowed = segments[:, :, None] == segments[:, None, :]
    if causal:
        allowed &= torch.ones_like(allowed[0]).tril()
    return _as_model_mask(model, allowed[:, None], dtype)


def cross_attention_mask(model: Any, query_segments: torch.Tensor, key_segments: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask (rows x 1 x queries x keys) of an encoder-decoder's cross-attention on packed rows: each
    decoder example sees its own source only. A padding query sees every key: a row full of sources has no
    padding key, and under SDPA a query that sees no key gives NaN (its output is never read)."""
    allowed = (query_segments[:, :, None] == key_segments[:, None, :]) | (query_segments == 0)[:, :, None]
    return _as_model_mask(model, allowed[:, None], dtype)


def _as_model_mask(model: Any, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise UserError(f"dataset.packing=true needs the backbone's attention to take a 4D mask (sdpa or eager), not "
                    f"{implementation}: set dataset.packing=false.")


def unpack(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-token values of packed rows (rows x width x ...) as one row per example (examples x longest x ...),
    in the batch's example order; positions past an example's end are zero."""
    lengths = batch["example_lengths"]
    longest = int(lengths.max()) if len(lengths) else 0
    offsets = torch.arange(longest, device=values.device)
    columns = (batch["example_starts"][:, None].to(values.device) + offsets).clamp(max=values.shape[1] - 1)
    out = values[batch["example_rows"].to(values.device)[:, None], columns]
    inside = (offsets[None, :] < lengths[:, None].to(values.device))
    return out * inside.view(*inside.shape, *([1] * (values.dim() - 2))).to(out.dtype)


def gather(values: torch.Tensor, batch: dict, last: bool = False) -> torch.Tensor:
    """Each example's first token's values (its last's with ``last``): examples x ..."""
    columns = batch["example_starts"] + (batch["example_lengths"] - 1 if last else 0)
    return values[batch["example_rows"].to(values.device), columns.to(values.device)]


@contextmanager
def first_tokens_to_head(base: Any, layout: dict[str, torch.Tensor]) -> Iterator[None]:
    """While open, ``base``'s encoder stack returns one row per example, its first token (examples x 1 x hidden):
    a head that reads position 0 of the encoder's output (BERT's pooler, RoBERTa's classifier) then runs unchanged,
    once per example."""
    stack = getattr(base, "encoder", None) or getattr(base, "transformer", None)
    if stack is None:
        raise UserError(f"dataset.packing=true does not know the layer stack of {type(base).__name__}: set "
                        "dataset.packing=false.")

    def first_tokens(module: Any, args: Any, output: Any) -> Any:
        hidden = gather(output[0], layout)[:, None]
        return (hidden, *output[1:]) if isinstance(output, tuple) else type(output)(last_hidden_state=hidden)

    handle = stack.register_forward_hook(first_tokens)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def is_causal(model: Any) -> bool:
    """Whether the model's tokens see only those before them: its first token's output does not change when a
    token is added after it."""
    ids = torch.tensor([[5, 6, 7, 8]], device=next(model.parameters()).device)
    base = getattr(model, model.base_model_prefix, model)
    short = base(input_ids=ids[:, :3]).last_hidden_state[0, 0]
    full = base(input_ids=ids).last_hidden_state[0, 0]
    return bool(torch.allclose(short, full, atol=1e-5))


def position_offset(model: Any) -> int:
    """The position id of an example's first token: RoBERTa-style embeddings (RoBERTa, XLM-R, MPNet) number positions
    from their padding id + 1, others from 0."""
    embeddings = getattr(getattr(model, model.base_model_prefix, model), "embeddings", None)
    padding = getattr(embeddings, "padding_idx", None)
    return padding + 1 if isinstance(padding, int) else 0
