"""The data: conversations or prompt/completion rows, rendered with the chat template, labelled on the answers.

Labels come from where the template puts each assistant turn in the rendered text: the conversation rendered up to
the turn (with the generation prompt) and through it gives the turn's character span, and the tokens inside that
span (found with the tokenizer's offsets) are the trained ones. Nothing searches the text for a response string,
which breaks where the tokenizer merges the response with the text around it.
"""

from __future__ import annotations

import bisect
import logging
import string
from typing import Any

import torch

from lightning_ft.data.base import TaskDataModule
from lightning_ft.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("auto", "messages", "prompt_completion")
ROLES = ("system", "user", "assistant")
# ChatML (as SmolLM2, Qwen and TRL's setup_chat_format write it), for a tokenizer that has no template of its own.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
TEMPLATES = {"chatml": CHATML}
PROBE = [{"role": "user", "content": "What is two and two?"}, {"role": "assistant", "content": "Four."}]


def template_fields(template: str) -> list[str]:
    """The columns a ``str.format`` template reads: ``"Q: {question}"`` -> ``["question"]``."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as err:
        raise UserError(f"template {template!r} is not a format string ({err}): write columns as {{column}}, and "
                        "a literal brace as {{ or }}.") from err


def add_chat_markers(tokenizer: Any) -> None:
    """Give a tokenizer whose template is ChatML the ChatML markers it lacks, as special tokens."""
    if tokenizer.chat_template == CHATML:
        missing = [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)


def check_conversation(messages: Any) -> str | None:
    """What is wrong with a ``messages`` value (None when nothing is): a list of ``{role, content}`` turns, an
    optional system turn first, then user and assistant in turn, with at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        return "its messages are not a list of {role, content} turns"
    expected = "user"
    for number, turn in enumerate(messages, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or "role" not in turn:
            return f"turn {number} is not a {{role, content}} object with text content"
        role = turn["role"]
        if role not in ROLES:
            return f"turn {number} has the role {role!r}, which is not one of {', '.join(ROLES)}"
        if role == "system":
            if number != 1:
                return f"turn {number} is a system turn, which only the first turn may be"
            continue
        if role != expected:
            return f"turn {number} is a {role} turn where a {expected} turn was due (turns must alternate)"
        expected = "assistant" if role == "user" else "user"
    if not any(turn["role"] == "assistant" for turn in messages):
        return "it has no assistant turn, so nothing to learn"
    return None


class InstructionData(TaskDataModule):
    """Instruction-tuning rows, rendered with the tokenizer's chat template and labelled on the answers.

    Args:
        format: ``messages`` (a ``messages_column`` of ``{role, content}`` turns), ``prompt_completion`` (a prompt
            and a completion column, or templates over any columns), or ``auto`` (``messages`` when the training
            split has that column).
        prompt_template, completion_template: ``str.format`` templates over the row's columns (GSM8K:
            ``"{question}"`` and ``"{answer}"``); null: the ``prompt_column`` and ``completion_column`` as they are.
        system_prompt: a system turn put before prompt/completion rows (and messages rows that have none).
        chat_template: a Jinja chat template, or ``chatml``; null: the tokenizer's own (an error if it has none).
        train_on_prompt: the loss on every token, prompts included; default: the assistant turns only.
        packing: pack examples into rows of ``max_length`` tokens (position ids restarting per example, no
            attention across examples); null: where the backbone isolates packed examples (the task checks it).
    """

    def __init__(
        self,
        *,
        format: str = "auto",
        messages_column: str = "messages",
        prompt_column: str = "prompt",
        completion_column: str = "completion",
        prompt_template: str | None = None,
        completion_template: str | None = None,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        train_on_prompt: bool = False,
        packing: bool | None = None,
        max_length: int = 512,
        **kwargs: Any,
    ) -> None:
        if format not in FORMATS:
            raise UserError(f"dataset.format '{format}' is not one of {', '.join(FORMATS)}.")
        for key, template in (("prompt_template", prompt_template), ("completion_template", completion_template)):
            if template is not None and not template_fields(template):
                raise UserError(f"dataset.{key} {template!r} names no column: write the columns it reads as "
                                "{column}, e.g. '{question}'.")
        self.format = format
        self.messages_column = messages_column
        self.prompt_column = prompt_column
        self.completion_column = completion_column
        self.prompt_template = prompt_template
        self.completion_template = completion_template
        self.system_prompt = system_prompt
        self.chat_template = TEMPLATES.get(chat_template, chat_template) if chat_template else None
        self.train_on_prompt = train_on_prompt
        self.packing = packing
        self.end_of_turn: str | None = None  # the token that ends an assistant turn (found from the template)
        self._append_eos = False  # the template ends turns with no special token: the eos token is added
        self._conversations: dict[str, list[list[dict]]] = {}  # evaluation splits' rows, for generation
        self._packed: dict[str, Any] = {}
        super().__init__(max_length=max_length, **kwargs)

    # ---- the tokenizer and its template ------------------------------------------------------------------------
    def special_tokens(self) -> list[str]:
        """Tokens a tokenizer trained for a fresh model must hold as special tokens (the ChatML markers)."""
        return list(CHATML_TOKENS) if self.chat_template in (None, CHATML) else []

    def check_tokenizer(self, tokenizer: Any) -> Any:
        if self.chat_template is not None:
            tokenizer.chat_template = self.chat_template
        elif not getattr(tokenizer, "chat_template", None):
            raise UserError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template: set "
                            "dataset.chat_template=chatml (or a Jinja template of your own).")
        add_chat_markers(tokenizer)  # the model's embeddings grow to match (the task resizes them)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise UserError("the tokenizer has neither a pad nor an eos token: give it one (backbone.tokenizer).")
            tokenizer.pad_token = tokenizer.eos_token  # padded labels are -100 whatever the pad token
        self.tokenizer = tokenizer
        self._find_end_of_turn()
        return tokenizer

    def _find_end_of_turn(self) -> None:
        """The special token the template closes an assistant turn with (ChatML: ``<|im_end|>``); where it closes
        them with none, the tokenizer's eos token is added after each turn, so the tuned model learns to stop."""
        tokenizer = self.tokenizer
        text, spans = self.render(PROBE, where="the chat template (tried on a two-turn conversation)")
        start, end = spans[0]
        turn = text[start:end]
        tail = turn[turn.find(PROBE[1]["content"]) + len(PROBE[1]["content"]):]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        found = [i for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i in special]
        if found:
            self.end_of_turn = tokenizer.convert_ids_to_tokens(found[0])
        elif tokenizer.eos_token is not None:
            self.end_of_turn, self._append_eos = tokenizer.eos_token, True
        else:
            raise UserError("the chat template ends an assistant turn with no special token and the tokenizer has no "
                            "eos token, so a tuned model would never stop: set dataset.chat_template=chatml.")

    def render(self, messages: list[dict], where: str = "a row") -> tuple[str, list[tuple[int, int]]]:
        """The conversation as the template writes it, and each assistant turn's character span in it (from the
        turn's first character through its end-of-turn token)."""
        apply = self.tokenizer.apply_chat_template
        text = apply(messages, tokenize=False)
        spans = []
        for index, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            before = apply(messages[:index], tokenize=False, add_generation_prompt=True) if index else ""
            through = apply(messages[: index + 1], tokenize=False)
            if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
                raise UserError(f"the chat template does not render {where} turn by turn (a conversation's start "
                                "renders differently alone): use a template that does, e.g. "
                                "dataset.chat_template=chatml.")
            if turn["content"].strip() and turn["content"].strip() not in text[len(before):len(through)]:
                raise UserError(f"the chat template renders no assistant content for {where}: its assistant turns "
                                "must write message['content'] (set dataset.chat_template).")
            end = len(through)
            if self._append_eos:  # the eos token goes right after the content: what follows it is the template's
                content = text.rfind(turn["content"], len(before), end)
                end = content + len(turn["content"]) if content >= 0 and turn["content"] else end
            elif self.end_of_turn:  # the newline after the end-of-turn token is not trained
                marker = text.rfind(self.end_of_turn, len(before), end)
                end = marker + len(self.end_of_turn) if marker >= 0 else end
            spans.append((len(before), end))
        return text, spans

    # ---- rows --------------------------------------------------------------------------------------------------
    def load_raw(self) -> dict[str, Any]:
        raw = super().load_raw()
        if self.format == "auto":
            self.format = "messages" if self.messages_column in raw["train"].column_names else "prompt_completion"
        return raw

    def required_columns(self, split: str) -> list[str]:
        if self.format == "messages":
            return [self.messages_column]
        prompt = template_fields(self.prompt_template) if self.prompt_template else [self.prompt_column]
        completion = (template_fields(self.completion_template) if self.completion_template
                      else [self.completion_column])
        return list(dict.fromkeys(prompt + completion))

    def column_options(self) -> dict[str, str]:
        if self.format == "messages":
            return {self.messages_column: "dataset.messages_column"}
        options = {self.prompt_column: "dataset.prompt_column (or dataset.prompt_template)",
                   self.completion_column: "dataset.completion_column (or dataset.completion_template)"}
        for key, template in (("prompt_template", self.prompt_template),
                              ("completion_template", self.completion_template)):
            options.update({field: f"dataset.{key}" for field in template_fields(template or "")})
        return options

    def predict_columns(self) -> dict[str, Any]:
        return {"column": self.messages_column if self.format == "messages" else self.prompt_column}

    def conversation(self, row: dict) -> list[dict]:
        """A raw row as a list of turns (the system prompt first, where one is set and the row has none)."""
        if self.format == "messages":
            messages = [{"role": t["role"], "content": t["content"]} for t in row[self.messages_column]]
        else:
            prompt = (self.prompt_template.format(**row) if self.prompt_template else row[self.prompt_column])
            completion = (self.completion_template.format(**row) if self.completion_template
                          else row[self.completion_column])
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def check_split(self, split: str, data: Any) -> None:
        kept = []
        columns = self.required_columns(split)
        for number, row in enumerate(data, start=1):
            if self.format == "messages":
                problem = check_conversation(row[self.messages_column])
            else:
                empty = [c for c in columns if row[c] is None or (isinstance(row[c], str) and not row[c].strip())]
                problem = f"column '{empty[0]}' is empty" if empty else None
            if problem:
                raise UserError(f"row {number} of the {split} split: {problem}: fix or drop the row (a conversation "
                                "is an optional system turn, then user and assistant turns in turn).")
            if split != "train":
                kept.append(self.conversation(row))
        if split != "train":
            self._conversations[split] = kept

    def training_texts(self):
        """The training split's turns, to train a tokenizer on (the chat markers are added as special tokens)."""
        for row in self.load_raw()["train"]:
            for turn in self.conversation(row):
                yield turn["content"]

    def preprocessing_settings(self) -> dict[str, Any]:
        return {**super().preprocessing_settings(), "format": self.format, "system_prompt": self.system_prompt,
                "prompt_template": self.prompt_template, "completion_template": self.completion_template,
                "chat_template": self.tokenizer.chat_template, "train_on_prompt": self.train_on_prompt}

    # ---- tokenizing --------------------------------------------------------------------------------------------
    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out: dict[str, list] = {"input_ids": [], "labels": [], "trainable": [], "cut": []}
        for row in rows:
            ids, labels = self.tokenize(self.conversation(row))
            cut = len(ids) > self.max_length
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            labels[0] = -100  # packed, an example's first token would be predicted from the one before it
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["trainable"].append(sum(1 for label in labels if label != -100))
            out["cut"].append(cut)
        return out

    def tokenize(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """A conversation's token ids and labels: the ids inside the assistant spans, -100 elsewhere (every id with
        ``train_on_prompt``)."""
        tokenizer = self.tokenizer
        text, spans = self.render(messages)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = [], []
        span = 0
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            while span < len(spans) and start >= spans[span][1]:
                if self._append_eos:  # the turn is over: its end-of-turn token, trained on
                    ids.append(tokenizer.eos_token_id)
                    labels.append(tokenizer.eos_token_id)
                span += 1
            # A token that overlaps the turn is trained, as transformers' assistant-token mask counts it: where the
            # tokenizer merges the answer's first characters with the prompt's last, that token is the answer's start.
            inside = span < len(spans) and end > spans[span][0] and start < spans[span][1]
            ids.append(token)
            labels.append(token if inside or self.train_on_prompt else -100)
        if self._append_eos and span < len(spans):
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        return ids, labels

    def check_encoded(self, split: str, data: Any) -> None:
        """Leave out, and count, the examples that truncation left with nothing to learn."""
        cut, trainable = data["cut"], data["trainable"]
        truncated = sum(cut)
        empty = [i for i, count in enumerate(trainable) if count == 0]
        if truncated:
            self.problems.setdefault(split, {})["truncated"] = truncated
            log.warning("%d of %d %s examples were longer than max_length=%d tokens and were truncated.",
                        truncated, len(data), split, self.max_length)
        if empty:
            self.problems.setdefault(split, {})["no_trainable_tokens"] = len(empty)
            if len(empty) == len(data):
                raise UserError(f"no {split} example has an answer token within max_length={self.max_length} "
                                "tokens: raise dataset.max_length.")
            log.warning("%d %s examples (rows %s) have no answer token within max_length=%d and are left out: "
                        "raise dataset.max_length to keep them.", len(empty), split,
                        ", ".join(str(i + 1) for i in empty[:5]) + (" ..." if len(empty) > 5 else ""),
                        self.max_length)
            drop = set(empty)
            data = data.select([i for i in range(len(data)) if i not in drop])
        self.datasets[split] = data.remove_columns(["cut", "trainable"])

    def head_kwargs(self) -> dict[str, Any]:
        tokenizer = self.tokenizer
        stops = ([tokenizer.convert_tokens_to_ids(self.end_of_turn), tokenizer.eos_token_id] if tokenizer is not None
                 else [])
        return {"packing": self.packing, "max_length": self.max_length, "end_of_turn": self.end_of_turn,
                "vocab_size": len(tokenizer) if tokenizer is not None else None,
                "stop_token_ids": [i for i in stops if i is not None],
                "pad_token_id": tokenizer.pad_token_id if tokenizer is not None else None,
                "chat_template": tokenizer.chat_template if tokenizer is not None else None}

    # ---- generation prompts ------------------------------------------------------------------------------------
    def generation_prompts(self, split: str, limit: int | None) -> list[dict]:
        """The first ``limit`` rows of an evaluation split as prompts for generation: the conversation up to its
        last assistant turn, with the generation prompt, and that turn's content as the reference."""
        self._prepare()
        prompts = []
        for row, messages in enumerate(self._conversations.get(split, [])[:limit]):
            last = max(i for i, turn in enumerate(messages) if turn["role"] == "assistant")
            text = self.tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompts.append({"row": row, "input_ids": ids, "prompt": messages[last - 1]["content"],
                            "reference": messages[last]["content"]})
        return prompts

    # ---- packing and batches -----------------------------------------------------------------------------------
    @property
    def packs(self) -> bool:
        """Whether batches are packed: as asked, or (null) as the task found the backbone able to."""
        if self.packing is not None:
            return self.packing
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        return bool(getattr(module, "packing", False))

    def loader_data(self, split: str) -> Any:
        if not self.packs:
            return self.datasets[split]
        if split not in self._packed:
            self._packed[split] = pack(self.datasets[split], self.max_length)
            log.info("%s: %d examples packed into %d rows of at most %d tokens", split, len(self.datasets[split]),
                     len(self._packed[split]), self.max_length)
        return self._packed[split]

    def collate(self, features: list[dict]) -> dict:
        pad = self.tokenizer.pad_token_id
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": torch.tensor([f["input_ids"] + [pad] * (width - len(f["input_ids"])) for f in features]),
                 "labels": torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features])}
        if "position_ids" in features[0]:
            # The padding is one more example of its own (positions from 0), so no real token attends to it; with
            # no attention mask transformers reads the examples from the restarting positions.
            batch["position_ids"] = torch.tensor([f["position_ids"] + list(range(width - len(f["position_ids"])))
                                                  for f in features])
        else:
            batch["attention_mask"] = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"]))
                                                    for f in features])
        return batch


def pack(data: Any, max_length: int) -> Any:
    """Examples packed into rows of at most ``max_length`` tokens by best-fit decreasing (each example goes to the
    fullest row it fits in; TRL's default), with position ids restarting at each example. Examples keep their
    tokens whole: none is split across rows."""
    import datasets

    ids, labels = data["input_ids"], data["labels"]
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for index in order:
        size = len(ids[index])
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(index)
            bisect.insort(free, (room - size, row))
        else:
            rows.append([index])
            bisect.insort(free, (max_length - size, len(rows) - 1))
    columns: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in rows:
        members.sort()  # the examples in their split order
        columns["input_ids"].append([t for i in members for t in ids[i]])
        columns["labels"].append([t for i in members for t in labels[i]])
        columns["position_ids"].append([p for i in members for p in range(len(ids[i]))])
    return datasets.Dataset.from_dict(columns)
