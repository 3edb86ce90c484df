"""Private (underscore) APIs of other libraries that lightning_ft relies on, each pinned to exactly the behaviour the
code needs: an upgrade that changes one fails here, naming the file that relies on it, instead of in a user's run.

These tests use the third-party libraries directly (not lightning_ft's modules, which may move), so they keep
passing while lightning_ft is reorganised, and fail only when a library changes.
"""

import csv
import inspect
from pathlib import Path

import pytest
import torch

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


# ---- sacrebleu ------------------------------------------------------------------------------------------------


def test_sacrebleu_chrf_corpus_statistics_add_up_to_its_corpus_score():
    """lightning_ft/metrics/generation.py, ``ChrF.__init__``/``update``/``compute``: the state is a long tensor of
    ``3 * (char_order + word_order)`` counts; ``update`` sums the per-sentence rows of
    ``CHRF._extract_corpus_statistics(preds, streams)`` (streams: one list per reference position, aligned with the
    predictions, ``None`` where an example has fewer references), and ``compute`` is
    ``CHRF._compute_score_from_stats(summed).score``: sacreBLEU's own corpus chrF, also when the sums come from
    several batches (or DDP ranks)."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    assert (chrf.char_order, chrf.word_order) == (6, 0)  # chrF (not chrF++), the metric the results report
    assert list(inspect.signature(chrf._extract_corpus_statistics).parameters) == ["hypotheses", "references"]
    assert list(inspect.signature(chrf._compute_score_from_stats).parameters) == ["stats"]

    hyps = ["the cat sat on the mat", "a dog barked", "hello"]
    refs = [["the cat sat on a mat", "a cat sat on the mat"], ["the dog barked"], ["hello there", "hi"]]
    depth = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(depth)]  # what ChrF.update builds

    rows = chrf._extract_corpus_statistics(hyps, streams)
    size = 3 * (chrf.char_order + chrf.word_order)
    assert len(rows) == len(hyps)
    assert all(len(row) == size and all(isinstance(v, int) for v in row) for row in rows)

    # one batch, and two batches summed: both are the corpus score sacreBLEU computes itself
    expected = chrf.corpus_score(hyps, streams).score
    summed = [sum(column) for column in zip(*rows)]
    assert chrf._compute_score_from_stats(summed).score == pytest.approx(expected)
    first = chrf._extract_corpus_statistics(hyps[:2], [s[:2] for s in streams])
    second = chrf._extract_corpus_statistics(hyps[2:], [s[2:] for s in streams])
    by_batch = (torch.tensor(first).sum(0) + torch.tensor(second).sum(0)).tolist()
    assert chrf._compute_score_from_stats(by_batch).score == pytest.approx(expected)
    assert 0 < expected < 100


# ---- torchdata ------------------------------------------------------------------------------------------------


class _Reversed(torch.utils.data.Sampler):
    """An order-only sampler without ``state_dict``, as lightning_ft's ``EpochShuffle``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self):
        return iter(range(self.size - 1, -1, -1))

    def __len__(self) -> int:
        return self.size


