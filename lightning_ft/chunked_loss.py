"""A causal LM's training loss without its full logits: the output layer and the cross-entropy, chunk by chunk.

A causal LM's logits are the largest tensors of a training step: ``tokens x vocabulary`` floats (SmolLM2: 4 x 256
tokens x 49,152 = 200 MB in fp32), held with their log-softmax for backward and joined by their gradient, about 4
copies at once; with gradient checkpointing the layers' activations shrink but they do not. Here the output layer
and the loss run over a chunk of tokens at a time (``CHUNK_ELEMENTS`` logits), and each chunk's gradients (with
respect to the hidden states and the output weight) are computed in the forward pass, so no chunk's logits outlive
it, and nothing is recomputed. Only the labelled positions are scored: instruction tuning's prompt tokens cost no
output-layer work at all.

Written here because the libraries that fuse the output layer with the loss (Liger Kernel, Apple's
cut-cross-entropy) are Triton kernels for CUDA; this runs on any device.

Off by default (``task.chunked_loss=false``): measured on SmolLM2-135M, 4 x 256 tokens a step, fp32 on 2 CPU cores
(benchmarks/RESULTS.md, 2026-12-03), it trained at 0.89-0.95x the speed of the model's own loss and its peak resident
memory was within 5% of it either way: on this machine glibc's allocator, not the logits, sets the peak. Not yet
measured on a GPU, nor on instruction tuning, where skipping the prompt tokens should count most.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_ft.backbones import evaluating
from lightning_ft.errors import UserError

CHUNK_ELEMENTS = 2**23  # logits per chunk: 32 MB in fp32 (170 tokens of a 49k vocabulary)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` (every label valid), its gradients computed
    chunk by chunk in the forward pass and scaled by the incoming gradient in the backward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk: int) -> torch.Tensor:
        count = len(labels)
        grad_hidden = torch.empty_like(hidden)
        accumulated = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=accumulated) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for start in range(0, count, chunk):
            states, targets = hidden[start:start + chunk], labels[start:start + chunk]
            logits = states @ weight.T  # under autocast, the matmul in its dtype; the softmax in fp32 at least
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            normaliser = logits.logsumexp(-1)
            total += (normaliser - logits.gather(1, targets[:, None]).squeeze(1)).sum()
            gradient = logits.sub_(normaliser[:, None]).exp_()  # the softmax, in place of the logits
            gradient[torch.arange(len(targets), device=targets.device), targets] -= 1
            gradient = gradient.div_(count).to(weight.dtype)
            grad_hidden[start:start + chunk] = gradient @ weight
            if grad_weight is not None:
                grad_weight += (gradient.T @ states.to(weight.dtype)).to(accumulated)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad).to(ctx.weight_dtype), None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """The mean next-token cross-entropy of the logits ``hidden @ weight.T`` over the labels that are not -100,
    as ``F.cross_entropy(logits, labels, ignore_index=-100)`` gives it (0, with zero gradients, where none is
    labelled), without holding more than ``chunk_elements`` logits at once. ``hidden`` and ``labels`` are already
    aligned (position t's hidden state with token t + 1's label)."""
    kept = labels.reshape(-1) != -100
    states, targets = hidden.reshape(-1, hidden.shape[-1])[kept], labels.reshape(-1)[kept]
    if not len(targets):
        return hidden.sum() * 0.0
    chunk = max(1, chunk_elements // weight.shape[0])
    return _LinearCrossEntropy.apply(states, weight, targets, chunk)


def skips_logits(model: Any) -> bool:
    """Whether ``model``'s logits are exactly its decoder's last hidden state times its output weight (no bias, no
    logit scaling or soft-capping), checked on a short input, so that its loss can be computed without them."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    if decoder is None or decoder is model or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    ids = (torch.arange(6, device=head.weight.device) % head.weight.shape[0])[None]
    with evaluating(model):
        logits = model(input_ids=ids, use_cache=False).logits
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
    return torch.allclose((hidden @ head.weight.T).float(), logits.float(), atol=1e-4)


def causal_lm_loss(model: Any, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """The next-token loss of ``model`` (one that ``skips_logits``) on ``inputs``, as its own ``loss`` with these
    labels, computed by ``linear_cross_entropy``."""
    hidden = model.get_decoder()(**inputs).last_hidden_state
    return linear_cross_entropy(hidden[:, :-1], model.get_output_embeddings().weight, labels[:, 1:])


def resolve(model: Any, requested: bool | None, causal: bool = True) -> bool:
    """``task.chunked_loss``: false (the tasks' default) computes the logits as the model does, null uses the
    chunked loss where the backbone allows it, true requires it."""
    if requested is False:
        return False
    if requested and not causal:
        raise UserError("task.chunked_loss=true is for causal LMs (task.objective=clm): set task.chunked_loss=null.")
    if causal and skips_logits(model):
        return True
    if requested:
        raise UserError(
            f"task.chunked_loss=true needs logits that are the decoder's output times the output weight, and backbone "
            f"{model.config.model_type} adds a bias, scales or caps them: set task.chunked_loss=null or false.")
    return False
