"""Instruction tuning (task=sft): labels from the chat template's offsets, end-of-turn tokens, bad rows, packing that
keeps examples apart, the final-answer match, and a run whose export answers a conversation and stops."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from lightning_ft.errors import UserError
from lightning_ft.tasks.language_modeling.model import isolates_packed_documents
from lightning_ft.tasks.sft.data import CHATML_TOKENS, InstructionData, pack
from lightning_ft.tasks.sft.model import GSM8K_ANSWER, final_answer
from lightning_ft.tokenizer_training import train_tokenizer
from lightning_ft.train import train

WORDS = ["the", "cat", "sat", "on", "a", "mat", "what", "is", "two", "and", "four", "plus", "five", "six", "answer",
         "question", "dog", "ran", "far"]
QUICK_SFT = ["task=sft", "backbone=tiny_gpt2", "dataset.chat_template=chatml", "~callbacks.progress_bar"]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer with the ChatML markers as special tokens, as a fresh model's run trains one."""
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 5
    return train_tokenizer(texts, algorithm="bpe", vocab_size=300, add_eos=False, extra_special_tokens=CHATML_TOKENS)


def data_for(tokenizer, **kwargs) -> InstructionData:
    tokenizer = copy.deepcopy(tokenizer)  # connecting sets its chat template
    data = InstructionData(data_files={"train": "unused"}, chat_template=kwargs.pop("chat_template", "chatml"),
                           **kwargs)
    data.format = kwargs.get("format", "messages")
    data.connect(tokenizer)
    return data


def trained_text(data, ids, labels) -> str:
    return data.tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two and four"},
                {"role": "assistant", "content": "six"}, {"role": "user", "content": "and five"},
                {"role": "assistant", "content": "the answer is five"}]


def test_the_loss_covers_the_assistant_turns_and_their_end_of_turn_tokens_only(tokenizer):
    data = data_for(tokenizer)
    assert data.end_of_turn == "<|im_end|>"
    ids, labels = data.tokenize(CONVERSATION)
    assert trained_text(data, ids, labels) == "six<|im_end|>the answer is five<|im_end|>"
    assert data.tokenizer.decode(ids).replace(" ", "").startswith("<|im_start|>system\nbebrief<|im_end|>")
    everything = data_for(tokenizer, train_on_prompt=True)
    ids, labels = everything.tokenize(CONVERSATION)
    assert labels == ids


def test_a_response_the_tokenizer_merges_with_the_prompt_is_trained_from_its_first_character(tokenizer):
    # "A:" glued to the answer: a byte-level BPE token can span both, so the response's own tokens are not in the
    # conversation's (a search for them finds nothing, or the wrong place). The offsets train every token that
    # overlaps the answer, as transformers' assistant-token mask does, and no token wholly in the prompt.
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}Q:{{ m['content'] }}\n{% else %}A:"
                "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    data = data_for(tokenizer, chat_template=template)
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "satdog"}]
    ids, labels = data.tokenize(messages)
    text, [(start, end)] = data.render(messages)
    offsets = data.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    trained = [span for span, label in zip(offsets, labels) if label != -100]
    assert trained[0][0] <= start < trained[0][1] and trained[-1][1] == end  # from the answer's first character
    assert all(b > start for a, b in trained) and text[start:end] == "satdog<|im_end|>"
    assert all(label == -100 for (a, b), label in zip(offsets, labels) if b <= start)


def test_a_template_that_ends_turns_with_no_special_token_gets_the_eos_token(tokenizer):
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    data = data_for(tokenizer, chat_template=template)
    assert data.end_of_turn == tokenizer.eos_token
    ids, labels = data.tokenize(CONVERSATION)
    eos = tokenizer.eos_token_id
    assert ids.count(eos) == 2 and [i for i in labels if i == eos] == [eos, eos]
    assert trained_text(data, ids, labels).replace(" ", "") == f"six{tokenizer.eos_token}theansweris" \
                                                               f"five{tokenizer.eos_token}"  # not the newline


