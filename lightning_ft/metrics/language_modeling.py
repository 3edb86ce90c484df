"""Perplexity over a whole split, from summed token losses."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class Perplexity(Metric):
    """exp(summed token loss / token count): the corpus perplexity, not a mean of batch perplexities.

    torchmetrics' ``Perplexity`` takes the full logits and turns them into probabilities (batch x length x vocabulary:
    800 MB in fp32 for GPT-2's 50k vocabulary at 128 x 32), so this takes each batch's summed loss and token count.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("loss_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loss_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        self.loss_sum += loss_sum.detach().to(torch.float64)
        self.tokens += tokens.detach().long()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.loss_sum / self.tokens.clamp(min=1)).float()
