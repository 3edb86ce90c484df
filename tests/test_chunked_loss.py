"""The causal-LM training loss computed chunk by chunk without the full logits: the same loss and gradients as the
model's own, for GPT-2 and Llama backbones, full fine-tuning and LoRA; refused where the logits are not a plain
product of the decoder's output and the output weight."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_ft import chunked_loss
from lightning_ft.errors import UserError
from lightning_ft.tasks.language_modeling import LanguageModelingTask

DECODERS = {
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "vocab_size": 97},
    "llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "vocab_size": 97, "tie_word_embeddings": True},
}


def _decoder(model_type: str, **overrides):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**DECODERS.get(model_type, {}), **overrides})
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()  # no dropout: comparable


def _batch(vocab: int = 97) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12), generator=generator)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt: no loss there
    labels[2, 9:] = -100
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("chunk_elements", [97 * 4, 2**23])
def test_linear_cross_entropy_equals_the_cross_entropy_of_the_logits_and_its_gradients(chunk_elements):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 97, (3, 7))
    labels[0, :3] = -100
    expected = F.cross_entropy((hidden @ weight.T).flatten(0, 1), labels.flatten(), ignore_index=-100)
    expected_grads = torch.autograd.grad(3 * expected, (hidden, weight))
    loss = chunked_loss.linear_cross_entropy(hidden, weight, labels, chunk_elements=chunk_elements)
    grads = torch.autograd.grad(3 * loss, (hidden, weight))
    assert torch.allclose(loss, expected, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-12)


def test_no_labelled_token_gives_zero_loss_and_zero_gradients():
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    loss = chunked_loss.linear_cross_entropy(hidden, torch.randn(11, 8), torch.full((2, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_chunked_loss_of_a_decoder_equals_its_own_loss_and_gradients(model_type, lora):
    model = _decoder(model_type)
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = ["c_attn", "c_proj"] if model_type == "gpt2" else ["q_proj", "v_proj", "up_proj"]
        get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    assert chunked_loss.skips_logits(model)
    batch = _batch()
    trained = [p for p in model.parameters() if p.requires_grad]
    expected = model(**batch, use_cache=False).loss
    expected_grads = torch.autograd.grad(expected, trained)
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    loss = chunked_loss.causal_lm_loss(model, inputs, batch["labels"])
    grads = torch.autograd.grad(loss, trained)
    assert torch.allclose(loss, expected, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-6)


def test_under_bf16_autocast_the_chunked_loss_is_the_models_within_bf16_precision():
    model = _decoder("llama")
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(**batch, use_cache=False).loss
        loss = chunked_loss.causal_lm_loss(model, {"input_ids": batch["input_ids"]}, batch["labels"])
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) < 2e-2
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in model.parameters())


def test_soft_capped_logits_are_computed_by_the_model_and_requiring_the_chunked_loss_is_refused():
    gemma = _decoder("gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, vocab_size=97, final_logit_softcapping=2.0)
    assert not chunked_loss.skips_logits(gemma)
    assert chunked_loss.resolve(gemma, None) is False and chunked_loss.resolve(gemma, False) is False
    with pytest.raises(UserError, match="task.chunked_loss=true needs logits .* gemma2 .* task.chunked_loss=null"):
        chunked_loss.resolve(gemma, True)
    with pytest.raises(UserError, match="task.chunked_loss=true is for causal LMs"):
        chunked_loss.resolve(_decoder("gpt2"), True, causal=False)


def test_a_clm_task_trains_on_the_chunked_loss_where_asked_and_evaluates_on_the_logits():
    backbone = {"name": None, "pretrained": False, "model_type": "llama", "config_overrides": DECODERS["llama"]}
    task = LanguageModelingTask(objective="clm", backbone=backbone, chunked_loss=None)
    off = LanguageModelingTask(objective="clm", backbone=backbone)  # the default: the model's own loss
    off.load_state_dict(task.state_dict())
    assert task.chunked_loss and not off.chunked_loss
    batch = _batch()
    task.train(), off.train()
    chunked, plain = task(**batch), off(**batch)
    assert chunked.logits is None and plain.logits is not None  # training: no logits at all
    assert torch.allclose(chunked.loss, plain.loss, atol=1e-6)
    task.eval()
    with torch.no_grad():
        assert task(**batch).logits.shape == (3, 12, 97)


def test_under_fsdp_or_deepspeed_the_chunked_loss_is_turned_off_and_under_ddp_kept(monkeypatch):
    from types import SimpleNamespace

    from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    backbone = {"name": None, "pretrained": False, "model_type": "llama", "config_overrides": DECODERS["llama"]}
    task = LanguageModelingTask(objective="clm", backbone=backbone, chunked_loss=True)
    for strategy, kept in ((DDPStrategy, True), (FSDPStrategy, False), (DeepSpeedStrategy, False)):
        task.chunked_loss = True
        fake = SimpleNamespace(strategy=strategy.__new__(strategy))  # (no process group or device needed)
        monkeypatch.setattr(type(task), "trainer", property(lambda self, fake=fake: fake))
        task.on_fit_start()
        assert task.chunked_loss is kept, strategy


def test_with_lora_on_bf16_frozen_weights_the_chunked_loss_is_the_models_within_bf16_precision():
    from types import SimpleNamespace

    from pytorch_lightning.strategies import SingleDeviceStrategy

    backbone = {"name": None, "pretrained": False, "model_type": "llama", "config_overrides": DECODERS["llama"],
                "init_seed": 0, "frozen_dtype": "bfloat16"}
    lora = {"method": "lora", "dropout": 0.0}
    torch.manual_seed(2)
    task = LanguageModelingTask(objective="clm", backbone=backbone, chunked_loss=True, peft=lora)
    torch.manual_seed(2)  # the same adapters
    off = LanguageModelingTask(objective="clm", backbone=backbone, peft=lora)
    for each in (task, off):
        each.trainer = SimpleNamespace(precision="bf16-mixed", strategy=SingleDeviceStrategy("cpu"))
        each.setup("fit")
        each.train()
    assert task.model.get_output_embeddings().weight.dtype == torch.bfloat16
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, plain = task(**batch).loss, off(**batch).loss
    chunked.backward(), plain.backward()
    torch.testing.assert_close(chunked.float(), plain.float(), rtol=2e-2, atol=2e-2)
    grads = {n: p.grad for n, p in task.named_parameters() if p.requires_grad}
    expected = {n: p.grad for n, p in off.named_parameters() if p.requires_grad}
    assert grads.keys() == expected.keys() and all(g is not None and g.dtype == torch.float32 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=5e-2, atol=5e-3, msg=name)
