"""The base DataModule: local formats, tokenized-data caching, shuffling, and a clear error for each bad input."""

import json
import logging
import random
import re

import pytest
import torch
from conftest import MINILM, TINY, write_tsv

from lightning_ft.backbones import load_model
from lightning_ft.errors import UserError
from lightning_ft.paths import sample_dir
from lightning_ft.tasks.text_classification import TextClassificationData


def make_dm(**kwargs) -> TextClassificationData:
    kwargs.setdefault("tokenizer", MINILM)
    return TextClassificationData(**kwargs)


def split_files(tmp_path, train_rows, val_rows, header=("text", "label")):
    write_tsv(tmp_path / "train.tsv", list(header), train_rows)
    write_tsv(tmp_path / "validation.tsv", list(header), val_rows)
    return tmp_path


def test_second_identical_run_reads_tokenized_cache(tmp_path):
    settings = {"data_dir": str(sample_dir("sst2")), "text_column": "sentence", "cache_dir": str(tmp_path)}
    first = make_dm(**settings)
    first.prepare_data()
    assert first.examples_tokenized == 1200 + 300 + 872

    second = make_dm(**settings)  # a new process would build a new tokenizer object too
    second.prepare_data()
    assert second.examples_tokenized == 0, "an identical second run must not tokenize again"
    assert second.datasets["train"][5] == first.datasets["train"][5]

    changed = make_dm(**settings, max_length=16)  # a different setting is a different cache entry
    changed.prepare_data()
    assert changed.examples_tokenized == 1200 + 300 + 872
    assert max(len(ids) for ids in changed.datasets["train"]["input_ids"]) == 16


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "jsonl.gz"])
def test_local_formats(tmp_path, fmt):
    import gzip

    import pandas as pd

    rows = {"train": [("nice film", "pos"), ("awful", "neg"), ("great", "pos")], "validation": [("bad", "neg")]}
    files = {}
    for split, data in rows.items():
        frame = pd.DataFrame(data, columns=["review", "stars"])
        path = tmp_path / f"{split}.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        elif fmt == "parquet":
            frame.to_parquet(path)
        else:
            text = frame.to_json(orient="records", lines=True)
            path.write_bytes(gzip.compress(text.encode()) if fmt.endswith(".gz") else text.encode())
        files[split] = path.name
    dm = make_dm(data_dir=str(tmp_path), data_files=files, text_column="review", label_column="stars")
    dm.prepare_data()
    assert len(dm.datasets["train"]) == 3 and dm.id2label == {0: "neg", 1: "pos"}
    assert dm.datasets["validation"][0]["labels"] == 0


def test_val_fraction_holds_out_part_of_train(tmp_path):
    write_tsv(tmp_path / "train.tsv", ["text", "label"], [[f"text {i}", i % 2] for i in range(50)])
    dm = make_dm(data_dir=str(tmp_path), val_fraction=0.2)
    dm.prepare_data()
    assert len(dm.datasets["train"]) == 40 and len(dm.datasets["validation"]) == 10


def test_training_batches_are_shuffled_and_padded_dynamically(tmp_path):
    rows = [[" ".join(["word"] * (1 + i % 30)), i % 2] for i in range(64)]
    dm = make_dm(data_dir=str(split_files(tmp_path, rows, rows[:8])), batch_size=8)
    dm.prepare_data()
    loader = dm.train_dataloader()
    first_epoch = [b["labels"].tolist() for b in loader]
    loader.sampler.set_epoch(1)  # as Lightning does before each epoch
    second_epoch = [b["labels"].tolist() for b in loader]
    assert first_epoch != second_epoch
    # the order depends on (seed, epoch) only, not on the global random state: a resumed run replays it
    torch.manual_seed(123)
    again = dm.train_dataloader()
    again.sampler.set_epoch(1)
    assert [b["labels"].tolist() for b in again] == second_epoch
    lengths = {b["input_ids"].shape[1] for b in dm.train_dataloader()}
    assert len(lengths) > 1 and max(lengths) <= 32, "each batch is padded to its own longest row"


