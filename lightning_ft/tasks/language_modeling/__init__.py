"""Causal-LM (GPT-style) and masked-LM (BERT-style) pretraining or continued pretraining, as the HF ``run_clm`` and
``run_mlm`` examples do them.

Data: plain-text files (one document a line, or a blank-line separated paragraph with ``documents=paragraph``; gz
allowed), rows with a ``text_column`` (jsonl, csv...), or a hub dataset. Documents are tokenized and packed into
``block_size`` blocks (``group_texts``, the remainder of each batch of 1,000 documents dropped, as in the examples), or
kept one a row (``line_by_line``, cut to ``block_size``). Causal LM ends every document with the eos token, so the
model learns where documents end. Masked LM masks ``mlm_probability`` of the tokens with the 80/10/10 rule
(optionally whole words) afresh for every training batch; validation and test are masked once, with ``seed``, so
their perplexity is comparable from epoch to epoch and run to run.

``document_attention=isolated`` keeps packed documents from attending to one another: position ids restart at each
document and no attention mask is passed, which transformers turns into a block-diagonal mask for the models that
support it (GPT-2, Llama...). The module checks that the backbone does (same logits packed as alone) and refuses one
that does not (e.g. BERT).

``streaming=true`` reads the files as a ``datasets`` iterable dataset that is never loaded into memory: each DDP
rank reads its share (``split_dataset_by_node``: whole files when there are enough, else every N-th document), each
loader worker a share of that, and the training stream repeats, so ``trainer.max_steps`` sets the length.

Metric: perplexity = exp(summed token loss / token count) over the whole split, each example counted once under DDP."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from lightning_ft.tasks.language_modeling.data import LanguageModelingData
from lightning_ft.tasks.language_modeling.model import LanguageModelingTask
from lightning_ft.tasks.language_modeling.predict import (
    ContinueOptions,
    FillOptions,
    check_masked_rows,
    predict_continuations,
    predict_masks,
)
from lightning_ft.tasks.spec import Prediction, TaskSpec

CLM = TaskSpec(
    name="clm",
    aliases=("causal_lm",),
    module=LanguageModelingTask,
    data=LanguageModelingData,
    hparams={"objective": "clm"},
    auto_class=AutoModelForCausalLM,
    architectures=("ForCausalLM", "LMHeadModel"),
    encoder_decoder=False,
    pipeline="text-generation",
    prediction=Prediction(
        title="causal language modelling (task=clm)", rows=predict_continuations, options=ContinueOptions,
        noun="prompts", verb="continue", past="continued",
    ),
)
MLM = TaskSpec(
    name="mlm",
    aliases=("masked_lm",),
    module=LanguageModelingTask,
    data=LanguageModelingData,
    hparams={"objective": "mlm"},
    auto_class=AutoModelForMaskedLM,
    architectures=("ForMaskedLM",),
    pipeline="fill-mask",
    prediction=Prediction(
        title="masked language modelling (task=mlm)", rows=predict_masks, options=FillOptions, noun="texts",
        verb="fill", past="filled", check=check_masked_rows,
    ),
)
