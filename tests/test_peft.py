"""Training part of a model: LoRA through peft for every kind of head, backbone.freeze, layer-wise learning rates,
gradient checkpointing, QLoRA's refusal without CUDA, the export (merged or an adapter directory), and
checkpoints that hold only what trains and still resume and predict."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import MINILM, QUICK, TINY, compose_config, random_sentences
from pytorch_lightning.strategies import FSDPStrategy, SingleDeviceStrategy
from safetensors.torch import load_file

from lightning_ft.backbones import head_modules, layer_stacks, parameter_depths, stack_linear_names
from lightning_ft.errors import UserError
from lightning_ft.optim import parameter_groups
from lightning_ft.paths import config_dir
from lightning_ft.peft import target_pattern
from lightning_ft.tasks.base import FROZEN_CHECKSUM
from lightning_ft.tasks.text_classification import TextClassificationTask
from lightning_ft.train import build_task, train

TINY_BERT = {"name": MINILM, "pretrained": False, "config_overrides": TINY, "init_seed": 0}
LABELS = {0: "negative", 1: "positive"}
TEXTS = ["a gripping , beautifully acted film", "dull , lifeless and far too long", "it 's fine"]


def classifier(**kwargs):
    kwargs.setdefault("backbone", TINY_BERT)
    return TextClassificationTask(num_labels=2, id2label=LABELS, **kwargs)


def state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def tiny_model(model_type: str, auto: str = "AutoModelForCausalLM", **config):
    import transformers

    return getattr(transformers, auto).from_config(transformers.AutoConfig.for_model(model_type, **config))


TINY_CONFIGS = {
    "bert": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "vocab_size": 100},
    "t5": {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2,
           "vocab_size": 100},
    "llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "vocab_size": 100},
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """72 training and 16 validation sentences: 9 batches of 8 per epoch."""
    return random_sentences(tmp_path_factory.mktemp("data"), {"train": 72, "validation": 16})


# ---- what goes where: the head, the layers, the adapters' targets --------------------------------------------------
def test_default_targets_are_the_linear_layers_inside_each_architectures_layers():
    assert stack_linear_names(tiny_model("bert", "AutoModelForSequenceClassification", **TINY_CONFIGS["bert"])) == [
        "query", "key", "value", "dense"]
    assert stack_linear_names(tiny_model("llama", **TINY_CONFIGS["llama"])) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert stack_linear_names(tiny_model("gpt2", **TINY_CONFIGS["gpt2"])) == ["c_attn", "c_proj", "c_fc"]
    t5 = tiny_model("t5", "AutoModelForSeq2SeqLM", **TINY_CONFIGS["t5"])
    assert stack_linear_names(t5) == ["q", "k", "v", "o", "wi", "wo"]
    gated = tiny_model("t5", "AutoModelForSeq2SeqLM", **TINY_CONFIGS["t5"], feed_forward_proj="gated-gelu")
    assert stack_linear_names(gated) == ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
    assert layer_stacks(t5) == [("encoder.block", 1), ("decoder.block", 1)]  # the outer lists, in flow order
    # the pattern keeps a pooler's or a classifier's own `dense` out: only layers inside the layer list match
    bert = tiny_model("roberta", "AutoModelForSequenceClassification", **TINY_CONFIGS["bert"])
    import re

    pattern = target_pattern(bert, None)
    adapted = [n for n, _ in bert.named_modules() if re.fullmatch(pattern, n)]
    assert "roberta.encoder.layer.1.output.dense" in adapted and len(adapted) == 2 * 6
    assert not any(n.startswith(("classifier", "roberta.pooler")) for n in adapted)


def test_the_head_is_what_the_task_adds_and_a_language_models_own_head_is_not():
    cfg = TINY_CONFIGS["bert"]
    assert head_modules(tiny_model("bert", "AutoModelForSequenceClassification", **cfg)) == ["classifier"]
    assert head_modules(tiny_model("bert", "AutoModelForTokenClassification", **cfg)) == ["classifier"]
    assert head_modules(tiny_model("bert", "AutoModelForQuestionAnswering", **cfg)) == ["qa_outputs"]
    assert head_modules(tiny_model("bert", "AutoModelForMultipleChoice", **cfg)) == ["classifier"]
    assert head_modules(tiny_model("distilbert", "AutoModelForSequenceClassification", dim=32, n_layers=2, n_heads=2,
                                   hidden_dim=64)) == ["pre_classifier", "classifier"]
    assert head_modules(tiny_model("gpt2", "AutoModelForSequenceClassification", **TINY_CONFIGS["gpt2"])) == ["score"]
    assert head_modules(tiny_model("bert", "AutoModelForMaskedLM", **cfg)) == []  # cls holds the tied decoder
    assert head_modules(tiny_model("gpt2", **TINY_CONFIGS["gpt2"])) == []
    assert head_modules(tiny_model("t5", "AutoModelForSeq2SeqLM", **TINY_CONFIGS["t5"])) == []
    assert head_modules(tiny_model("bert", "AutoModel", **cfg)) == []  # the similarity task's bare encoder


# ---- LoRA runs ------------------------------------------------------------------------------------------------------
def test_lora_trains_the_adapters_and_the_head_saves_small_checkpoints_and_exports_a_plain_model(
        data_dir, tmp_path, caplog):
    from transformers import AutoTokenizer, pipeline

    from lightning_ft.predict import main as predict

    quick = [*QUICK, f"dataset.data_dir={data_dir}", "dataset.batch_size=8", "trainer.precision=32-true"]
    full = tmp_path / "full"
    train(compose_config([*quick, "test=false", "export=false"], full))
    run = tmp_path / "lora"
    with caplog.at_level(logging.INFO, logger="lightning_ft"):
        train(compose_config([*quick, "peft=lora", "peft.r=4"], run))
    metrics = json.loads((run / "metrics.json").read_text())
    # the share of the model that trains: rank-4 adapters on 6 matrices x 2 layers, and the classifier (32*2 + 2)
    adapters = 2 * (4 * (32 + 32) * 4 + 4 * (32 + 64) * 2)
    assert metrics["parameters"]["trainable"] == adapters + 66
    assert metrics["parameters"]["trainable_share"] < 0.01
    assert json.loads((full / "metrics.json").read_text())["parameters"]["trainable_share"] == 1.0
    assert f"trainable parameters: {adapters + 66:,} of" in caplog.text and "(peft=lora)" in caplog.text

    # the checkpoint: the adapters, the trained head, the frozen weights' checksum, and their optimizer state alone
    last = run / "checkpoints" / "last.ckpt"
    keys = state_dict_of(last)
    assert keys and all("lora_" in k or "classifier.modules_to_save" in k or k == FROZEN_CHECKSUM for k in keys)
    assert last.stat().st_size < 0.2 * (full / "checkpoints" / "last.ckpt").stat().st_size

    # the export is a plain Hugging Face directory that the pipeline reads like a fully fine-tuned one
    export = run / "hf_model"
    exported = load_file(export / "model.safetensors")
    assert not [k for k in exported if "lora" in k or "modules_to_save" in k or "base_layer" in k]
    module = TextClassificationTask.load_from_checkpoint(metrics["best_model_path"], map_location="cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    with torch.no_grad():
        probs = torch.softmax(module(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits, -1)
    predicted = pipeline("text-classification", model=str(export))(TEXTS)
    assert [p["label"] for p in predicted] == [module.model.config.id2label[int(i)] for i in probs.argmax(-1)]
    assert [p["score"] for p in predicted] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)

    # predict rebuilds the module from the checkpoint's hyper-parameters (peft included) and takes its weights
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    output = tmp_path / "o.jsonl"
    assert predict([f"ckpt_path={metrics['best_model_path']}", f"input={source}", f"output={output}"]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["score"] for r in rows] == pytest.approx([p["score"] for p in predicted], abs=1e-5)


def test_a_lora_run_resumes_where_it_stopped_as_if_never_interrupted(data_dir, tmp_path):
    # a constant learning rate: stopping after epoch 1 then going on to 2 is then the same run as 2 epochs at once
    args = [*QUICK, f"dataset.data_dir={data_dir}", "dataset.batch_size=8", "trainer.precision=32-true",
            "scheduler=constant", "peft=lora", "test=false", "export=false"]
    whole = tmp_path / "whole"
    train(compose_config([*args, "trainer.max_epochs=2"], whole))
    run = tmp_path / "interrupted"
    train(compose_config([*args, "trainer.max_epochs=1"], run))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    train(compose_config([*args, "trainer.max_epochs=2", "resume=auto"], run))
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 10
    assert json.loads((run / "metrics.json").read_text())["resumed_from"].endswith("last.ckpt")
    expected = state_dict_of(whole / "checkpoints" / "last.ckpt")
    assert resumed["state_dict"].keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed["state_dict"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("task,backbone,auto,extra", [
    ("ner", "tiny_bert", "AutoModelForTokenClassification", []),
    ("qa", "tiny_bert", "AutoModelForQuestionAnswering", []),
    ("multiple_choice", "tiny_bert", "AutoModelForMultipleChoice", []),
    ("clm", "tiny_gpt2", "AutoModelForCausalLM", []),
    ("sft", "tiny_gpt2", "AutoModelForCausalLM", ["dataset.chat_template=chatml", "dataset.max_length=256",
                                                  "task.max_new_tokens=8", "task.generate_limit=4",
                                                  "task.test_generate_limit=4"]),
    ("translation", "tiny_t5", "AutoModelForSeq2SeqLM", ["task.max_new_tokens=8", "task.num_beams=2"]),
])
def test_lora_works_for_every_kind_of_head(tmp_path, task, backbone, auto, extra):
    import transformers

    from lightning_ft import tasks

    cfg = compose_config([f"task={task}", f"backbone={backbone}", "debug=limit", "~callbacks.progress_bar",
                          "trainer.precision=32-true", "peft=lora", *extra], tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 < metrics["parameters"]["trainable_share"] < 0.2
    keys = state_dict_of(tmp_path / "checkpoints" / "last.ckpt")
    head = [k for k in keys if "modules_to_save" in k]
    # a task's own head trains in full; a language model's output layer (tied to the embeddings) does not
    assert bool(head) == (task in ("ner", "qa", "multiple_choice"))
    assert all("lora_" in k for k in set(keys) - set(head) - {FROZEN_CHECKSUM})

    # the merged export computes what the trained module computes
    module = tasks.get(task).module.load_from_checkpoint(metrics["best_model_path"], map_location="cpu").eval()
    exported = getattr(transformers, auto).from_pretrained(tmp_path / "hf_model").eval()
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    if task == "translation":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6]])
    if task == "multiple_choice":  # one question, two choices
        inputs = {k: torch.stack([v, v.flip(-1) if k == "input_ids" else v], 1) for k, v in inputs.items()}
    with torch.no_grad():
        mine, theirs = module.model(**inputs), exported(**inputs)
    for name in ("start_logits", "end_logits") if task == "qa" else ("logits",):
        torch.testing.assert_close(getattr(theirs, name), getattr(mine, name), rtol=1e-5, atol=1e-5, msg=name)


def test_peft_merge_false_writes_an_adapter_directory_that_peft_loads_on_its_base(data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train(compose_config([*QUICK, f"dataset.data_dir={data_dir}", "dataset.batch_size=8", "trainer.precision=32-true",
                          "peft=lora", "peft.merge=false", "peft.use_rslora=true", "test=false"], tmp_path))
    export = tmp_path / "hf_model"
    config = json.loads((export / "adapter_config.json").read_text())
    assert (export / "adapter_model.safetensors").is_file() and config["use_rslora"] is True
    saved = load_file(export / "adapter_model.safetensors")
    assert any("classifier.modules_to_save" in k or k.startswith("base_model.model.classifier") for k in saved)
    # tiny_bert is built from a config: its base is saved beside the adapters, and the adapter config names it
    assert Path(config["base_model_name_or_path"]) == (export / "base_model").resolve()
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"])
    loaded = PeftModel.from_pretrained(base, export).eval()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    module = TextClassificationTask.load_from_checkpoint(metrics["best_model_path"], map_location="cpu").eval()
    batch = AutoTokenizer.from_pretrained(export)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, module(**batch).logits, rtol=1e-5, atol=1e-6)


def test_an_adapter_export_of_a_pretrained_backbone_names_it_and_peft_loads_it(tiny_pretrained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    module = classifier(backbone={"name": tiny_pretrained, "init_seed": 0}, peft={"method": "lora", "merge": False})
    torch.manual_seed(0)
    with torch.no_grad():  # as training would: adapters and head away from their initial values
        for param in module.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_pretrained)
    export = module.export(tmp_path / "hf_model", tokenizer)
    config = json.loads((export / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == Path(tiny_pretrained).resolve()
    assert not (export / "base_model").exists()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_pretrained, num_labels=2)
    loaded = PeftModel.from_pretrained(base, export).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, module.eval()(**batch).logits, rtol=1e-5, atol=1e-6)


# ---- freezing, layer-wise learning rates, gradient checkpointing ----------------------------------------------------
def trainable(module) -> set[str]:
    return {n.removeprefix("model.") for n, p in module.named_parameters() if p.requires_grad}


def test_freeze_fixes_the_embeddings_the_first_layers_or_the_whole_backbone(caplog):
    everything = trainable(classifier())
    embeddings = {n for n in everything if n.startswith("bert.embeddings.")}
    layer0 = {n for n in everything if n.startswith("bert.encoder.layer.0.")}
    head = {"classifier.weight", "classifier.bias"}
    freeze = lambda spec: trainable(classifier(backbone={**TINY_BERT, "freeze": spec}))  # noqa: E731
    assert freeze("embeddings") == everything - embeddings
    assert freeze(0) == everything - embeddings
    assert freeze(1) == everything - embeddings - layer0
    assert freeze(2) == {n for n in everything if n.startswith(("bert.pooler.", "classifier."))}
    with caplog.at_level(logging.INFO, logger="lightning_ft"):
        assert freeze("all") == head  # a linear probe
    assert "trainable parameters: 66 of" in caplog.text
    with pytest.raises(UserError, match=r"backbone.freeze=3 is more layers than BertForSequenceClassification has "
                                        r"\(2 in bert.encoder.layer\): give 0 to 2, embeddings, or all"):
        freeze(3)
    with pytest.raises(UserError, match="backbone.freeze='layers' is not a choice"):
        freeze("layers")
    with pytest.raises(UserError, match="backbone.freeze=-1 is not a choice"):
        freeze(-1)
    with pytest.raises(UserError, match="backbone.freeze and peft=lora both choose what trains"):
        classifier(backbone={**TINY_BERT, "freeze": 1}, peft={"method": "lora"})


def test_freeze_all_on_a_language_model_is_refused_it_has_no_head_of_its_own():
    from lightning_ft.tasks.language_modeling import LanguageModelingTask

    backbone = {"name": None, "pretrained": False, "model_type": "gpt2", "config_overrides": TINY_CONFIGS["gpt2"],
                "freeze": "all"}
    with pytest.raises(UserError, match="backbone.freeze=all leaves nothing to train"):
        LanguageModelingTask(backbone=backbone)


def test_a_linear_probe_run_checkpoints_and_reloads_only_its_head(data_dir, tmp_path):
    train(compose_config([*QUICK, f"dataset.data_dir={data_dir}", "dataset.batch_size=8", "backbone.freeze=all",
                          "test=false"], tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["parameters"]["trainable"] == 66
    assert set(state_dict_of(tmp_path / "checkpoints" / "last.ckpt")) == {
        "model.classifier.weight", "model.classifier.bias", FROZEN_CHECKSUM}
    # the rebuilt module (its frozen backbone drawn again from the run's seed) is the exported model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    module = TextClassificationTask.load_from_checkpoint(metrics["best_model_path"], map_location="cpu").eval()
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf_model").eval()
    batch = AutoTokenizer.from_pretrained(tmp_path / "hf_model")(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, module(**batch).logits)
    # a backbone that is not the one it was trained on is refused, not silently combined with the head
    other = classifier(backbone={**TINY_BERT, "freeze": "all", "init_seed": 1})
    with pytest.raises(UserError, match="these weights were trained on a frozen .* backbone that differs"):
        other.load_state_dict(state_dict_of(tmp_path / "checkpoints" / "last.ckpt"))


def learning_rates(model, groups) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr"] for g in groups for p in g["params"]}


def test_layer_decay_gives_each_depth_its_learning_rate_bert_and_gpt2():
    model = classifier().model
    groups = parameter_groups(model, weight_decay=0.01, layer_decay=0.5, lr=1.0)
    lrs = learning_rates(model, groups)
    assert lrs["classifier.weight"] == lrs["bert.pooler.dense.weight"] == 1.0
    assert lrs["bert.encoder.layer.1.attention.self.query.weight"] == lrs["bert.encoder.layer.1.output.dense.bias"] \
        == 0.5
    assert lrs["bert.encoder.layer.0.intermediate.dense.weight"] == 0.25
    assert lrs["bert.embeddings.word_embeddings.weight"] == lrs["bert.embeddings.LayerNorm.weight"] == 0.125
    assert len(lrs) == len(list(model.parameters()))
    # composed with the no-weight-decay groups: biases and norms keep 0 at every depth
    for group in groups:
        names = {n for n, p in model.named_parameters() if any(p is q for q in group["params"])}
        no_decay = {n for n in names if n.endswith("bias") or "LayerNorm" in n}
        assert no_decay in (set(), names) and group["weight_decay"] == (0.0 if no_decay else 0.01)

    gpt2 = tiny_model("gpt2", **TINY_CONFIGS["gpt2"])
    lrs = learning_rates(gpt2, parameter_groups(gpt2, weight_decay=0.0, layer_decay=0.9, lr=1e-3))
    assert lrs["transformer.ln_f.weight"] == pytest.approx(1e-3)
    assert lrs["transformer.h.1.attn.c_attn.weight"] == pytest.approx(9e-4)
    assert lrs["transformer.h.0.mlp.c_fc.weight"] == pytest.approx(8.1e-4)
    assert lrs["transformer.wte.weight"] == lrs["transformer.wpe.weight"] == pytest.approx(7.29e-4)  # tied lm_head
    depths, layers = parameter_depths(tiny_model("llama", **TINY_CONFIGS["llama"]))
    assert layers == 2 and depths["model.embed_tokens.weight"] == 0 and depths["model.layers.0.mlp.up_proj.weight"] == 1
    assert depths["model.layers.1.self_attn.o_proj.weight"] == 2 and depths["lm_head.weight"] == 3  # untied: the top
    depths, layers = parameter_depths(tiny_model("t5", "AutoModelForSeq2SeqLM", **TINY_CONFIGS["t5"]))
    assert layers == 2 and depths["encoder.block.0.layer.0.SelfAttention.q.weight"] == 1
    assert depths["decoder.block.0.layer.1.EncDecAttention.k.weight"] == 2 and depths["shared.weight"] == 0


def test_optim_layer_decay_reaches_the_optimizer_and_bad_values_are_refused(tmp_path):
    data = SimpleNamespace(model_kwargs=lambda: {"num_labels": 2, "id2label": LABELS})
    cfg = compose_config([*QUICK, "~scheduler", "optim.layer_decay=0.9", "optim.lr=1e-3", "peft=lora"], tmp_path)
    module = build_task(cfg, data)
    optimizer = module.configure_optimizers()  # an AdamW without a layer_decay argument
    lrs = learning_rates(module.model, optimizer.param_groups)
    assert lrs["classifier.modules_to_save.default.weight"] == pytest.approx(1e-3)
    assert lrs["bert.encoder.layer.1.attention.self.query.lora_A.default.weight"] == pytest.approx(9e-4)
    assert lrs["bert.encoder.layer.0.output.dense.lora_B.default.weight"] == pytest.approx(8.1e-4)
    grouped = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert grouped == module.trainable_parameters[0] and "layer_decay" not in module.hparams
    with pytest.raises(UserError, match=r"optim.layer_decay=1.5 is not in \(0, 1\]"):
        build_task(compose_config([*QUICK, "optim.layer_decay=1.5"], tmp_path), data)


@pytest.mark.parametrize("peft", [None, {"method": "lora", "dropout": 0.1}])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(peft):
    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(1)  # the same adapters' initial weights (the backbone's come from its init_seed)
        module = classifier(backbone={**TINY_BERT, "gradient_checkpointing": checkpointing}, peft=peft)
        assert module.model.is_activation_checkpointing is checkpointing
        module.train()
        torch.manual_seed(0)  # the same dropout masks in both
        batch = {"input_ids": torch.randint(5, 1000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long),
                 "labels": torch.tensor([0, 1, 1, 0])}
        loss = module(**batch).loss
        loss.backward()
        return loss, {n: p.grad for n, p in module.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(False)
    checkpointed_loss, checkpointed_grads = loss_and_grads(True)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=1e-5)
    assert grads.keys() == checkpointed_grads.keys() and all(g is not None for g in checkpointed_grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_gradient_checkpointing_is_refused_for_a_model_without_it():
    albert = {"name": None, "pretrained": False, "model_type": "albert", "gradient_checkpointing": True,
              "config_overrides": {"hidden_size": 32, "embedding_size": 16, "num_hidden_layers": 2,
                                   "num_attention_heads": 2, "intermediate_size": 64}}
    with pytest.raises(UserError, match="backbone.gradient_checkpointing=true: AlbertForSequenceClassification does "
                                        "not support gradient checkpointing in transformers; set backbone"):
        classifier(backbone=albert)


# ---- frozen weights in half precision ------------------------------------------------------------------------------
def test_frozen_dtype_stores_the_frozen_weights_in_bf16_and_trains_the_rest_in_float32():
    torch.manual_seed(1)
    reference = classifier(peft={"method": "lora", "dropout": 0.0})
    torch.manual_seed(1)  # the same adapters
    module = classifier(backbone={**TINY_BERT, "frozen_dtype": "bfloat16"}, peft={"method": "lora", "dropout": 0.0})
    assert {p.dtype for p in module.parameters()} == {torch.float32}  # until a Trainer's precision says to
    module.trainer = SimpleNamespace(precision="bf16-mixed", strategy=SingleDeviceStrategy("cpu"))
    module.setup("fit")
    frozen = [p for p in module.parameters() if not p.requires_grad]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}
    frozen_bytes = sum(p.numel() * p.element_size() for p in frozen)
    assert frozen_bytes == sum(p.numel() * 2 for p in reference.parameters() if not p.requires_grad)

    batch = {"input_ids": torch.randint(5, 1000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1, 0])}
    losses = {}
    for name, each in (("bf16 frozen", module), ("float32 frozen", reference)):
        each.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[name] = each(**batch).loss
        losses[name].backward()
        grads = [p.grad for p in each.parameters() if p.requires_grad]
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads), name
    # the same matrix products in bf16 either way: the frozen weights' rounding is the only difference
    torch.testing.assert_close(losses["bf16 frozen"], losses["float32 frozen"], rtol=2e-2, atol=2e-2)
    # the checksum that a resumed run checks is the loaded weights', whatever their storage
    assert torch.equal(module._frozen_checksum, reference._frozen_checksum)

    probe = classifier(backbone={**TINY_BERT, "freeze": "all", "frozen_dtype": "bfloat16"})  # a linear probe
    probe.trainer = SimpleNamespace(precision="bf16", strategy=SingleDeviceStrategy("cpu"))  # bf16: bf16-mixed
    probe.setup("fit")
    assert {n: p.dtype for n, p in probe.model.named_parameters() if p.requires_grad} == {
        "classifier.weight": torch.float32, "classifier.bias": torch.float32}
    assert {p.dtype for p in probe.model.bert.parameters()} == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe(**batch).loss.backward()
    assert probe.model.classifier.weight.grad.dtype == torch.float32


def test_frozen_dtype_is_refused_where_it_cannot_run_and_an_evaluation_in_float32_keeps_float32(tmp_path, monkeypatch):
    module = classifier(backbone={**TINY_BERT, "frozen_dtype": "bfloat16"}, peft={"method": "lora"})
    module.trainer = SimpleNamespace(precision="32-true", strategy=SingleDeviceStrategy("cpu"))
    with pytest.raises(UserError, match=r"backbone.frozen_dtype=bfloat16 needs the training to compute in bfloat16, "
                                        r"and trainer.precision is 32-true: set trainer.precision=bf16-mixed, or "):
        module.setup("fit")
    module.setup("validate")  # an evaluation without autocast: the weights stay as loaded
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    module.trainer = SimpleNamespace(precision="bf16-mixed", strategy=FSDPStrategy())
    with pytest.raises(UserError, match="backbone.frozen_dtype=bfloat16 keeps two dtypes in the model, which "
                                        "FSDPStrategy does not take: set backbone.frozen_dtype=null, or train"):
        module.setup("fit")
    with pytest.raises(UserError, match="backbone.frozen_dtype=bfloat16: every weight trains, so none would be "
                                        "stored in it; use it with peft=lora or backbone.freeze"):
        classifier(backbone={**TINY_BERT, "frozen_dtype": "bfloat16"})
    with pytest.raises(UserError, match="backbone.frozen_dtype='int8' is not a choice: give bfloat16 or float16"):
        classifier(backbone={**TINY_BERT, "frozen_dtype": "int8"}, peft={"method": "lora"})

    import lightning_ft.tasks.base

    monkeypatch.setattr(lightning_ft.tasks.base, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match="trainer.precision is 32-true: set trainer.precision=bf16-mixed"):
        train(compose_config([*QUICK, "peft=lora", "backbone.frozen_dtype=bfloat16", "trainer.precision=32-true"],
                             tmp_path))


def test_a_lora_run_with_bf16_frozen_weights_checkpoints_resumes_and_exports_float32(data_dir, tmp_path):
    from transformers import pipeline

    from lightning_ft.predict import main as predict

    args = [*QUICK, f"dataset.data_dir={data_dir}", "dataset.batch_size=8", "peft=lora",
            "backbone.frozen_dtype=bfloat16", "trainer.precision=bf16-mixed", "scheduler=constant"]
    run = tmp_path / "run"
    train(compose_config([*args, "trainer.max_epochs=1", "export=false", "test=false"], run))
    keys = state_dict_of(run / "checkpoints" / "last.ckpt")
    assert all("lora_" in k or "classifier.modules_to_save" in k or k == FROZEN_CHECKSUM for k in keys)
    assert {t.dtype for k, t in keys.items() if k != FROZEN_CHECKSUM} == {torch.float32}
    train(compose_config([*args, "trainer.max_epochs=2", "resume=auto"], run))  # the checksum matches on resume
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("last.ckpt")

    # the export: float32 throughout, the frozen weights those the run trained with (bf16 values)
    exported = load_file(run / "hf_model" / "model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.float32}
    embeddings = exported["bert.embeddings.word_embeddings.weight"]
    assert torch.equal(embeddings, embeddings.bfloat16().float())
    predicted = pipeline("text-classification", model=str(run / "hf_model"))(TEXTS)
    # predict from the checkpoint computes in float32 on the weights as loaded: the same answers, to bf16's rounding
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert predict([f"ckpt_path={metrics['best_model_path']}", f"input={source}", f"output={output}"]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["label"] for r in rows] == [p["label"] for p in predicted]
    assert [r["score"] for r in rows] == pytest.approx([p["score"] for p in predicted], abs=2e-2)


# ---- QLoRA, configs and bad input -----------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_qlora_without_cuda_is_refused_in_one_sentence_before_the_model(tmp_path, monkeypatch):
    import lightning_ft.tasks.base

    monkeypatch.setattr(lightning_ft.tasks.base, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    message = "peft=qlora needs a CUDA GPU and the bitsandbytes package (pip install bitsandbytes), and this machine"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        train(compose_config(["debug=limit", "~callbacks.progress_bar", "peft=qlora"], tmp_path))
    assert str(err.value).count(". ") == 0 and "use peft=lora, or run on a CUDA machine." in str(err.value)
    with pytest.raises(UserError, match="peft=qlora needs a CUDA GPU"):
        classifier(peft={"method": "qlora"})


def test_the_peft_configs_compose_and_full_fine_tuning_is_the_default(tmp_path):
    assert compose_config([], tmp_path).peft == {"method": "none"}
    lora = compose_config(["peft=lora", "peft.target_modules=[query,value]", "peft.r=16"], tmp_path).peft
    assert lora.method == "lora" and list(lora.target_modules) == ["query", "value"] and lora.r == 16 and lora.merge
    qlora = compose_config(["peft=qlora"], tmp_path).peft
    assert qlora.method == "qlora" and qlora.r == 8 and qlora.quant_type == "nf4" and qlora.merge is False
    for name in sorted(p.stem for p in (config_dir() / "backbone").glob("*.yaml")):
        backbone = compose_config([f"backbone={name}"], tmp_path).backbone
        assert backbone.freeze is None and backbone.gradient_checkpointing is False, name
        assert backbone.frozen_dtype is None, name
    assert compose_config([], tmp_path).optim.layer_decay is None


def test_bad_peft_settings_are_refused_in_one_sentence_naming_the_key():
    with pytest.raises(UserError, match=r"peft.target_modules names querry, which is not a linear layer of Bert"
                                        r"ForSequenceClassification's layers: choose from query, key, value, dense"):
        classifier(peft={"method": "lora", "target_modules": ["querry"]})
    for r in (0, -2, 1.5):
        with pytest.raises(UserError, match=rf"peft.r={r} is not a positive whole number"):
            classifier(peft={"method": "lora", "r": r})
    with pytest.raises(UserError, match="peft.bias='some' is not a choice: use one of none, all, lora_only"):
        classifier(peft={"method": "lora", "bias": "some"})
    with pytest.raises(UserError, match="peft=prefix is not a method: use one of none, lora, qlora"):
        classifier(peft={"method": "prefix"})
    # an architecture whose weight matrices are not in a layer list peft's LoRA can adapt
    flat = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2))
    with pytest.raises(UserError, match=r"peft cannot wrap Sequential: it found no linear layers inside a layer list "
                                        r"\(none found; its linear layers: 1\)"):
        target_pattern(flat, None)
