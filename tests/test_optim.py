"""AdamW groups, warmup schedules, and bf16 training with a fused AdamW and gradient clipping."""

import functools

import pytest
import pytorch_lightning as pl
import torch
from conftest import MINILM, TINY
from test_data import split_files

from lightning_ft.optim import parameter_groups, warmup_schedule
from lightning_ft.tasks.text_classification import TextClassificationData, TextClassificationTask

TINY_BACKBONE = {"name": MINILM, "pretrained": False, "config_overrides": TINY}


def test_no_weight_decay_on_biases_and_layernorm():
    module = TextClassificationTask(backbone=TINY_BACKBONE, num_labels=2, id2label={0: "a", 1: "b"})
    decay, keep = parameter_groups(module.model, weight_decay=0.01)
    names = {id(p): n for n, p in module.model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert keep["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
    assert all(n.endswith("bias") or "LayerNorm" in n for n in kept)
    assert all(not n.endswith("bias") and "LayerNorm" not in n for n in decayed)
    assert "bert.embeddings.LayerNorm.weight" in kept and "bert.embeddings.word_embeddings.weight" in decayed
    assert len(kept) + len(decayed) == len(names)


def test_configure_optimizers_uses_the_partial_and_steps_the_schedule(tmp_path):
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    scheduler = functools.partial(warmup_schedule, name="linear", warmup_ratio=0.5)
    module = TextClassificationTask(backbone=TINY_BACKBONE, num_labels=2, id2label={0: "a", 1: "b"},
                                    optimizer=optimizer, scheduler=scheduler)
    dm = TextClassificationData(tokenizer=MINILM, data_dir=str(split_files(tmp_path, [["a b", 0], ["c", 1]] * 8,
                                                                          [["d", 0]])), batch_size=4)
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[Record()])
    trainer.fit(module, datamodule=dm)
    groups = trainer.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    # 8 steps, warmup 4: 0, 1/4, 2/4, 3/4 of the peak, then linear decay to 0.
    assert lrs == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4])


@pytest.mark.parametrize("name,halfway", [("linear", 0.5), ("cosine", 0.5), ("constant_with_warmup", 1.0)])
def test_warmup_as_a_fraction(name, halfway):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = warmup_schedule(optimizer, total_steps=110, name=name, warmup_ratio=0.1)
    lrs = []
    for _ in range(110):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == 0.0 and lrs[11] == pytest.approx(1.0)
    assert lrs[11 + 49] == pytest.approx(halfway, abs=0.02)


def test_bf16_with_fused_adamw_and_gradient_clipping_trains_and_clips(tmp_path):
    rows = [[" ".join(["good"] * (i % 7 + 1)), i % 2] for i in range(32)]
    dm = TextClassificationData(tokenizer=MINILM, data_dir=str(split_files(tmp_path, rows, rows[:4])), batch_size=8)
    module = TextClassificationTask(backbone=TINY_BACKBONE, num_labels=2, id2label={0: "a", 1: "b"},
                                    optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, fused=True))
    norms = []

    class ClipProbe(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            # Lightning runs backward and clipping inside step(closure): after step, .grad holds what was applied.
            def record(optimizer, *args, **kwargs):
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

            trainer.optimizers[0].register_step_post_hook(record)

    before = module.model.classifier.weight.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", gradient_clip_val=0.01, max_epochs=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[ClipProbe()])
    trainer.fit(module, datamodule=dm)
    assert len(norms) == 4 and max(norms) <= 0.01 * 1.001
    assert not torch.equal(before, module.model.classifier.weight)


def test_a_training_step_is_the_hf_trainers_step_exactly(tmp_path):
    """Same batches, dropout off, fp32: three optimizer steps of lightning_ft and of the Hugging Face Trainer (fused
    AdamW, no decay on biases/LayerNorm, linear decay, clipping at 1.0) leave bit-identical weights."""
    import copy

    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainingArguments

    rows = [[f"{'good' if i % 2 else 'bad'} movie number {i} " + "word " * (i % 7), i % 2] for i in range(24)]
    dm = TextClassificationData(tokenizer=MINILM, data_dir=str(split_files(tmp_path / "data", rows, rows[:4])),
                                batch_size=8)
    dm.prepare_data()
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01, fused=True)
    scheduler = functools.partial(warmup_schedule, name="linear", warmup_ratio=0.0)
    torch.manual_seed(0)
    module = TextClassificationTask(backbone=TINY_BACKBONE, optimizer=optimizer, scheduler=scheduler,
                                    **dm.model_kwargs())
    for layer in module.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    reference = copy.deepcopy(module.model)
    initial = copy.deepcopy(module.model.state_dict())

    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, gradient_clip_val=1.0, precision="32-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(dm.datasets["train"], batch_size=8, collate_fn=dm.collate))

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, learning_rate=1e-3,
                             weight_decay=0.01, max_grad_norm=1.0, num_train_epochs=1, lr_scheduler_type="linear",
                             warmup_steps=0, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
                             train_sampling_strategy="sequential", disable_tqdm=True)
    Trainer(model=reference, args=args, train_dataset=dm.datasets["train"], data_collator=dm.collate).train()
    ours, theirs = module.model.state_dict(), reference.state_dict()
    assert trainer.global_step == 3
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert not torch.equal(ours["classifier.weight"], initial["classifier.weight"]), "the steps changed the weights"