@pytest.mark.parametrize("messages, words", [
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}], "role 'bot'"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": "hello"}], "turns must alternate"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}], "only the first turn"),
    ("hello", "not a list"),
])
def test_a_bad_conversation_is_one_sentence_naming_its_row(tokenizer, tmp_path, messages, words):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [{"messages": good}, {"messages": messages}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "validation.jsonl").write_text(json.dumps({"messages": good}) + "\n")
    data = InstructionData(data_dir=str(tmp_path), chat_template="chatml", tokenizer=copy.deepcopy(tokenizer))
    with pytest.raises(UserError, match=f"row 2 of the train split: .*{re.escape(words)}"):
        data.prepare_data()


def test_a_tokenizer_without_a_chat_template_is_refused_naming_the_key(tokenizer):
    with pytest.raises(UserError, match="has no chat template: set dataset.chat_template=chatml"):
        InstructionData(data_files={"train": "x"}, tokenizer=tokenizer)


def test_examples_left_with_no_answer_token_are_left_out_and_counted(tokenizer, tmp_path):
    short = {"question": "what is two", "answer": "four"}
    long = {"question": " ".join(WORDS * 4), "answer": "six"}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [short, long, short]))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [long]))
    data = InstructionData(data_dir=str(tmp_path), chat_template="chatml", prompt_column="question",
                           completion_column="answer", max_length=40, tokenizer=copy.deepcopy(tokenizer))
    with pytest.raises(UserError, match="no validation example has an answer token within max_length=40"):
        data.prepare_data()
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [short]))
    data = InstructionData(data_dir=str(tmp_path), chat_template="chatml", prompt_column="question",
                           completion_column="answer", max_length=40, tokenizer=copy.deepcopy(tokenizer))
    data.prepare_data()
    assert len(data.datasets["train"]) == 2
    assert data.preparation["problems"] == {"train": {"truncated": 1, "no_trainable_tokens": 1}}
    assert data.format == "prompt_completion"


def test_packed_rows_restart_positions_and_mask_each_examples_first_label():
    import datasets

    rows = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], "labels": [[-100, 2, 3], [-100, 5], [-100, 7, 8, 9],
                                                                             [-100]]}
    packed = pack(datasets.Dataset.from_dict(rows), max_length=5)
    assert sorted(t for row in packed["input_ids"] for t in row) == list(range(1, 11))  # every token, once
    assert all(len(row) <= 5 for row in packed["input_ids"])
    assert len(packed) == 2  # best fit: 4+1 and 3+2
    for ids, labels, positions in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
        starts = [i for i, p in enumerate(positions) if p == 0]
        assert all(labels[i] == -100 for i in starts)
        assert positions == [p for n in (b - a for a, b in zip(starts, starts[1:] + [len(ids)])) for p in range(n)]


def test_a_packed_batch_has_the_same_answer_loss_as_the_padded_one(tokenizer):
    """Through the data's own collate: packed rows (no attention mask) and padded rows give the model the same
    answer tokens to predict with the same context."""
    import datasets
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=512, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert isolates_packed_documents(model)
    data = data_for(tokenizer)
    other = [{"role": "user", "content": "dog"}, {"role": "assistant", "content": "ran"}]
    examples = [data.tokenize(c) for c in (CONVERSATION, CONVERSATION[1:3], other)]
    rows = [{"input_ids": ids, "labels": [-100] + labels[1:]} for ids, labels in examples]
    padded = data.collate(rows)
    packed_rows = pack(datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]}), max_length=512)
    packed = data.collate(list(packed_rows))
    assert "attention_mask" not in packed and len(packed["input_ids"]) == 1

    def summed_loss(batch):
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")

    with torch.no_grad():
        assert torch.allclose(summed_loss(dict(packed)), summed_loss(dict(padded)), rtol=1e-5)


@pytest.mark.parametrize("text, answer", [("so 5 + 5 = 10\n#### 1,000", "1000"), ("#### 18.0", "18"),
                                          ("#### $7.", "7"), ("#### 3 then #### -2.5", "-2.5"),
                                          ("the answer is 4", None)])
def test_the_final_answer_is_the_last_pattern_match_without_commas(text, answer):
    assert final_answer(text, re.compile(GSM8K_ANSWER)) == answer


