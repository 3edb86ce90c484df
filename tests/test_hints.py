"""Every key a DataModule or task module takes is in its config (set without `+`), a mistyped key is answered with the
keys meant, and every fix hint the code prints (`dataset.<key>=<value>`...) is itself an override that composes."""

import ast
import inspect
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose_config
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from lightning_ft import tasks
from lightning_ft.config_keys import check_overrides, closest_keys, dotted_keys, override_error
from lightning_ft.paths import config_dir

BASE = "_base"  # conf/dataset/_base.yaml: TaskDataModule's keys, inherited by every sample_<task>.yaml


def given_by_train() -> tuple[set[str], set[str]]:
    """The arguments train.py passes itself, read from its source: to the DataModule (``instantiate(cfg.dataset,
    seed=...)``; the tokenizer comes through ``connect``) and to the task module (build_task's ``task_class(...,
    backbone=..., optimizer=...)``; the data's ``model_kwargs()`` come on top)."""
    tree = ast.parse((ROOT / "lightning_ft" / "train.py").read_text())
    data, task = {"tokenizer"}, set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        names = {k.arg for k in node.keywords if k.arg and not k.arg.startswith("_")}
        if isinstance(node.func, ast.Name) and node.func.id == "task_class":
            task |= names
        if (isinstance(node.func, ast.Name) and node.func.id == "instantiate" and node.args
                and ast.unparse(node.args[0]) == "cfg.dataset"):
            data |= names
    assert {"backbone", "optimizer"} <= task and "seed" in data, "train.py changed: fix given_by_train"
    return data, task