def test_torchdata_num_yielded_counts_the_batches_read_in_the_epoch():
    """lightning_ft/data/base.py, ``ResumableLoader.load_state_dict``: ``StatefulDataLoader.state_dict()`` has an
    int ``_num_yielded``, the number of batches the current epoch has yielded (``len(loader)`` once its last batch
    is out), and loading a state with fewer than ``len(loader)`` makes a fresh loader continue the epoch right after
    them, in the sampler's order, also for a sampler that has no state of its own (``EpochShuffle``)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader():
        return StatefulDataLoader(list(range(10)), batch_size=2, sampler=_Reversed(10))

    first = loader()
    assert len(first) == 5
    batches = iter(first)
    assert first.state_dict()["_num_yielded"] == 0
    assert [next(batches).tolist() for _ in range(2)] == [[9, 8], [7, 6]]
    state = first.state_dict()
    assert type(state["_num_yielded"]) is int and state["_num_yielded"] == 2

    resumed = loader()
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == [[5, 4], [3, 2], [1, 0]]  # the rest of the interrupted epoch
    assert [b.tolist() for b in resumed] == [[9, 8], [7, 6], [5, 4], [3, 2], [1, 0]]  # then whole epochs

    for _ in range(3):
        next(batches)
    assert first.state_dict()["_num_yielded"] == len(first)  # after the last batch, before StopIteration


# ---- Lightning ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Experiment logs directory")
def test_lightning_csv_logger_experiment_is_cached_in_underscore_experiment(tmp_path):
    """lightning_ft/lifecycle.py, ``CSVLogger.experiment``: Lightning's ``CSVLogger.experiment`` is a property (the
    subclass overrides it and calls ``super().experiment``) that caches its writer in ``_experiment`` (None until
    the first access); creating the writer deletes an existing ``metrics.csv`` of a non-empty ``log_dir`` (why the
    subclass reads the kept rows first); and after the subclass rewrites the file with its old header, setting the
    writer's ``metrics_keys`` to that header makes ``save`` append under it (and rewrite it when a key is new)."""
    from pytorch_lightning.loggers import CSVLogger

    assert isinstance(inspect.getattr_static(CSVLogger, "experiment"), property)
    path = tmp_path / "metrics.csv"
    header = ["epoch", "step", "val/loss"]
    path.write_text("epoch,step,val/loss\n0,4,0.5\n")
    logger = CSVLogger(save_dir=tmp_path, name="", version="")  # as conf/logger/csv.yaml: log_dir is run_dir
    assert Path(logger.log_dir) == tmp_path
    assert logger._experiment is None

    writer = logger.experiment
    assert logger._experiment is writer and logger.experiment is writer
    assert not path.exists()  # Lightning removed the earlier attempt's log

    with path.open("w", newline="") as f:  # what lightning_ft's CSVLogger puts back
        out = csv.DictWriter(f, fieldnames=header)
        out.writeheader()
        out.writerow({"epoch": 0, "step": 4, "val/loss": 0.5})
    assert isinstance(writer.metrics_keys, list)
    writer.metrics_keys = sorted(header)
    writer.log_metrics({"epoch": 1, "val/loss": 0.25}, step=9)
    writer.save()
    with path.open(newline="") as f:
        assert [(r["step"], r["val/loss"]) for r in csv.DictReader(f)] == [("4", "0.5"), ("9", "0.25")]
    writer.log_metrics({"epoch": 1, "train/loss": 0.75}, step=10)
    writer.save()
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == sorted([*header, "train/loss"])
    assert [r["step"] for r in rows] == ["4", "9", "10"]


def _position_module(reset: bool, accumulate_log: list | None = None):
    """A module whose ``configure_optimizers`` does what lightning_ft's ``TaskModule.configure_optimizers`` does."""
    import pytorch_lightning as pl
    from torchdata.stateful_dataloader import StatefulDataLoader

    class Loader(StatefulDataLoader):
        loaded: list = []

        def load_state_dict(self, state):
            Loader.loaded.append(dict(state))
            super().load_state_dict(state)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.seen: list[int] = []
            self.set_up_early: bool | None = None
            self.loader_class = Loader

        def train_dataloader(self):
            return Loader(torch.arange(6.0), batch_size=1)

        def training_step(self, batch, batch_idx):
            self.seen.append(int(batch[0]))
            return self.layer(batch.view(-1, 1)).sum()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if accumulate_log is not None:
                accumulate_log.append(self.trainer.fit_loop._should_accumulate())

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
            assert self.trainer.estimated_stepping_batches > 0
            self.set_up_early = self.trainer.fit_loop._combined_loader is not None
            if reset:
                self.trainer.fit_loop._combined_loader = None
            return optimizer

    return Module()


def _trainer(**kwargs):
    import pytorch_lightning as pl

    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