def test_the_shipped_sft_configs_compose(tmp_path):
    cfg = compose_config(["task=sft"], tmp_path)
    assert cfg.backbone.gguf_file.endswith(".gguf") and cfg.dataset.prompt_column == "question"
    assert compose_config(["task=sft", "dataset=gsm8k"], tmp_path).dataset.val_fraction == 0.05


# ---- a run ---------------------------------------------------------------------------------------------------------
def write_pairs(folder: Path, count: int) -> Path:
    """Questions answered "the answer is N\n#### N" (N the number of words), and one conversation row."""
    rows = []
    for i in range(count):
        words = WORDS[i % 7: i % 7 + 2 + i % 3]
        rows.append({"messages": [{"role": "user", "content": " ".join(words)},
                                  {"role": "assistant", "content": f"#### {len(words)}"}]})
    for split, part in (("train", rows), ("validation", rows[:8]), ("test", rows[:8])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """A tiny GPT-2 tuned until it answers its few training questions (about 20 s)."""
    data = write_pairs(tmp_path_factory.mktemp("pairs"), 24)
    run_dir = tmp_path_factory.mktemp("run") / "sft"
    cfg = compose_config([*QUICK_SFT, f"dataset.data_dir={data}", "trainer.max_epochs=100", "optim.lr=3e-3",
                          "scheduler=constant", "dataset.batch_size=2", "dataset.max_length=64",
                          "task.max_new_tokens=12", "task.generate_limit=4", "trainer.num_sanity_val_steps=0",
                          "+trainer.check_val_every_n_epoch=50",
                          "trainer.precision=32-true", "trainer.gradient_clip_val=null"], run_dir)
    train(cfg)
    return run_dir


def test_a_run_packs_scores_answers_and_exports_a_model_that_answers_a_conversation_and_stops(tuned):
    from transformers import GenerationConfig, pipeline

    metrics = json.loads((tuned / "metrics.json").read_text())
    assert metrics["test"]["test/exact_match"] == 100.0 and metrics["test"]["test/answered"] == 8
    assert metrics["test"]["test/perplexity"] < 2.0
    predictions = json.loads((tuned / "predictions_test.json").read_text())
    assert len(predictions) == 8 and all(p["correct"] for p in predictions.values())
    export = tuned / "hf_model"
    tokenizer_config = json.loads((export / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in (tokenizer_config.get("chat_template") or (export / "chat_template.jinja").read_text())
    generation = GenerationConfig.from_pretrained(export)
    generator = pipeline("text-generation", model=str(export))
    end = generator.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in generation.eos_token_id
    answer = generator([{"role": "user", "content": "the cat sat"}], max_new_tokens=40)[0]["generated_text"][-1]
    assert answer == {"role": "assistant", "content": "#### 3"}  # stopped at <|im_end|>, 40 tokens allowed


def test_a_template_that_renders_a_conversations_start_differently_alone_is_refused(tokenizer):
    ends_differently = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                        "{% if not add_generation_prompt %}(end){% endif %}")
    data = data_for(tokenizer, chat_template=ends_differently)  # a two-turn conversation renders fine
    with pytest.raises(UserError, match="does not render a row turn by turn"):
        data.tokenize(CONVERSATION)


def tiny_pretrained_gpt2(folder: Path, tokenizer) -> str:
    """A GPT-2 saved like a hub checkpoint with a tokenizer that lacks the ChatML markers."""
    import transformers

    plain = train_tokenizer([" ".join(WORDS)] * 20, algorithm="bpe", vocab_size=280, add_eos=False)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=len(plain))
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    plain.save_pretrained(folder)
    return str(folder)


def test_a_pretrained_backbone_without_the_chatml_markers_gets_them_and_bigger_embeddings(tmp_path, tokenizer):
    from lightning_ft.backbones import load_tokenizer
    from lightning_ft.tasks.sft import InstructionTuningTask

    name = tiny_pretrained_gpt2(tmp_path, tokenizer)
    plain = load_tokenizer(name)
    before = len(plain)
    data = InstructionData(data_files={"train": "x"}, chat_template="chatml", max_length=64, tokenizer=plain)
    assert len(plain) == before + 2 and data.end_of_turn == "<|im_end|>"
    kwargs = {**data.head_kwargs(), "backbone": {"name": name}}
    module = InstructionTuningTask(**kwargs)
    assert module.model.get_input_embeddings().num_embeddings == before + 2
    end = plain.convert_tokens_to_ids("<|im_end|>")
    assert end in module.model.generation_config.eos_token_id
    with pytest.raises(UserError, match="dataset.max_length=128 is more than the 64 positions of backbone gpt2"):
        InstructionTuningTask(**{**kwargs, "max_length": 128})


def test_packing_asked_of_a_backbone_that_mixes_packed_examples_is_refused(tmp_path, tokenizer, monkeypatch):
    from lightning_ft.tasks.sft import model

    name = tiny_pretrained_gpt2(tmp_path, tokenizer)
    monkeypatch.setattr(model, "isolates_packed_documents", lambda m: False)  # as BERT-style attention would
    with pytest.raises(UserError, match="does not keep packed examples apart .* set dataset.packing=false"):
        model.InstructionTuningTask(backbone={"name": name}, packing=True)
    assert model.InstructionTuningTask(backbone={"name": name}).packing is False  # null: padded batches instead


def test_predict_answers_prompts_and_conversations_from_the_export_and_the_checkpoint(tuned, tmp_path, capsys):
    from lightning_ft.predict import main

    rows = [{"id": 1, "prompt": "the cat sat"},
            {"id": 2, "prompt": [{"role": "user", "content": "sat on a mat"}]},
            {"id": 3, "prompt": [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "x"}]}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for where in (f"model_dir={tuned}", f"ckpt_path={tuned / 'checkpoints' / 'last.ckpt'}"):
        out = tmp_path / f"out{len(where)}.jsonl"
        assert main([where, f"input={source}", f"output={out}", "max_new_tokens=20"]) == 0
        answers = [json.loads(line) for line in out.read_text().splitlines()]
        assert [a["response"] for a in answers] == ["#### 3", "#### 4", "#### 3"], where
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "robot", "content": "hi"}]}) + "\n")
    assert main([f"model_dir={tuned}", f"input={bad}", f"output={tmp_path / 'x.jsonl'}"]) == 2
    assert re.search(r"error: row 1 of .*bad.jsonl: turn 1 has the role 'robot'", capsys.readouterr().err)