def test_truncation_is_counted_and_reported(tmp_path, caplog):
    rows = [["long " * 40, 0], ["short", 1], ["long " * 50, 1]]
    dm = make_dm(data_dir=str(split_files(tmp_path, rows, rows[:1])), max_length=16)
    with caplog.at_level(logging.WARNING):
        dm.prepare_data()
    assert dm.truncated == {"train": 2, "validation": 1}
    assert "2 of 3 train examples were longer than max_length=16" in caplog.text


# ---- bad input: one clear sentence naming the thing and the fix -------------------------------------------------
def test_missing_column(tmp_path):
    dm = make_dm(data_dir=str(sample_dir("sst2")), text_column="review")
    with pytest.raises(UserError, match=r"column 'review' is missing from the train split \(it has: sentence, label\)"):
        dm.prepare_data()


def test_label_in_validation_never_seen_in_training(tmp_path):
    dm = make_dm(data_dir=str(split_files(tmp_path, [["a", "pos"], ["b", "neg"]], [["c", "pos"], ["d", "neutral"]])))
    with pytest.raises(UserError, match=r"label 'neutral' in row 1 of the validation split never appears in the train"):
        dm.prepare_data()


def test_empty_split(tmp_path):
    dm = make_dm(data_dir=str(split_files(tmp_path, [["a", "pos"], ["b", "neg"]], [])))
    empty = r"the validation split of the dataset is empty \(.*validation.tsv\): give it at least one row"
    with pytest.raises(UserError, match=empty):
        dm.prepare_data()


def test_data_dir_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match=r"dataset.data_dir '.*/nowhere' does not exist .*fix the path"):
        make_dm(data_dir=str(tmp_path / "nowhere")).prepare_data()


def test_data_file_that_does_not_exist(tmp_path):
    dm = make_dm(data_dir=str(tmp_path), data_files={"train": "train.csv", "validation": "dev.csv"})
    with pytest.raises(UserError, match=r"dataset.data_files.train '.*train.csv' does not exist"):
        dm.prepare_data()


def test_no_validation_split_says_how_to_get_one(tmp_path):
    write_tsv(tmp_path / "train.tsv", ["text", "label"], [["a", 0], ["b", 1]])
    with pytest.raises(UserError, match="no validation split.*dataset.val_fraction"):
        make_dm(data_dir=str(tmp_path)).prepare_data()


def test_single_label_column_is_rejected(tmp_path):
    dm = make_dm(data_dir=str(split_files(tmp_path, [["a", "x"], ["b", "x"]], [["c", "x"]])))
    with pytest.raises(UserError, match="a single label .* check dataset.label_column"):
        dm.prepare_data()


def test_unknown_problem_type():
    with pytest.raises(UserError, match="dataset.problem_type 'binary' is not one of"):
        make_dm(data_dir=".", problem_type="binary")


@pytest.mark.parametrize("name", ["train.jsonl", "train.jsonl.gz", "train.json"])
def test_a_malformed_json_line_names_the_file_and_line(tmp_path, name):
    import gzip

    text = '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n{not json\n{"text": "c", "label": 1}\n'
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    (tmp_path / "validation.jsonl").write_text('{"text": "a", "label": 1}\n')
    dm = make_dm(data_dir=str(tmp_path))
    dm.encode = None  # refused before any tokenizing
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:4 is not JSON \(.*\): write one object a line\.$"):
        dm.prepare_data()


def test_a_json_line_that_is_not_an_object_names_the_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 1}\n["b", 0]\n')
    (tmp_path / "validation.jsonl").write_text('{"text": "a", "label": 1}\n')
    with pytest.raises(UserError, match=r"train.jsonl:2 is a JSON list, not an object: write one object a line"):
        make_dm(data_dir=str(tmp_path)).prepare_data()


def test_a_broken_json_document_names_the_file_and_line(tmp_path):
    (tmp_path / "train.json").write_text('[{"text": "a", "label": 1},\n {"text": "b", "label": 0}\n')  # no ]
    (tmp_path / "validation.jsonl").write_text('{"text": "a", "label": 1}\n')
    with pytest.raises(UserError, match=r"train.json:3 is not JSON \(.*\): fix the file\.$"):
        make_dm(data_dir=str(tmp_path)).prepare_data()