@pytest.mark.filterwarnings("ignore")
def test_lightning_fit_loop_combined_loader_reset_makes_fit_restore_the_data_position(tmp_path):
    """lightning_ft/tasks/base.py, ``TaskModule.configure_optimizers``: ``trainer.estimated_stepping_batches`` sets
    the training loader up into ``trainer.fit_loop._combined_loader`` before a checkpoint's loop state is restored;
    setting that attribute to None makes fit set the loader up again after the restore, so a run resumed from a
    mid-epoch checkpoint gets the loader's saved state (``_num_yielded``, see ResumableLoader) and trains on the
    rest of the epoch, not on its start."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loops.fit_loop import _FitLoop

    assert "_combined_loader" in inspect.getsource(_FitLoop.__init__)
    first = _position_module(reset=True)
    # max_epochs as lightning_ft sets it (with max_epochs=-1 Lightning estimates from max_steps, setting nothing up)
    _trainer(max_epochs=1, max_steps=3, callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3)]).fit(first)
    assert first.set_up_early is True
    assert first.seen == [0, 1, 2]
    [checkpoint] = tmp_path.glob("*.ckpt")

    resumed = _position_module(reset=True)
    resumed.loader_class.loaded.clear()
    _trainer(max_epochs=1, default_root_dir=tmp_path).fit(resumed, ckpt_path=checkpoint)
    assert [state["_num_yielded"] for state in resumed.loader_class.loaded] == [3]
    assert resumed.seen == [3, 4, 5]


@pytest.mark.filterwarnings("ignore")
def test_lightning_fit_loop_should_accumulate_is_false_on_batches_that_step():
    """lightning_ft/throughput.py, ``ThroughputMonitor.on_train_batch_end``: ``trainer.fit_loop._should_accumulate()``
    exists and, in ``on_train_batch_end``, is False exactly for the batches that ended with an optimizer step (every
    ``accumulate_grad_batches``-th, and the epoch's last), so the monitor logs once per optimizer step."""
    log: list[bool] = []
    module = _position_module(reset=False, accumulate_log=log)
    module.train_dataloader = lambda: torch.utils.data.DataLoader(torch.arange(5.0), batch_size=1)
    _trainer(max_epochs=1, accumulate_grad_batches=2, enable_checkpointing=False).fit(module)
    assert log == [True, False, True, False, False]


@pytest.mark.filterwarnings("ignore")
def test_lightning_batch_progress_counts_every_epochs_batches_and_num_training_batches_is_an_epochs_length():
    """lightning_ft/data/base.py, ``_epoch_of_next_batch``: ``trainer.fit_loop.epoch_loop.batch_progress.total.ready``
    counts the training batches fetched over every epoch (not reset per epoch), and ``trainer.num_training_batches``
    is one epoch's batches (after limit_train_batches) by the time an epoch's iterator is made."""
    seen: list[tuple[int, int]] = []
    module = _position_module(reset=False)

    def train_dataloader():
        class Counting(torch.utils.data.Sampler):
            def __iter__(self):
                trainer = module.trainer
                seen.append((trainer.fit_loop.epoch_loop.batch_progress.total.ready, trainer.num_training_batches))
                return iter(range(6))

            def __len__(self):
                return 6

        return torch.utils.data.DataLoader(torch.arange(6.0), batch_size=1, sampler=Counting())

    module.train_dataloader = train_dataloader
    _trainer(max_epochs=3, limit_train_batches=4, enable_checkpointing=False).fit(module)
    assert seen == [(0, 4), (4, 4), (8, 4)]


def test_lightning_module_underscore_trainer_is_none_until_attached():
    """lightning_ft/tasks/base.py, ``TaskModule.on_load_checkpoint``: a LightningModule's ``_trainer`` is None while
    no Trainer is attached (``module.trainer`` then raises, hence the check on ``_trainer``), and is the Trainer
    once ``module.trainer`` is set."""
    import pytorch_lightning as pl

    module = pl.LightningModule()
    assert module._trainer is None
    with pytest.raises(RuntimeError, match="not attached"):
        module.trainer  # noqa: B018
    trainer = _trainer(max_epochs=1)
    module.trainer = trainer
    assert module._trainer is trainer


# ---- transformers ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qa_dir(tmp_path_factory) -> str:
    """A tiny BERT for extractive QA, saved with MiniLM's tokenizer, as an exported lightning_ft QA model."""
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoTokenizer

    from lightning_ft.backbones import resolve_name

    path = tmp_path_factory.mktemp("tiny_qa")
    config = AutoConfig.from_pretrained(resolve_name(MINILM), hidden_size=2, num_hidden_layers=1,
                                        num_attention_heads=1, intermediate_size=2)
    AutoModelForQuestionAnswering.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_name(MINILM)).save_pretrained(path)
    return str(path)


@pytest.fixture
def registered(monkeypatch):
    """``register(task, pipeline_class, pt_model)`` through transformers' public registry, undone after the test."""
    from transformers.pipelines import PIPELINE_REGISTRY

    tasks = PIPELINE_REGISTRY.supported_tasks
    before: dict = {}

    def register(task, pipeline_class, pt_model):
        before.setdefault(task, tasks.get(task))
        PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=pipeline_class, pt_model=pt_model, type="text")

    yield register
    for task, entry in before.items():
        if entry is None:
            tasks.pop(task, None)
        else:
            tasks[task] = entry


