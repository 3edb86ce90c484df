"""Every command in the README runs (with a tiny model and a few batches; test_e2e runs the main one for real)."""

import json
import re
import shlex
from pathlib import Path

import pytest
from cli import run_cli
from conftest import MINILM, QUICK, ROOT, SHARED, compose_config, write_tsv

from lightning_ft.backbones import load_tokenizer, resolve_name
from lightning_ft.paths import sample_dir
from lightning_ft.tasks.qa import QuestionAnsweringTask
from lightning_ft.tasks.seq2seq import TranslationTask
from lightning_ft.tasks.similarity import SimilarityTask
from lightning_ft.tasks.text_classification import TextClassificationTask
from lightning_ft.tokenizer_training import train_tokenizer

README = (ROOT / "README.md").read_text()
QUICK_RUN = ["~callbacks.progress_bar"]
# The README's placeholders for a public dataset's own files, and the folder of CI's copy (conftest.SHARED) that
# stands in for each: a command naming one runs on that copy, and is skipped, naming the folder, where it is absent.
REAL_DATA = {"<your SST-2 dir>": "glue_sst2", "<your STS-B dir>": "glue_stsb", "<your CoNLL-2003 dir>": "conll2003",
             "<your OpenBookQA dir>": "openbookqa/main", "<your Multi30k dir>": "multi30k",
             "<your Tiny Shakespeare dir>": "tiny_shakespeare", "<your GSM8K dir>": "gsm8k"}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    lines = [line.strip() for block in blocks("bash") for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def real_data(command: str) -> list[str]:
    """The folders of CI's copy of the real datasets that a README command needs."""
    return [folder for placeholder, folder in REAL_DATA.items() if placeholder in command]


def with_real_data(commands: list[str]) -> list:
    """Parameters that skip (conftest's needs_shared marker) where the real data a command needs is absent."""
    return [pytest.param(c, marks=pytest.mark.needs_shared(*real_data(c))) for c in commands]


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory, tiny_pretrained):
    data = tmp_path_factory.mktemp("user_data")
    rows = [[f"review number {i} {'great' if i % 2 else 'awful'}", "good" if i % 2 else "bad"] for i in range(60)]
    write_tsv(data / "train.tsv", ["review", "stars"], rows[:40])
    write_tsv(data / "dev.tsv", ["review", "stars"], rows[40:])
    pairs = tmp_path_factory.mktemp("user_pairs")
    topics = ["a cat sleeps", "stocks fell", "the team won", "rain is expected", "a phone was released"]
    rows = [[f"{t} ({i})", f"news: {t}, item {i}", f"{topics[(k + 2) % 5]} again"] for i in range(10)
            for k, t in enumerate(topics)]
    write_tsv(pairs / "train.tsv", ["anchor", "positive", "negative"], rows[:40])
    write_tsv(pairs / "validation.tsv", ["anchor", "positive", "negative"], rows[40:])
    similarity = tmp_path_factory.mktemp("similarity_export")
    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    module = SimilarityTask(backbone={"name": MINILM, "pretrained": False, "config_overrides": tiny})
    module.export(similarity, load_tokenizer(MINILM))
    squad, squad_v2 = tmp_path_factory.mktemp("user_squad"), tmp_path_factory.mktemp("user_squad_v2")
    for split in ("train", "validation"):
        document = json.loads((sample_dir("squad") / f"{split}.json").read_text())
        (squad / f"{split}.json").write_text(json.dumps(document))
        questions = [qa for article in document["data"] for p in article["paragraphs"] for qa in p["qas"]]
        for qa in questions[::4]:  # every fourth question made unanswerable, as SQuAD v2.0 marks them
            qa.update(is_impossible=True, plausible_answers=qa.pop("answers"), answers=[])
        (squad_v2 / f"{split}.json").write_text(json.dumps(document))
    qa_export = tmp_path_factory.mktemp("qa_export")
    QuestionAnsweringTask(backbone={"name": MINILM, "pretrained": False, "config_overrides": tiny}).export(
        qa_export, load_tokenizer(MINILM))
    seq2seq = tmp_path_factory.mktemp("user_seq2seq")
    rows = [{"document": f"A long text number {i} about {t}.", "summary": f"About {t}."} for i in range(12)
            for t in topics]
    for split, part in (("train", rows[:48]), ("validation", rows[48:])):
        (seq2seq / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    chat = tmp_path_factory.mktemp("user_chat")
    turns = [[{"role": "user", "content": f"what is {t}?"}, {"role": "assistant", "content": f"{t} is news."}]
             for t in topics]
    for split in ("train", "validation"):
        (chat / f"{split}.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in turns * 4))
    translation = tmp_path_factory.mktemp("translation_export")
    texts = (sample_dir("multi30k") / "train.de").read_text().splitlines()
    tokenizer = train_tokenizer(texts + (sample_dir("multi30k") / "train.en").read_text().splitlines(),
                                vocab_size=300)
    tokenizer.save_pretrained(translation)
    TranslationTask(backbone={"name": None, "pretrained": False, "model_type": "t5", "tokenizer": str(translation),
                              "config_overrides": {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 1,
                                                   "num_heads": 2}}, max_new_tokens=8).export(translation, tokenizer)
    mrpc = tmp_path_factory.mktemp("user_mrpc")  # GLUE's layout: a byte-order mark on the header, bare quotes
    lines = [f"{i % 2}\t{i}\t{i + 1}\tthe \"{topics[i % 5]}\" story {i}\t{topics[i % 5]} again, item {i}"
             for i in range(30)]
    for split in ("train", "dev"):
        (mrpc / f"{split}.tsv").write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "\n".join(lines)
                                           + "\n", encoding="utf-8")
    return {"<your MRPC dir>": str(mrpc), "<your data dir>": str(data), "<model dir>": tiny_pretrained,
            "<exported dir>": tiny_pretrained,
            "<your pairs dir>": str(pairs), "<exported similarity dir>": str(similarity),
            "<your squad dir>": str(squad), "<your squad v2 dir>": str(squad_v2), "<exported qa dir>": str(qa_export),
            "<your seq2seq dir>": str(seq2seq), "<exported translation dir>": str(translation),
            "<your chat dir>": str(chat)}


@pytest.fixture(scope="module")
def similarity_run(tmp_path_factory) -> str:
    """A run directory of a tiny bi-encoder, for the README's search and embed commands."""
    from lightning_ft.train import train

    run = tmp_path_factory.mktemp("similarity_run")
    train(compose_config(["task=similarity", *QUICK, "test=false"], run))
    return str(run)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> str:
    """A run directory of a tiny instruction-tuned decoder, for the README's predict command."""
    from lightning_ft.train import train

    run = tmp_path_factory.mktemp("sft_run")
    train(compose_config(["task=sft", *TINY_SFT, "debug=limit", "test=false", *QUICK_RUN], run))
    return str(run)


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory) -> str:
    """A run directory of a tiny NER model, for the README's predict commands."""
    from lightning_ft.train import train

    run = tmp_path_factory.mktemp("ner_run")
    train(compose_config(["task=ner", *QUICK, "test=false"], run))
    return str(run)


