"""The data: questions over contexts cut into overlapping windows, answers aligned to token spans."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning_ft.data.base import TaskDataModule
from lightning_ft.data.squad import is_squad_json, read_squad_json
from lightning_ft.errors import UserError

log = logging.getLogger(__name__)


EXAMPLE_INDEX = "example_index"


WINDOW_COLUMNS = (EXAMPLE_INDEX, "window", "context_start", "context_end", "cls_index")


_SHOWN_IDS = 5  # example ids a warning lists before "and N more"


def align_answer(context: str, text: str, start: int) -> int | None:
    """Where ``text`` starts in ``context``: ``start`` when it is there, else the nearest occurrence, else None."""
    if context[start:start + len(text)] == text:
        return start
    found, position = [], context.find(text)
    while text and position != -1:
        found.append(position)
        position = context.find(text, position + 1)
    return min(found, key=lambda p: abs(p - start)) if found else None


def tokenize_windows(
    tokenizer: Any, questions: list[str], contexts: list[str], max_length: int, doc_stride: int
) -> tuple[Any, list[dict]]:
    """Question + context in ``max_length`` windows overlapping by ``doc_stride`` tokens (the HF run_qa scheme).

    Returns the encoding (one row per window, with offset mappings) and, per window, its question (``sample``), its
    number among that question's windows, its first and last context token and the CLS token's position.
    """
    question_first = tokenizer.padding_side == "right"  # left-padding models (XLNet) put the context first
    encoding = tokenizer(
        questions if question_first else contexts,
        contexts if question_first else questions,
        truncation="only_second" if question_first else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    samples = encoding.pop("overflow_to_sample_mapping")
    context_id = 1 if question_first else 0
    windows, previous, number = [], -1, 0
    for i, sample in enumerate(samples):
        number = number + 1 if sample == previous else 0
        previous = sample
        sequence_ids = encoding.sequence_ids(i)
        ids = encoding["input_ids"][i]
        windows.append({
            "sample": sample,
            "window": number,
            "context_start": sequence_ids.index(context_id),
            "context_end": len(sequence_ids) - 1 - sequence_ids[::-1].index(context_id),
            "cls_index": ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0,
        })
    return encoding, windows


def _ids(ids: list[str]) -> str:
    more = f" and {len(ids) - _SHOWN_IDS} more" if len(ids) > _SHOWN_IDS else ""
    return ", ".join(ids[:_SHOWN_IDS]) + more


class QuestionAnsweringData(TaskDataModule):
    """Questions with a context and gold answers (``answers{text, answer_start}``), as in SQuAD.

    Files: SQuAD JSON (v1.1/v2.0, read as the HF ``squad`` dataset is), or jsonl/json/parquet rows with the HF
    ``squad`` columns, or a hub dataset. Answers whose text is not at ``answer_start`` are moved to the nearest place
    the text occurs; training questions whose answer text is not in the context at all are left out. Both are
    counted and their ids logged.

    Args:
        doc_stride: tokens shared by consecutive windows of a long context.
        max_question_length: questions longer than this many tokens are cut (and counted), so every window keeps
            room for the context.
    """

    def __init__(
        self,
        *,
        question_column: str = "question",
        context_column: str = "context",
        answers_column: str = "answers",
        id_column: str = "id",
        doc_stride: int = 128,
        max_question_length: int = 64,
        max_length: int = 384,
        pad_to_multiple_of: int | None = 64,
        **kwargs: Any,
    ) -> None:
        # Batches padded to any of up to 384 lengths made evaluation's resident memory grow with every new shape
        # (oneDNN/allocator caches): 1,009 MB over 1,988 SQuAD questions, 439 MB padded to multiples of 64, in the same
        # time (benchmarks/RESULTS.md).
        super().__init__(max_length=max_length, pad_to_multiple_of=pad_to_multiple_of, **kwargs)
        if doc_stride >= max_length - max_question_length - 3:
            raise UserError(
                f"dataset.doc_stride={doc_stride} leaves no new context per window with max_length={max_length} and "
                f"max_question_length={max_question_length}: use a doc_stride below "
                f"{max_length - max_question_length - 3}."
            )
        self.question_column = question_column
        self.context_column = context_column
        self.answers_column = answers_column
        self.id_column = id_column
        self.doc_stride = doc_stride
        self.max_question_length = max_question_length
        self.examples: dict[str, Any] = {}  # the raw rows, which post-processing reads (context, id, answers)

    # ---- loading -----------------------------------------------------------------------------------------------
    def read_local(self, split: str, paths: list[Path]) -> Any:
        if not all(is_squad_json(p) for p in paths):
            return super().read_local(split, paths)
        import datasets

        return datasets.Dataset.from_list([row for p in paths for row in read_squad_json(p)])

    def load_raw(self) -> dict[str, Any]:
        raw = super().load_raw()
        for split, data in raw.items():
            if EXAMPLE_INDEX not in data.column_names:  # windows point back at their question through it
                raw[split] = data.add_column(EXAMPLE_INDEX, list(range(len(data))))
        self.examples = raw
        return raw

    def predict_columns(self) -> dict[str, Any]:
        return {"question_column": self.question_column, "context_column": self.context_column}

    def required_columns(self, split: str) -> list[str]:
        return [self.id_column, self.question_column, self.context_column, self.answers_column]

    # ---- checks ------------------------------------------------------------------------------------------------
    def check_split(self, split: str, data: Any) -> None:
        problems: dict[str, list[str]] = {"answer_moved": [], "answer_not_in_context": [], "question_cut": []}
        ids = [str(i) for i in data[self.id_column]]
        contexts, answers = list(data[self.context_column]), list(data[self.answers_column])
        for qid, context, answer in zip(ids, contexts, answers):
            if not isinstance(answer, dict) or "text" not in answer or "answer_start" not in answer:
                raise UserError(
                    f"example '{qid}' of the {split} split has answers {answer!r}: give "
                    f"{{'text': [...], 'answer_start': [...]}} in column '{self.answers_column}', as SQuAD does."
                )
            if not context or not context.strip():
                raise UserError(f"example '{qid}' of the {split} split has an empty context: fix or drop it.")
            for text, start in zip(answer["text"], answer["answer_start"]):
                aligned = align_answer(context, text, start)
                if aligned is None:
                    problems["answer_not_in_context"].append(qid)
                    break
                if aligned != start:
                    problems["answer_moved"].append(qid)
                    break
        _, cut = self._questions(list(data[self.question_column]))
        problems["question_cut"] = [qid for qid, was_cut in zip(ids, cut) if was_cut]
        self.problems[split] = {kind: found for kind, found in problems.items() if found}
        notes = {
            "answer_moved": "answers not found at answer_start, moved to the nearest occurrence of their text",
            "answer_not_in_context": "answers whose text is not in the context"
            + (" (left out of training)" if split == "train" else " (scored as usual)"),
            "question_cut": f"questions longer than max_question_length={self.max_question_length} tokens, cut",
        }
        for kind, found in self.problems[split].items():
            log.warning("%s split: %d %s: %s", split, len(found), notes[kind], _ids(found))

    # ---- preprocessing -----------------------------------------------------------------------------------------
    def preprocessing_settings(self) -> dict[str, Any]:
        return {**super().preprocessing_settings(), "doc_stride": self.doc_stride,
                "max_question_length": self.max_question_length}

    def _questions(self, texts: list[str]) -> tuple[list[str], list[bool]]:
        """The questions as windows take them, cut to ``max_question_length`` tokens, and which were cut."""
        # Leading spaces would only take room in the window (the HF example strips them too).
        texts = [text.lstrip() for text in texts]
        offsets = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        cut = [len(o) > self.max_question_length for o in offsets]
        return [text[: o[self.max_question_length - 1][1]] if was_cut else text
                for text, o, was_cut in zip(texts, offsets, cut)], cut

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        contexts = batch[self.context_column]
        questions, _ = self._questions(batch[self.question_column])
        encoding, windows = tokenize_windows(self.tokenizer, questions, contexts, self.max_length, self.doc_stride)
        out: dict[str, list] = {key: [] for key in (*encoding.keys(), *WINDOW_COLUMNS, "start_positions",
                                                    "end_positions")}
        for i, window in enumerate(windows):
            sample = window.pop("sample")
            start = end = window["cls_index"]
            answers = batch[self.answers_column][sample]
            if answers["text"]:
                text = answers["text"][0]
                first = align_answer(contexts[sample], text, answers["answer_start"][0])
                if first is None:
                    if self._current_split == "train":
                        continue  # counted by check_split; an unfindable answer cannot be labelled
                else:
                    start, end = self._token_span(encoding["offset_mapping"][i], window, first, first + len(text))
            for key in encoding:
                out[key].append(encoding[key][i])
            window[EXAMPLE_INDEX] = batch[EXAMPLE_INDEX][sample]
            for key, value in window.items():
                out[key].append(value)
            out["start_positions"].append(start)
            out["end_positions"].append(end)
        return out

    @staticmethod
    def _token_span(offsets: list, window: dict, start_char: int, end_char: int) -> tuple[int, int]:
        """The answer's first and last token in this window, or the CLS token twice when it is not wholly inside."""
        context_start, context_end, cls_index = window["context_start"], window["context_end"], window["cls_index"]
        if not (offsets[context_start][0] <= start_char and offsets[context_end][1] >= end_char):
            return cls_index, cls_index
        first = context_start
        while first <= context_end and offsets[first][0] <= start_char:
            first += 1
        last = context_end
        while last >= context_start and offsets[last][1] >= end_char:
            last -= 1
        return first - 1, last + 1

    def check_encoded(self, split: str, data: Any) -> None:
        windows = data.select_columns([EXAMPLE_INDEX, "window", "start_positions", "cls_index"]).to_pandas()
        multi = int((windows["window"] > 0).groupby(windows[EXAMPLE_INDEX]).any().sum())
        if multi:
            log.info("%s split: %d of %d questions have contexts longer than one window of max_length=%d",
                     split, multi, windows[EXAMPLE_INDEX].nunique(), self.max_length)
        if split != "train":
            return
        # A gold answer wider than any window (a long answer, a short max_length) gets only CLS labels: say so.
        labelled = set(windows.loc[windows["start_positions"] != windows["cls_index"], EXAMPLE_INDEX])
        raw = self.examples[split]
        unfindable = set(self.problems.get(split, {}).get("answer_not_in_context", []))  # left out, said already
        ids = [str(qid) for i, qid, answers in zip(raw[EXAMPLE_INDEX], raw[self.id_column], raw[self.answers_column])
               if answers["text"] and i not in labelled and str(qid) not in unfindable]
        if ids:
            self.problems.setdefault(split, {})["answer_outside_every_window"] = ids
            log.warning("%s split: %d answers lie in no single window (raise max_length or doc_stride); they train "
                        "as 'no answer': %s", split, len(ids), _ids(ids))

    def collate(self, features: list[dict]) -> dict:
        return super().collate([{k: v for k, v in f.items() if k != "offset_mapping"} for f in features])

    def references(self, split: str) -> tuple[Any, Any]:
        """The tokenized windows and raw questions of a split: what post-processing reads."""
        self._prepare()
        return self.datasets[split], self.examples[split]