@pytest.mark.parametrize("task", ["question-answering", "translation", "summarization", "text2text-generation"])
def test_transformers_removed_tasks_refuses_names_before_registered_pipelines(task, tiny_qa_dir, registered,
                                                                                monkeypatch):
    """lightning_ft/qa_pipeline.py and lightning_ft/seq2seq_pipeline.py, ``register``: ``pipeline(task)`` refuses a
    name listed in the dict ``transformers.pipelines.REMOVED_TASKS`` (a KeyError, read at call time, before the
    registered pipelines are looked at), and once the name is popped from that dict (``register``'s
    ``getattr(pipelines, "REMOVED_TASKS", {}).pop(task, None)``) a pipeline registered under it is built; its
    ``_load_tokenizer = True`` makes ``pipeline(task, model=<directory>)`` load the directory's tokenizer."""
    from transformers import AutoModelForQuestionAnswering, Pipeline, pipeline, pipelines

    class Probe(Pipeline):
        _load_tokenizer = True

        def _sanitize_parameters(self, **kwargs):
            return {}, {}, {}

        def preprocess(self, inputs):
            return self.tokenizer(inputs, return_tensors="pt")

        def _forward(self, model_inputs):
            return self.model(**model_inputs)

        def postprocess(self, model_outputs):
            return {"positions": int(model_outputs.start_logits.shape[-1])}

    assert isinstance(inspect.getattr_static(Pipeline, "_load_tokenizer"), (bool, type(None)))
    registered(task, Probe, AutoModelForQuestionAnswering)
    removed = getattr(pipelines, "REMOVED_TASKS", None)
    if removed is not None:
        assert isinstance(removed, dict)
        monkeypatch.setitem(removed, task, "Gone.")
        with pytest.raises(KeyError, match="removed"):
            pipeline(task, model=tiny_qa_dir)
        monkeypatch.delitem(removed, task)  # what register() does
    built = pipeline(task, model=tiny_qa_dir)
    assert type(built) is Probe
    assert built.tokenizer is not None and built.tokenizer.name_or_path == tiny_qa_dir
    assert built("hello world") == {"positions": 4}  # [CLS] hello world [SEP]