# ---- finding the split files in data_dir ---------------------------------------------------------------------------
def _rows(path, rows=(("good", "pos"), ("bad", "neg"))):
    return write_tsv(path, ["text", "label"], [list(r) for r in rows])


def test_split_files_are_found_by_their_exact_names_only(tmp_path, caplog):
    _rows(tmp_path / "train.tsv")
    _rows(tmp_path / "train.bak.tsv", [("old", "x")] * 2)  # sorts before train.tsv: once picked silently
    _rows(tmp_path / "dev.tsv")
    _rows(tmp_path / "validation_old.tsv")
    dm = make_dm(data_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="lightning_ft.data.base"):
        assert dm._local_files() == {"train": [tmp_path / "train.tsv"], "validation": [tmp_path / "dev.tsv"]}
    assert "train.bak.tsv" in caplog.text and "validation_old" not in caplog.text
    dm.prepare_data()
    assert dm.id2label == {0: "neg", 1: "pos"}  # train.bak.tsv's single label "x" never came in


@pytest.mark.parametrize("alias", ["validation", "valid", "dev", "val"])
def test_every_validation_alias_and_compressed_files_are_found(tmp_path, alias):
    import gzip

    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n'))
    _rows(tmp_path / f"{alias}.tsv")
    found = make_dm(data_dir=str(tmp_path))._local_files()
    assert found == {"train": [tmp_path / "train.jsonl.gz"], "validation": [tmp_path / f"{alias}.tsv"]}


@pytest.mark.parametrize("names,split,listed", [
    (["train.tsv", "train.csv"], "train", "train.csv, train.tsv"),
    (["dev.tsv", "validation.tsv"], "validation", "validation.tsv, dev.tsv"),  # in SPLIT_NAMES' order
    (["test.jsonl", "test.jsonl.gz"], "test", "test.jsonl, test.jsonl.gz")])
def test_several_files_for_one_split_are_refused_naming_them(tmp_path, names, split, listed):
    for name in {"train.tsv", "validation.tsv", *names}:
        (tmp_path / name).write_text("text\tlabel\na\t0\n")
    first = listed.split(", ")[0]
    with pytest.raises(UserError, match=rf"holds several {split} files \({re.escape(listed)}\): name the one to use "
                                        rf"with dataset.data_files.{split}={re.escape(first)}\.$"):
        make_dm(data_dir=str(tmp_path)).prepare_data()


# ---- header-less csv/tsv -------------------------------------------------------------------------------------------
AG_NEWS = ['3,"Wall St. Bears Claw Back Into the Black (Reuters)","Reuters - Short-sellers, Wall Street\'s band"',
           '4,"Carlyle Looks Toward Commercial Aerospace","Reuters - Private investment firm Carlyle Group"',
           '3,"Oil and Economy Cloud Stocks\' Outlook","Soaring crude prices plus worries about the economy"']


def _ag_news(tmp_path):
    (tmp_path / "train.csv").write_text("\n".join(AG_NEWS) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(AG_NEWS[:2]) + "\n")
    return dict(data_dir=str(tmp_path), data_files={"train": "train.csv", "validation": "test.csv", "test": None},
                label_column="label")


def test_column_names_read_a_csv_without_a_header_row(tmp_path):
    dm = make_dm(**_ag_news(tmp_path), column_names=["label", "title", "description"], text_column="title")
    dm.prepare_data()
    assert len(dm.datasets["train"]) == 3 and set(dm.id2label.values()) == {"3", "4"}


def test_column_names_read_a_tsv_without_a_header_row(tmp_path):
    (tmp_path / "train.tsv").write_text("good film\tpos\nawful\tneg\n")
    (tmp_path / "dev.tsv").write_text("fine\tpos\n")
    dm = make_dm(data_dir=str(tmp_path), column_names=["text", "label"])
    dm.prepare_data()
    assert len(dm.datasets["train"]) == 2 and len(dm.datasets["validation"]) == 1