def test_readme_has_the_two_commands_of_a_new_user():
    first, second = commands()[:2]
    assert first == "bash scripts/setup.sh && python -m lightning_ft.train"
    assert second == "python -m pytest"
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh" in (ROOT / ".ci" / "run").read_text()


def _tiny_backbone(args: list[str]) -> str:
    """The tiny model for a command's task (its experiment's, when it names one)."""
    if any(a in args for a in ("task=translation", "task=summarization")) or "experiment=t5_" in " ".join(args):
        return "backbone=tiny_t5"
    if "task=clm" in args or "task=sft" in args or "experiment=gpt2_" in " ".join(args):
        return "backbone=tiny_gpt2"
    return "backbone=tiny_bert_scratch" if "task=mlm" in args else "backbone=tiny_bert"


# A decoder built from a config has no chat template: ChatML, within its 256 positions, answers kept short.
TINY_SFT = ["backbone=tiny_gpt2", "dataset.chat_template=chatml", "dataset.max_length=256", "task.max_new_tokens=8"]
WORKFLOW = "outputs/minilm_domain"  # the two-command continued-pretraining workflow: test_readme_workflow runs it


@pytest.mark.parametrize("command", with_real_data([c for c in commands()
                                                     if "lightning_ft.train" in c and WORKFLOW not in c]))