def test_a_template_that_writes_no_assistant_content_is_refused(tokenizer):
    drops_answers = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] != 'assistant' %}{{ m['content'] }}"
                     "{% endif %}<|im_end|>{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(UserError, match=r"renders no assistant content .*\(set dataset\.chat_template\)"):
        data_for(tokenizer, chat_template=drops_answers)


def test_a_causal_lm_export_is_read_as_sft_or_clm_as_it_says_or_as_asked(tuned, tmp_path):
    import shutil

    from transformers import AutoConfig

    from lightning_ft import tasks
    from lightning_ft.predict import main

    export = tuned / "hf_model"
    config = AutoConfig.from_pretrained(export)
    assert tasks.of_export(config, export).name == "sft"  # its lightning_ft.json
    foreign = tmp_path / "foreign"
    shutil.copytree(export, foreign)
    (foreign / "lightning_ft.json").unlink()
    assert tasks.of_export(config, foreign).name == "sft"  # a causal LM with a chat template answers
    assert tasks.of_export(config, foreign, tasks.get("clm")).name == "clm"  # predict task=clm
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        path = foreign / name
        if name == "chat_template.jinja":
            path.unlink(missing_ok=True)
        else:
            settings = json.loads(path.read_text())
            settings.pop("chat_template", None)
            path.write_text(json.dumps(settings))
    assert tasks.of_export(config, foreign).name == "clm"  # no template: it continues text
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "the cat"}) + "\n")
    assert main([f"model_dir={export}", f"input={source}", f"output={tmp_path / 'out.jsonl'}", "task=clm",
                 "max_new_tokens=3"]) == 0
    assert "continuation" in json.loads((tmp_path / "out.jsonl").read_text())