def test_a_header_row_that_looks_like_data_suggests_column_names(tmp_path):
    dm = make_dm(**_ag_news(tmp_path), text_column="title")
    with pytest.raises(UserError, match=r"columns 'title', 'label' are missing from the train split \(it has: 3, "
                                        r".*\): set dataset.text_column and dataset.label_column to columns it has, "
                                        r"or, if the file has no header row, name its columns with "
                                        r"dataset.column_names=\[\.\.\.\] \(3 names, in file order\)\.$"):
        dm.prepare_data()


def test_a_real_header_gets_no_column_names_hint(tmp_path):
    dm = make_dm(data_dir=str(sample_dir("sst2")), text_column="review")
    with pytest.raises(UserError) as refused:
        dm.prepare_data()
    assert "column_names" not in str(refused.value)
    assert str(refused.value).endswith("set dataset.text_column to one of those.")


def test_column_names_must_match_the_number_of_columns(tmp_path):
    dm = make_dm(**_ag_news(tmp_path), column_names=["label", "text"], text_column="text")
    with pytest.raises(UserError, match=r"dataset.column_names has 2 names but the first row of .*train.csv has 3 "
                                        r"columns: give one name per column, in file order\.$"):
        dm.prepare_data()


def test_column_names_are_for_csv_files_only(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n')
    with pytest.raises(UserError, match=r"dataset.column_names names the columns of header-less csv/tsv files, but "
                                        r".*train.jsonl is read as json: drop dataset.column_names\."):
        make_dm(data_dir=str(tmp_path), column_names=["text", "label"], val_fraction=0.5).prepare_data()


# ---- several text columns ------------------------------------------------------------------------------------------
def test_text_column_list_joins_the_columns(tmp_path):
    settings = dict(**_ag_news(tmp_path), column_names=["label", "title", "description"], cache_dir=str(tmp_path))
    joined = make_dm(**settings, text_column=["title", "description"])
    joined.prepare_data()
    row = joined.datasets["train"][1]
    text = joined.tokenizer.decode(row["input_ids"], skip_special_tokens=True)
    assert text == "carlyle looks toward commercial aerospace reuters - private investment firm carlyle group"
    dashed = make_dm(**settings, text_column=["title", "description"], text_separator=" -- ")
    dashed.prepare_data()
    assert dashed.examples_tokenized > 0, "another separator is another cache entry"
    assert "aerospace - - reuters" in dashed.tokenizer.decode(dashed.datasets["train"][1]["input_ids"])
    # title + label vs text title with pair description: the same columns, not the same encoding
    pair = make_dm(**settings, text_column="title", text_pair_column="description")
    pair.prepare_data()
    assert pair.examples_tokenized > 0 and pair.datasets["train"][1]["input_ids"] != row["input_ids"]
    assert joined.preprocessing_settings() != pair.preprocessing_settings()


def test_text_column_list_names_each_missing_column(tmp_path):
    dm = make_dm(data_dir=str(sample_dir("sst2")), text_column=["sentence", "title", "description"])
    dm.encode = None  # refused before any tokenizing
    with pytest.raises(UserError, match=r"^columns 'title', 'description' are missing from the train split \(it has: "
                                        r"sentence, label\): set dataset.text_column to columns it has\.$"):
        dm.prepare_data()


def test_an_empty_text_column_list_is_refused():
    with pytest.raises(UserError, match=r"dataset.text_column \[\] names no column"):
        make_dm(data_dir=".", text_column=[])


def test_one_text_column_keeps_the_cache_key_of_before():
    dm = make_dm(data_dir=".", text_column="sentence")
    assert "text_separator" not in dm.preprocessing_settings() and "text_column" not in dm.preprocessing_settings()


# ---- a real-data config without its data_dir -------------------------------------------------------------------------
@pytest.mark.parametrize("task,dataset", [("translation", "multi30k"), ("summarization", "scitldr"),
                                          ("clm", "tiny_shakespeare"), ("clm", "wikitext2"), ("mlm", "wikitext2"),
                                          ("multiple_choice", "openbookqa")])
def test_a_real_data_config_without_data_dir_says_to_set_it(tmp_path, monkeypatch, task, dataset):
    """Such a config inherits its sample's settings, but not its folder: `???` there was silently the sample's."""
    from conftest import compose_config
    from hydra.utils import instantiate

    monkeypatch.chdir(tmp_path)  # relative data_files are looked for here
    cfg = compose_config([f"task={task}", f"dataset={dataset}"], tmp_path)
    assert cfg.dataset.data_dir is None
    dm = instantiate(cfg.dataset, seed=cfg.seed, _convert_="all")
    with pytest.raises(UserError, match=r"set dataset.data_dir to the folder"):
        dm.prepare_data()
    dm.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"dataset.data_dir '.*nowhere' does not exist"):
        dm.prepare_data()