def test_readme_train_command_runs(command, tmp_path, placeholders):
    command = command.split("&& ")[-1]  # the setup part ran in CI's install step
    real = bool(real_data(command))
    for key, folder in REAL_DATA.items():
        command = command.replace(key, shlex.quote(str(SHARED / folder)))
    for key, value in placeholders.items():
        command = command.replace(key, shlex.quote(value))
    assert "<" not in command, f"unknown placeholder in README command: {command}"
    args = shlex.split(command)[3:]  # drop `python -m lightning_ft.train`
    if "--cfg" in args or "--help" in args:
        result = run_cli(args, tmp_path)
        assert result.returncode == 0 and "task:" in result.stdout
        return
    if not any(a.startswith(("backbone=", "backbone.name=")) for a in args):
        args.append(_tiny_backbone(args))
    if any(a.startswith("trainer.max_steps=") for a in args):  # a step budget (streaming): a tenth of it
        steps = {"trainer.max_steps": 20, "trainer.val_check_interval": 10}
        args = [f"{a.split('=')[0]}={steps[a.split('=')[0]]}" if a.split("=")[0] in steps else a for a in args]
        args.append("++trainer.limit_val_batches=2")
    elif not any(a.startswith("debug=") for a in args):
        args.append("debug=limit")
    if _tiny_backbone(args) == "backbone=tiny_t5":  # random seq2seq models generate to the limit: keep it short
        args += ["task.max_new_tokens=8", *([] if any(a.startswith("task.num_beams=") for a in args) else
                                            ["task.num_beams=1"])]
    if "backbone=bart_small_scratch" in args:  # the named architecture, at a tiny size
        args += ["backbone.config_overrides={d_model: 32, encoder_layers: 1, decoder_layers: 1, encoder_ffn_dim: 64, "
                 "decoder_ffn_dim: 64, encoder_attention_heads: 2, decoder_attention_heads: 2}",
                 "backbone.train_tokenizer.vocab_size=500", "task.num_beams=1"]
    if "task=sft" in args:
        args += [a for a in TINY_SFT[1:] if a.split("=")[0] not in " ".join(args)]
    if real:
        args += ["dataset.max_train_examples=300", "dataset.max_eval_examples=100"]
        if "task=ner" in args:  # 300 training sentences lack some rare POS tags of the validation split
            args.append("dataset.unseen_tags=add")
    if "-m" in args:  # a sweep needs Hydra's launcher: the real command line
        result = run_cli([*args, *QUICK_RUN], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(list((tmp_path / "outputs").rglob("metrics.json"))) == 2
        return
    # The same overrides through Hydra's compose, in this process (the command line itself is tested in test_cli).
    from lightning_ft.train import train

    train(compose_config([*args, *QUICK_RUN], tmp_path))
    assert (tmp_path / "metrics.json").is_file()


@pytest.mark.slow
def test_readme_continued_pretraining_then_fine_tuning_workflow(tmp_path):
    """The README's two commands, in order, through the real command line (real MiniLM, a few batches): the
    classifier starts from the encoder weights that masked-LM training wrote."""
    import torch
    from safetensors.torch import load_file

    workflow = [c for c in commands() if WORKFLOW in c]
    assert len(workflow) == 2 and "task=mlm" in workflow[0]
    text = tmp_path / "domain_text"
    text.mkdir()
    lines = (sample_dir("wikitext2") / "train.txt").read_text().splitlines()
    (text / "train.txt").write_text("\n".join(lines[:300]) + "\n")
    (text / "validation.txt").write_text("\n".join(lines[300:400]) + "\n")
    for command in workflow:
        args = shlex.split(command.replace("<your text dir>", str(text)))[3:]
        # MiniLM's 30k-word masked-LM head on 32 x 128 tokens takes seconds a step on 2 cores: smaller batches here.
        shorter = ["dataset.block_size=64"] if "task=mlm" in args else []
        result = run_cli([*args, "debug=limit", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                          "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "dataset.batch_size=8",
                          *shorter, *QUICK_RUN], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    export = tmp_path / WORKFLOW / "hf_model"
    second_run = next(p.parent for p in (tmp_path / "outputs").rglob("config.yaml")
                      if WORKFLOW not in str(p) and p.parent.name != ".hydra" and "text_classification" in str(p))
    assert f"name: {WORKFLOW}/hf_model" in (second_run / "config.yaml").read_text()
    # What the second run built from that name: MiniLM's encoder as masked-LM training left it.
    mlm_weights = load_file(export / "model.safetensors")
    original = load_file(next(Path(resolve_name(MINILM)).glob("*.safetensors")))
    name = "encoder.layer.0.attention.self.query.weight"
    classifier = TextClassificationTask(backbone={"name": str(export)}, num_labels=2,
                                        id2label={0: "negative", 1: "positive"}).model
    built = classifier.state_dict()[f"bert.{name}"]
    assert torch.equal(built, mlm_weights[f"bert.{name}"]) and not torch.equal(built, original[name])


def test_readme_python_snippet_runs(placeholders):
    for block in blocks("python"):
        code = block
        for key, value in placeholders.items():
            code = code.replace(key, value)
        exec(compile(code, "README.md", "exec"), {})


@pytest.mark.parametrize("command", [c for c in commands() if "lightning_ft.predict" in c])
def test_readme_predict_command_runs(command, tmp_path, request, monkeypatch):
    (tmp_path / "sentences.txt").write_text("Empire State Building is in New York\nHello there, Bob\n")
    (tmp_path / "tokens.conll").write_text("Empire\tB-location\nState\tI-location\n\nBob\tB-person\n")
    (tmp_path / "data").symlink_to(ROOT / "data")  # the commands name data/predict/ inputs, from the clone's root
    for placeholder, fixture in [("<run dir>", "ner_run"), ("<similarity run dir>", "similarity_run"),
                                 ("<sft run dir>", "sft_run")]:
        if placeholder in command:
            command = command.replace(placeholder, shlex.quote(request.getfixturevalue(fixture)))
    if "<exported" in command:
        for key, value in request.getfixturevalue("placeholders").items():
            command = command.replace(key, shlex.quote(value))
    args = shlex.split(command)
    assert "<" not in " ".join(args), f"unknown placeholder in README command: {command}"
    # In this process, from tmp_path (the command line itself: test_predict's entry-point test).
    from lightning_ft.predict import main

    monkeypatch.chdir(tmp_path)
    assert main(args[3:]) == 0
    output = tmp_path / next((a.split("=", 1)[1] for a in args if a.startswith("output=")), args[-1])
    assert output.is_file() and output.stat().st_size > 0


@pytest.mark.parametrize("command", [c for c in commands() if "lightning_ft.search" in c])
def test_readme_search_command_runs(command, tmp_path, similarity_run, monkeypatch, capsys):
    from lightning_ft.search import main

    args = shlex.split(command.replace("<similarity run dir>", shlex.quote(similarity_run)))
    assert "<" not in " ".join(args), f"unknown placeholder in README command: {command}"
    monkeypatch.chdir(tmp_path)
    assert main(args[3:]) == 0
    assert f"nearest to: {args[4]}" in capsys.readouterr().out


def test_readme_says_where_real_data_comes_from_and_points_at_no_local_copy():
    assert "../shared" not in README  # CI's copy of the datasets: a user's clone has none
    for placeholder in REAL_DATA:  # each real dataset a command reads is in the table of sources
        assert f"| `{placeholder}` |" in README, placeholder
    used = {p for c in commands() for p in re.findall(r"<your [^>]*dir>", c)}
    assert set(REAL_DATA) <= used


def test_every_readme_command_is_exercised():
    handled = {"bash scripts/setup.sh && python -m lightning_ft.train", "python -m pytest"}
    for command in commands():
        entry_points = tuple(f"python -m lightning_ft.{name}" for name in ("train", "predict", "search"))
        assert command in handled or command.startswith(entry_points), command
