"""Token-budget training batches (``dataset.max_tokens``): a batch holds up to N tokens rather than N examples.

Every task's loss is a mean over its batch's examples (or, for token tasks, over its labelled tokens), so a step's
gradient has the same scale whether the batch holds 40 short examples or 6 long ones: the learning rate means the
same thing for every batch. What changes with the budget is how many examples a step sees, not how hard it pushes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch.utils.data import Sampler

from lightning_ft.errors import UserError

# An epoch's batches hold at least one example each when the budget is at least this many longest examples
# (``TokenBudgetBatches``: a share of T/B tokens then always exceeds the longest example).
BUDGET_EXAMPLES = 3


def example_tokens(data: Any, columns: tuple[str, ...]) -> list[int]:
    """Each row's tokens over ``columns`` (a list of ids per row, or a list of lists: multiple choice's choices)."""
    table = data.with_format("arrow")
    total = np.zeros(len(data), dtype=np.int64)
    for name in columns:
        column = table[name]
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        if pa.types.is_list(column.type.value_type) or pa.types.is_large_list(column.type.value_type):
            inner = column.flatten()  # one entry per choice: its length added to its row's total
            total += np.bincount(pc.list_parent_indices(column).to_numpy(),
                                 weights=pc.list_value_length(inner).to_numpy(), minlength=len(data)).astype(np.int64)
        else:
            total += pc.list_value_length(column).to_numpy(zero_copy_only=False)
    return total.tolist()


def check_budget(max_tokens: int | None, max_length: int) -> None:
    """Refuse a budget that is not a whole number or too small for ``max_length`` examples, before any data is read."""
    if max_tokens is None:
        return
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise UserError(f"dataset.max_tokens={max_tokens!r} is not a whole number of tokens: give e.g. "
                        f"dataset.max_tokens={BUDGET_EXAMPLES * 8 * max_length}, or null for batches of "
                        "dataset.batch_size examples.")
    if max_tokens < BUDGET_EXAMPLES * max_length:
        raise UserError(f"dataset.max_tokens={max_tokens} is less than {BUDGET_EXAMPLES} examples of "
                        f"dataset.max_length={max_length} tokens: give dataset.max_tokens="
                        f"{BUDGET_EXAMPLES * max_length} or more (or a smaller dataset.max_length).")


class TokenBudgetBatches(Sampler[list[int]]):
    """The training batches of an epoch, each a list of row indices holding at most ``max_tokens`` tokens.

    The rows come in ``order``'s sequence (``EpochShuffle``: shuffled, or grouped by length), cut into the same
    number of batches every epoch: B = ceil(T / (max_tokens - L)) for T tokens in all and L in the longest row, and
    batch k takes the rows whose first token falls in the k-th of B equal shares of the epoch's tokens. A batch then
    holds under T/B + L <= max_tokens tokens, and never none (T/B > L when the budget is at least three rows of L).
    A greedy cut (fill each batch until the next row does not fit) would give a number of batches that changes
    with every shuffle, which the learning-rate schedule, Lightning's epoch length and an exact resume (both count
    batches per epoch) cannot follow.
    """

    def __init__(self, order: Sampler[int], lengths: list[int], max_tokens: int) -> None:
        self.order, self.lengths, self.max_tokens = order, np.asarray(lengths, dtype=np.int64), max_tokens
        self.total = int(self.lengths.sum())
        longest = int(self.lengths.max()) if len(self.lengths) else 0
        if max_tokens < BUDGET_EXAMPLES * longest:
            raise UserError(f"dataset.max_tokens={max_tokens} holds fewer than {BUDGET_EXAMPLES} of the longest "
                            f"training example ({longest} tokens): give dataset.max_tokens="
                            f"{BUDGET_EXAMPLES * longest} or more.")
        self.batches = max(1, -(-self.total // (max_tokens - longest))) if self.total else 0

    def set_epoch(self, epoch: int) -> None:  # Lightning sets the epoch on the loader's sampler: pass it on
        self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.batches:
            return iter([])
        rows = np.fromiter(iter(self.order), dtype=np.int64, count=len(self.lengths))
        starts = np.cumsum(self.lengths[rows]) - self.lengths[rows]
        share = starts * self.batches // self.total  # which of the B equal shares each row's first token is in
        edges = np.searchsorted(share, np.arange(1, self.batches), side="left")
        return (part.tolist() for part in np.split(rows, edges))

    def __len__(self) -> int:
        return self.batches