def test_no_source_at_all_is_one_sentence():
    with pytest.raises(UserError, match=r"^the dataset has no source: set dataset.data_dir to the folder of its files "
                                        r"\(or dataset.hub_name to a Hugging Face Hub dataset\)\.$"):
        make_dm().prepare_data()
    with pytest.raises(UserError, match=r"^the dataset has no source"):
        make_dm()._local_files()  # streaming reads the local files directly: no silent search of the cwd


def test_unknown_backbone_offline_names_the_fix():
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(UserError, match="backbone.name 'no-such-org/no-such-model' is neither a local directory"):
        load_model(AutoModelForSequenceClassification, name="no-such-org/no-such-model")


def test_backbone_path_that_does_not_exist(tmp_path):
    from lightning_ft.backbones import load_tokenizer

    with pytest.raises(UserError, match=r"backbone tokenizer '.*/missing_model' is not a directory"):
        load_tokenizer(name=str(tmp_path / "missing_model"))


def test_config_override_that_is_not_a_field():
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(UserError, match="backbone.config_overrides.hiden_size is not a field of BertConfig"):
        load_model(AutoModelForSequenceClassification, name=MINILM, pretrained=False,
                   config_overrides={"hiden_size": 8})


def test_fresh_model_from_config_overrides():
    from transformers import AutoModelForSequenceClassification

    model = load_model(AutoModelForSequenceClassification, name=MINILM, pretrained=False,
                       config_overrides={**TINY, "vocab_size": 1000}, num_labels=3)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.get_input_embeddings().weight.shape == (1000, 32) and model.config.num_labels == 3
    bare = load_model(AutoModelForSequenceClassification, name=None, model_type="roberta",
                      config_overrides={**TINY, "vocab_size": 500})
    assert type(bare).__name__ == "RobertaForSequenceClassification"


def test_label_names_order_is_saved(tmp_path):
    dm = make_dm(data_dir=str(split_files(tmp_path, [["a", 1], ["b", 0]], [["c", 1]])), label_names=["neg", "pos"])
    dm.prepare_data()
    assert dm.model_kwargs()["id2label"] == {0: "neg", 1: "pos"}
    assert json.dumps(dm.preprocessing_settings())  # the cache key must be serialisable


def test_group_by_length_sees_every_example_once_with_less_padding(tmp_path):
    rng = random.Random(0)
    # 3,200 rows: enough for the sampler's full mega-batches (50 batches; fewer on tiny sets).
    rows = [[" ".join(["word"] * rng.randint(1, 60)) + f" id{i}", i % 2] for i in range(3200)]
    data_dir = str(split_files(tmp_path, rows, rows[:10]))

    def padding_and_ids(dm, epoch=0):
        padded = real = 0
        ids = []
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            padded += batch["input_ids"].numel()
            real += int(batch["attention_mask"].sum())
            ids += [dm.tokenizer.decode(row[mask.bool()], skip_special_tokens=True).split()[-1]
                    for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
        return 1 - real / padded, ids

    plain = make_dm(data_dir=data_dir, batch_size=16, group_by_length=False)
    plain.prepare_data()
    grouped = make_dm(data_dir=data_dir, batch_size=16, group_by_length=True)
    grouped.prepare_data()
    torch.manual_seed(0)
    plain_padding, _ = padding_and_ids(plain)
    grouped_padding, first = padding_and_ids(grouped)
    _, second = padding_and_ids(grouped, epoch=1)
    assert sorted(first) == sorted(f"id{i}" for i in range(3200)), "every example exactly once per epoch"
    assert first != second, "a new order every epoch"
    assert plain_padding > 0.3 and grouped_padding < 0.1 * plain_padding