NOT_CONFIG_DATA, NOT_CONFIG_TASK = given_by_train()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def keyword_args(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``cls(...)`` takes: its ``__init__``'s and, through ``**kwargs``, its bases' (the most
    derived class's default wins)."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        signature = inspect.signature(init)
        for name, param in signature.parameters.items():
            if name != "self" and param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
                params.setdefault(name, param)
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return params


def passed_by_the_class(cls: type, name: str, default) -> bool:
    """Whether ``cls`` passes a base's argument itself (Seq2SeqData's max_length is its max_source_length), so a
    config may not give it."""
    try:
        cls(**{name: default})
    except TypeError as err:
        return "multiple values for keyword argument" in str(err)
    except Exception:  # noqa: BLE001 - refused for another reason: the argument itself is taken
        return False
    return False


def data_keys(cls: type) -> dict[str, inspect.Parameter]:
    """The keys a dataset config of ``cls`` must have: what it takes, less what train.py gives."""
    return {name: p for name, p in keyword_args(cls).items()
            if name not in NOT_CONFIG_DATA and not passed_by_the_class(cls, name, p.default)}


def left_to_the_tasks() -> set[str]:
    """TaskDataModule's arguments that some task passes itself (max_length: seq2seq's max_source_length, the language
    models' block_size), so _base.yaml cannot hold them (a config cannot remove a key it inherits): each task that
    takes one has it in its sample config."""
    from lightning_ft.data.base import TaskDataModule

    return {name for name, p in keyword_args(TaskDataModule).items() for spec in tasks.specs()
            if passed_by_the_class(spec.data, name, p.default)}


def task_of_data(cls: type) -> str:
    """A task whose DataModule is ``cls`` (its configs may interpolate ${task.*}); the default one for the base."""
    return next((spec.name for spec in tasks.specs() if spec.data is cls), "text_classification")


def dataset_target(option: str) -> type:
    cfg = compose_config([f"dataset={option}"], Path("/tmp"))
    return get_class(cfg.dataset._target_)


def inherited_files(option: str) -> list[str]:
    """``option`` and the dataset configs it inherits, nearest first."""
    data = yaml.safe_load((config_dir() / "dataset" / f"{option}.yaml").read_text()) or {}
    parents = [d.split("@")[0] for d in data.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return [option, *(name for parent in parents for name in inherited_files(parent))]


def own_dataset_keys(name: str) -> set[str]:
    """The dataset keys a dataset config sets itself (a GLUE config, packaged _global_, sets task keys beside)."""
    text = (config_dir() / "dataset" / f"{name}.yaml").read_text()
    data = yaml.safe_load(text) or {}
    return set(data.get("dataset", {}) if "# @package _global_" in text else data) - {"defaults"}


DATASETS = [o for o in options("dataset") if "# old name, kept for one release" not in
            (config_dir() / "dataset" / f"{o}.yaml").read_text()]


# ---- every key a class takes is in its config ----------------------------------------------------------------------
@pytest.mark.parametrize("option", DATASETS)
def test_every_dataset_config_has_every_key_its_datamodule_takes(tmp_path, option):
    cls = dataset_target(option)
    cfg = compose_config([f"task={task_of_data(cls)}", f"dataset={option}"], tmp_path)
    expected, keys = set(data_keys(cls)), set(cfg.dataset) - {"_target_"}
    if option == BASE:
        expected -= left_to_the_tasks()
    assert not expected - keys, (f"conf/dataset/{option}.yaml lacks {sorted(expected - keys)}, which {cls.__name__} "
                                 f"takes: add them with their defaults to sample_<task>.yaml ({BASE}.yaml for "
                                 "TaskDataModule's)")
    assert not keys - expected, f"conf/dataset/{option}.yaml has {sorted(keys - expected)}, which {cls.__name__} lacks"
    datamodule = instantiate(cfg.dataset, seed=cfg.seed, _convert_="all")  # every key is one the class takes
    assert type(datamodule) is cls
    if option != BASE:
        assert BASE in inherited_files(option), f"conf/dataset/{option}.yaml should inherit {BASE}.yaml"


def _plain_default(value):
    """A default as a config writes it: a dict of nulls (data_files: {train: null...}) means none given."""
    if isinstance(value, dict) and all(v is None for v in value.values()):
        return None
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("option", [o for o in DATASETS if o != BASE])
def test_a_dataset_key_only_base_sets_is_the_datamodules_own_default(tmp_path, option):
    """_base.yaml holds TaskDataModule's defaults; a task whose class defaults differ (multiple choice's
    group_by_length=false) must say so in its sample, or _base.yaml would change what the class does."""
    cls = dataset_target(option)
    cfg = compose_config([f"task={task_of_data(cls)}", f"dataset={option}"], tmp_path)
    own = set()
    for name in inherited_files(option):
        if name != BASE:
            own |= own_dataset_keys(name)
    params = data_keys(cls)
    for key in set(cfg.dataset) - own - {"_target_"}:
        value = _plain_default(OmegaConf.to_container(cfg.dataset, resolve=True)[key])
        assert value == _plain_default(params[key].default), (
            f"dataset={option}: {key}={value!r} comes from {BASE}.yaml but {cls.__name__} defaults to "
            f"{params[key].default!r}: set it in the task's sample config")


@pytest.mark.parametrize("task", options("task"))
def test_every_task_config_has_every_key_its_module_takes(tmp_path, task):
    cfg = compose_config([f"task={task}"], tmp_path)
    cls = get_class(cfg.task._target_)
    datamodule = instantiate(cfg.dataset, seed=cfg.seed, _convert_="all")
    # what build_task adds from the data (labels, choices..., and dataset.packing)
    from_data = set(datamodule.head_kwargs()) | set(datamodule.module_settings)
    takes = set(keyword_args(cls))
    given_by_the_class = {"model_config"} if "model_config" in takes else set()  # a head's own settings
    expected = takes - NOT_CONFIG_TASK - from_data - given_by_the_class
    keys = set(cfg.task) - {"_target_"}
    assert not expected - keys, f"conf/task/{task}.yaml lacks {sorted(expected - keys)}, which {cls.__name__} takes"
    assert not keys - expected, f"conf/task/{task}.yaml has {sorted(keys - expected)}, which the data or train gives"


@pytest.mark.parametrize("override,key,value", [
    ("dataset.val_fraction=0.1", "val_fraction", 0.1),
    ("dataset.data_files.train=train.tsv", "data_files", {"train": "train.tsv"}),
    ("dataset.data_files={train: a.tsv, validation: b.tsv}", "data_files", {"train": "a.tsv", "validation": "b.tsv"}),
    ("dataset.text_pair_column=sentence2", "text_pair_column", "sentence2"),
    ("dataset.text_column=[title,description]", "text_column", ["title", "description"]),
    ("dataset.column_names=[label,title,description]", "column_names", ["label", "title", "description"]),
    ("dataset.max_train_examples=100", "max_train_examples", 100),
    ("dataset.hub_splits.test=validation", "hub_splits", {"test": "validation"}),
    ("dataset.reader_kwargs={delimiter: ';'}", "reader_kwargs", {"delimiter": ";"}),
    ("dataset.cache_dir=/tmp/cache", "cache_dir", "/tmp/cache"),
])
def test_data_keys_are_set_without_plus_on_the_default_dataset(tmp_path, override, key, value):
    cfg = compose_config([override], tmp_path)
    datamodule = instantiate(cfg.dataset, seed=cfg.seed, _convert_="all")
    assert getattr(datamodule, key) == value


# ---- a mistyped key --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("typed,meant", [
    ("dataset.val_fractio", ["dataset.val_fraction"]),
    ("datset.val_fraction", ["dataset.val_fraction"]),
    ("datset.val_fractio", ["dataset.val_fraction"]),
    ("trainer.val_fraction", ["dataset.val_fraction"]),      # the right name under the wrong node
    ("dataset.max_epochs", ["trainer.max_epochs"]),
    ("dataset.data_files.trian", ["dataset.data_files.train"]),
    ("task.treshold", ["task.threshold"]),
    ("seeed", ["seed"]),
    ("+dataset.val_fractio=0.1", ["dataset.val_fraction"]),  # an override as typed
    ("dataset.val_fraction", ["dataset.val_fraction"]),     # a key that exists is its own answer
    ("dataset.zzzzzz", []),
])
def test_closest_keys(tmp_path, typed, meant):
    found = closest_keys(compose_config([], tmp_path), typed)
    assert found[: len(meant)] == meant and len(found) <= 3


def test_hydras_refusal_of_a_mistyped_key_becomes_one_sentence_naming_the_key_meant(tmp_path):
    cfg = compose_config([], tmp_path)
    with pytest.raises(ConfigCompositionException) as refused:
        compose_config(["dataset.val_fractio=0.1"], tmp_path)
    assert "is not in struct" in str(refused.value.__cause__)
    message = override_error(cfg, str(refused.value))
    assert message == "dataset.val_fractio is not a key of the config: did you mean dataset.val_fraction?"
    with pytest.raises(ConfigCompositionException) as refused:
        compose_config(["+dataset.text_column=review"], tmp_path)  # Hydra lets `+` set a null key, not this one
    assert override_error(cfg, str(refused.value)) == (
        "dataset.text_column is already a key of the config: set it without the + (dataset.text_column=...).")
    assert override_error(cfg, "Could not load 'dataset/nope'.") is None  # not about a key: Hydra's words stand
    assert "dataset.data_files" in dotted_keys(cfg) and "dataset.data_files.train" in dotted_keys(cfg)


@pytest.mark.parametrize("args,sentence", [
    (["dataset.val_fractio=0.1"], "dataset.val_fractio is not a key of the config: did you mean dataset.val_fraction?"),
    (["task=ner", "dataset.unseen_tag=add"],  # the keys of the task's own config
     "dataset.unseen_tag is not a key of the config: did you mean dataset.unseen_tags?"),
    (["-m", "optim.lr=1e-5,3e-5", "optim.lrr=1"], "optim.lrr is not a key of the config: did you mean optim.lr?"),
    (["--cfg", "job", "seeed=1"], "seeed is not a key of the config: did you mean seed?"),
    (["+dataset.text_column=x"],
     "dataset.text_column is already a key of the config: set it without the + (dataset.text_column=...)."),
    (["dataset.val_fraction=0.1", "dataset.data_files.train=a.tsv"], None),
    (["-m", "task=ner,qa", "optim.lr=interval(1e-5,1e-4)"], None),
    (["dataset=no_such_dataset"], "dataset=no_such_dataset is not a dataset config: use one of cnn_dailymail, "
     "cola, conll2003, gsm8k, mnli, mrpc, multi30k, openbookqa, qnli, qqp, rte, sample_clm, sample_mlm, "
     "sample_multiple_choice, sample_ner, sample_qa, sample_sft, sample_similarity, sample_stsb, "
     "sample_summarization, sample_text_classification, sample_translation, scitldr, squad, sst2, stsb, stsb_sample, "
     "stsb_similarity, swag, tiny_shakespeare, wikitext2, wmt16_ro_en, wnli, wnut17 "
     "(conf/dataset/, or a file of your own there)."),
])
def test_check_overrides_names_the_key_meant_in_one_sentence(args, sentence):
    assert check_overrides(args) == sentence


# ---- every fix hint composes -----------------------------------------------------------------------------------------
HOLE = "\x00"  # where an f-string puts a value
DEFAULT = compose_config([], Path("/tmp"))
NODES = sorted(k for k, v in DEFAULT.items() if OmegaConf.is_dict(v))  # dataset, task, trainer, optim, backbone...
# key: a node's dotted path or a top-level word; value: {...}, [...] or up to a space or punctuation
HINT = re.compile(r"(?<![\w.+~/<-])((?:" + "|".join(NODES) + r")(?:\.[\w\x00]+)+|[a-z_]+)="
                  r"(\{[^}]*\}|\[[^\]]*\]|[^\s,;:)'\"`]*)")
# Entry points with options of their own (predict's model_dir=, task=...; search's): not overrides of train's config.
OWN_OPTIONS = {"predict.py", "search.py"}


def _strings(tree: ast.AST):
    """Every string literal of a module but docstrings, an f-string's values as HOLE."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            inside.update(id(v) for v in node.values)
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else HOLE for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | inside:
            yield node.lineno, node.value


def hints() -> list[tuple[str, str, str]]:
    """(where, key, value) of every `key=value` hint in lightning_ft's strings, for keys of train's config."""
    top = {k for k, v in DEFAULT.items() if not OmegaConf.is_dict(v)}
    groups = {p.name for p in config_dir().iterdir() if p.is_dir()}
    found = []
    for path in sorted((ROOT / "lightning_ft").rglob("*.py")):
        if path.name in OWN_OPTIONS:
            continue
        for line, text in _strings(ast.parse(path.read_text())):
            for match in HINT.finditer(text):
                key, value = match.group(1), match.group(2).rstrip(".")
                if "." in key or key in top or key in groups:
                    found.append((f"{path.relative_to(ROOT)}:{line}", key, value))
    return found


def tasks_of(where: str) -> list[str]:
    """The tasks a hint in ``where`` is about: those of its task package (all of them elsewhere)."""
    parts = Path(where.split(":")[0]).parts
    if len(parts) > 2 and parts[1] == "tasks" and parts[2] not in ("base.py", "spec.py", "__init__.py"):
        return [s.name for s in tasks.specs() if s.module.__module__.startswith(f"lightning_ft.tasks.{parts[2]}.")]
    return []


def _composes(overrides: list[str], tmp_path) -> bool:
    try:
        compose_config(overrides, tmp_path)
        return True
    except ConfigCompositionException:
        return False


def _key_exists(overrides: list[str], key: str, tmp_path) -> bool:
    """For a hint whose value is a placeholder: the key (up to a placeholder in it) names a key or group."""
    cfg = compose_config(overrides, tmp_path)
    path = key.split(HOLE)[0].rstrip(".")
    if "." not in key and (config_dir() / key).is_dir():
        return True  # a group: task=<name>
    return path in dotted_keys(cfg)


def _distinct(found: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """One case per hint and the tasks it must compose with (the same hint in several messages composes once)."""
    seen: set = set()
    out = []
    for where, key, value in found:
        mark = (tuple(tasks_of(where)), key, value)
        if mark not in seen:
            seen.add(mark)
            out.append((where, key, value))
    return out


HINTS = _distinct(hints())


def test_the_hint_scan_finds_the_hints(tmp_path):
    found = {(key, value) for _, key, value in HINTS}
    for hint in [("dataset.val_fraction", "0.1"), ("dataset.unseen_tags", "add"), ("dataset.packing", "line_by_line"),
                 ("resume", "auto"), ("trainer.precision", "32-true")]:
        assert hint in found, f"{hint} is no longer found: fix the scan (or the hint moved)"
    assert len({where.split(":")[0] for where, _, _ in HINTS}) > 10


@pytest.mark.parametrize("where,key,value", HINTS, ids=[f"{w}:{k}" for w, k, _ in HINTS])
def test_every_fix_hint_composes(tmp_path, where, key, value):
    placeholder = HOLE in key + value or "<" in value or "..." in value or "%" in value or not value
    settings = [[f"task={t}"] for t in tasks_of(where)] or [[]]

    def fine(extra: list[str]) -> bool:
        if placeholder:
            return _key_exists(extra, key, tmp_path)
        return _composes([*extra, f"{key}={value}"], tmp_path)

    if tasks_of(where):  # a task's hint composes on that task's config (each task of the package)
        bad = [extra for extra in settings if not fine(extra)]
        assert not bad, f"{where}: {key}={value} does not compose with {bad}"
        return
    # elsewhere: on the default config, or (a key of one backbone, trainer or task) with some option of its group
    group = key.split(".")[0]
    others = [[f"{group}={o}"] for o in options(group)] if group != key and (config_dir() / group).is_dir() else []
    assert fine([]) or any(fine(extra) for extra in others + [[f"task={t}"] for t in options("task")]), \
        f"{where}: {key}={value} composes on no config"
