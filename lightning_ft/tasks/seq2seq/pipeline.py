"""``transformers.pipeline("translation" | "summarization")`` for exported encoder-decoder models.

transformers 5.3 removed these pipelines (with "question-answering", huggingface/transformers#43325). Importing
``lightning_ft.pipelines`` registers them again under the same names, with the old output format
(``[{"translation_text": ...}]``, ``[{"summary_text": ...}]``). Text is prepared as the task prepared it: the model
config's ``prefix`` (the ``source_prefix`` the model trained with) is put first and inputs are cut at the
tokenizer's ``model_max_length`` (the training ``max_source_length``). Generation uses the model's generation
config, which the export wrote from the task's settings (``num_beams``, ``max_new_tokens``...), so the pipeline
generates what the module generated; keyword arguments of a call (``num_beams=1``...) go to ``generate``.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForSeq2SeqLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY


class Seq2SeqPipeline(Pipeline):
    """Generate text from text with an encoder-decoder; ``output_key`` names the result's field."""

    _load_tokenizer = True
    output_key = "generated_text"

    def _sanitize_parameters(self, truncation: bool | None = None, **generate_kwargs: Any):
        return ({} if truncation is None else {"truncation": truncation}), generate_kwargs, {}

    def __call__(self, inputs: str | list[str], **kwargs: Any):
        results = super().__call__(inputs, **kwargs)
        # As the old pipelines did: one dict per input text when a list is given.
        if isinstance(inputs, list) and all(len(r) == 1 for r in results):
            return [r[0] for r in results]
        return results

    def preprocess(self, text: str, truncation: bool = True) -> dict:
        prefix = getattr(self.model.config, "prefix", None) or ""
        encoding = self.tokenizer(prefix + text, truncation=truncation, return_tensors="pt")
        # Only what an encoder-decoder takes: generate refuses a BERT-style tokenizer's token_type_ids.
        return {k: encoding[k] for k in ("input_ids", "attention_mask")}

    def _forward(self, inputs: dict, **generate_kwargs: Any) -> dict:
        return {"ids": self.model.generate(**inputs, **generate_kwargs)}

    def postprocess(self, outputs: dict) -> list[dict]:
        texts = self.tokenizer.batch_decode(outputs["ids"], skip_special_tokens=True)
        return [{self.output_key: text.strip()} for text in texts]


class TranslationPipeline(Seq2SeqPipeline):
    output_key = "translation_text"


class SummarizationPipeline(Seq2SeqPipeline):
    output_key = "summary_text"


PIPELINES = {"translation": TranslationPipeline, "summarization": SummarizationPipeline,
             "text2text-generation": Seq2SeqPipeline}


def register() -> None:
    """Make ``transformers.pipeline("translation" | "summarization" | "text2text-generation")`` build these."""
    from transformers import pipelines

    for task, pipeline_class in PIPELINES.items():
        # transformers refuses names on its removed list before it looks at registered pipelines (see qa/pipeline.py).
        getattr(pipelines, "REMOVED_TASKS", {}).pop(task, None)
        PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=pipeline_class, pt_model=AutoModelForSeq2SeqLM,
                                            type="text")