def test_transformers_length_grouped_indices():
    """lightning_ft/data/base.py, ``EpochShuffle.__iter__``: ``transformers.trainer_pt_utils`` (the Trainer's
    internals) has ``get_length_grouped_indices(lengths, batch_size, mega_batch_mult=None, generator=None)``, which
    returns a permutation of the rows drawn from ``generator`` alone (the global random state is untouched, the same
    seed gives the same order: exact resume), in mega-batches of ``min(n // (4 * batch_size), 50)`` batches sorted
    by decreasing length, the longest row first."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    assert list(inspect.signature(get_length_grouped_indices).parameters) == [
        "lengths", "batch_size", "mega_batch_mult", "generator"]
    lengths = torch.randperm(400, generator=torch.Generator().manual_seed(1)).tolist()  # distinct lengths
    global_state = torch.random.get_rng_state()
    order = get_length_grouped_indices(lengths, 2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), global_state)
    assert order == get_length_grouped_indices(lengths, 2, generator=torch.Generator().manual_seed(7))
    assert order != get_length_grouped_indices(lengths, 2, generator=torch.Generator().manual_seed(8))
    assert sorted(order) == list(range(400)) and all(type(i) is int for i in order)
    assert lengths[order[0]] == max(lengths)
    mega = 2 * min(400 // (4 * 2), 50)
    for start in range(0, 400, mega):
        chunk = [lengths[i] for i in order[start + 1:start + mega]]  # the first row may be swapped with the longest
        assert chunk == sorted(chunk, reverse=True)


# ---- datasets -------------------------------------------------------------------------------------------------


def test_datasets_fingerprint_identifies_the_source_files_and_transforms(tmp_path):
    """lightning_ft/data/base.py, ``_fingerprint`` (the tokenized-data cache key of ``TaskDataModule._prepare``): a
    file-backed ``Dataset`` has ``cache_files`` and a str ``_fingerprint`` that is the same when the same file is
    loaded again, differs when the file's content differs and after a transform; ``map(new_fingerprint=...)`` sets
    it. An in-memory dataset has no ``cache_files``, and its ``data.schema``/``data.table`` (a pyarrow Table) are
    what the key hashes instead."""
    import pyarrow as pa
    from datasets import Dataset, load_dataset

    source = tmp_path / "train.csv"
    cache = str(tmp_path / "cache")

    def load():
        return load_dataset("csv", data_files={"train": str(source)}, cache_dir=cache)["train"]

    source.write_text("text,label\ngood,1\nbad,0\n")
    first, again = load(), load()
    assert first.cache_files and isinstance(first._fingerprint, str) and first._fingerprint
    assert again._fingerprint == first._fingerprint
    mapped = first.map(lambda batch: {"n": [len(t) for t in batch["text"]]}, batched=True)
    assert mapped._fingerprint != first._fingerprint
    assert first.map(lambda batch: batch, batched=True, new_fingerprint="lft-key")._fingerprint == "lft-key"
    source.write_text("text,label\ngood,1\nbad,1\n")
    assert load()._fingerprint != first._fingerprint

    in_memory = Dataset.from_dict({"tokens": [["a", "b"]], "ner_tags": [[0, 1]]})
    assert not in_memory.cache_files
    assert isinstance(in_memory.data.table, pa.Table) and in_memory.data.schema == in_memory.data.table.schema


# ---- torch ----------------------------------------------------------------------------------------------------


def test_torch_cpu_bf16_probes_return_bools():
    """lightning_ft/throughput.py, ``bf16_is_native`` (trainer.precision=auto): ``torch.cpu._is_avx512_bf16_supported``
    and ``torch.cpu._is_amx_tile_supported`` exist and return a bool, True only where the CPU has the feature."""
    avx512_bf16 = torch.cpu._is_avx512_bf16_supported()
    amx_tile = torch.cpu._is_amx_tile_supported()
    assert type(avx512_bf16) is bool and type(amx_tile) is bool
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return
    assert not avx512_bf16 or "avx512_bf16" in flags
    assert not amx_tile or "amx_tile" in flags


def test_torch_fused_optimizer_says_it_unscales_in_step():
    """lightning_ft/tasks/base.py, ``TaskModule.configure_gradient_clipping``: a fused torch optimizer has
    ``_step_supports_amp_scaling`` True (it unscales fp16 gradients inside ``step``); an unfused one has it False
    or not at all (``getattr(optimizer, "_step_supports_amp_scaling", False)``)."""
    weight = torch.nn.Parameter(torch.zeros(2))
    assert torch.optim.AdamW([weight], fused=True)._step_supports_amp_scaling is True
    assert not getattr(torch.optim.AdamW([weight]), "_step_supports_amp_scaling", False)
    assert not getattr(torch.optim.AdamW([weight], foreach=True), "_step_supports_amp_scaling", False)


# ---- omegaconf ------------------------------------------------------------------------------------------------


def test_omegaconf_get_node_returns_children_unresolved():
    """lightning_ft/sweep.py, ``_leaf_keys`` (checking a search space's keys): ``DictConfig._get_node(key)`` returns
    the child node without resolving it: a DictConfig for a nested mapping, a non-DictConfig node for any other
    value, also for interpolations that cannot resolve outside Hydra, point to a mapping, and for missing (???)."""
    from omegaconf import DictConfig, OmegaConf

    config = OmegaConf.create({"nested": {"leaf": 1}, "env": "${oc.env:LFT_SURELY_UNSET_VARIABLE}",
                               "hydra_only": "${hydra:runtime.choices}", "alias": "${nested}", "missing": "???",
                               "plain": 3})
    kinds = {key: isinstance(config._get_node(key), DictConfig) for key in config}
    assert kinds == {"nested": True, "env": False, "hydra_only": False, "alias": False, "missing": False,
                     "plain": False}
    assert config._get_node("nested")._get_node("leaf")._value() == 1


# ---- torch -------------------------------------------------------------------------------------------------------


def test_inductors_compile_fx_is_a_torch_compile_backend_that_trains():
    """lightning_ft/compiling.py, ``compile_model``: ``torch._inductor.compile_fx.compile_fx(graph, example_inputs)``
    is what ``backend="inductor"`` runs, callable from a backend of one's own (which counts and times it): the
    compiled module computes the eager outputs and gradients."""
    from torch._inductor.compile_fx import compile_fx

    calls = []

    def backend(graph, example_inputs):
        calls.append(len(example_inputs))
        return compile_fx(graph, example_inputs)

    class TwoLayers(torch.nn.Module):  # not nn.Sequential: dynamo does not trace torch's own modules' code
        def __init__(self, first, second):
            super().__init__()
            self.first, self.second = first, second

        def forward(self, x):
            return self.second(torch.nn.functional.gelu(self.first(x)))

    torch.manual_seed(0)
    eager = TwoLayers(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    compiled = TwoLayers(eager.first, eager.second)  # the same parameters
    compiled.compile(backend=backend)
    x = torch.randn(3, 4)
    expected = eager(x)
    expected.sum().backward()
    grads = [p.grad.clone() for p in eager.parameters()]
    eager.zero_grad()
    got = compiled(x)
    got.sum().backward()
    assert calls, "the backend was never called"
    torch.testing.assert_close(got, expected)
    for p, g in zip(compiled.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # nn.Module.compile keeps the names
