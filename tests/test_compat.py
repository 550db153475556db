"""One test per row of the table in recbole_layersel/compat.py: each pin, and the checkpoint shim."""

import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pandas
import pytest
import recbole.data.dataset.dataset
import torch
from recbole.data import create_dataset

from recbole_layersel import compat
from recbole_layersel.compat import atomic_files_verbatim, check_pins, compat_trainer, load_checkpoint
from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import sha256_file
from recbole_layersel.quick_start import run_recbole
from recbole_layersel.registry import LayerSelConfig
from tests.conftest import write_atomic_dataset


def test_numpy_pin_keeps_recbole_config_working(argv):
    assert int(np.__version__.split(".")[0]) < 2
    LayerSelConfig("BPR", "ml-100k")  # Config.compatibility_settings reads np.float_, np.unicode_, ...
    assert np.float is np.float64


def test_check_pins_names_the_version_and_the_fix(monkeypatch):
    check_pins()
    monkeypatch.setitem(compat.PINS, "scipy", ("1.13.1", compat.PINS["scipy"][1]))
    with pytest.raises(LayerSelError, match=r'scipy 1\.13\.1 is installed.*pip install "scipy<1\.13"'):
        check_pins()
    monkeypatch.setitem(compat.PINS, "scipy", ("1.12.0", compat.PINS["scipy"][1]))  # a minor below is fine
    monkeypatch.setitem(compat.PINS, "pandas", ("3.0.1", compat.PINS["pandas"][1]))
    with pytest.raises(LayerSelError, match=r'pandas 3\.0\.1 is installed.*pip install "pandas<3"'):
        check_pins()


def test_scipy_pin_keeps_recbole_graph_models_working(tmp_path, argv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_recbole("LightGCN", "ml-100k", config_dict={
        "epochs": 1, "embedding_size": 8, "n_layers": 1, "show_progress": False})  # builds its graph
    assert result["test_result"]["ndcg@10"] > 0


def test_pandas_pin_fills_missing_values_and_splits_token_sequences(tmp_path, argv):
    # Item 1 has no title and no price: RecBole fills them in place (a no-op under pandas 3).
    def item_row(i):
        return "1\t\t" if i == 1 else f"{i}\tword{i} and more\t{i}.0"

    write_atomic_dataset(tmp_path, "holes", n_items=6, item_row=item_row)
    config = LayerSelConfig("BPR", "holes", config_dict={
        "data_path": str(tmp_path), "load_col": {"inter": ["user_id", "item_id", "timestamp"],
                                                 "item": ["item_id", "title", "price"]}})
    dataset = create_dataset(config)
    items = dataset.item_feat.set_index("item_id")
    assert not items["price"].isna().any()
    assert items.loc[dataset.token2id("item_id", "1"), "price"] == pytest.approx(items["price"].mean())
    assert len(items.loc[dataset.token2id("item_id", "1"), "title"]) == 0
    words = [dataset.id2token("title", t) for t in items.loc[dataset.token2id("item_id", "2"), "title"]]
    assert list(words) == ["word2", "and", "more"]


def test_setuptools_pin_keeps_recbole_quick_start_importable():
    import recbole.quick_start  # noqa: F401  (imports ray.tune, which imports pkg_resources)


def _trainer(tmp_path, argv):
    from recbole.data import data_preparation
    from recbole.model.general_recommender.bpr import BPR

    write_atomic_dataset(tmp_path / "data", "tiny")
    config = LayerSelConfig("BPR", "tiny", config_dict={
        "data_path": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "saved"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "embedding_size": 4,
        "show_progress": False})
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    trainer_class = compat_trainer(compat.Trainer)
    return trainer_class(config, BPR(config, train_data._dataset)), train_data, valid_data, test_data


def test_best_checkpoint_reloads_and_is_written_atomically(tmp_path, argv):
    trainer, _, _, test_data = _trainer(tmp_path, argv)
    trainer._save_checkpoint(0)
    path = os.path.abspath(trainer.saved_model_file)
    assert os.listdir(tmp_path / "saved") == [os.path.basename(path)]  # no .partial left behind
    with pytest.raises(pickle.UnpicklingError):  # torch's safe default still holds for everyone else
        torch.load(path)
    saved_weights = trainer.model.user_embedding.weight.detach().clone()
    with torch.no_grad():
        trainer.model.user_embedding.weight.add_(1.0)
    trainer.evaluate(test_data, load_best_model=True)
    assert torch.equal(trainer.model.user_embedding.weight, saved_weights)


def test_failed_checkpoint_save_keeps_the_previous_checkpoint_and_no_partial(tmp_path, argv, monkeypatch):
    trainer, _, _, _ = _trainer(tmp_path, argv)
    trainer._save_checkpoint(0)
    path = os.path.abspath(trainer.saved_model_file)
    before = open(path, "rb").read()

    def disk_full(state, file, **kwargs):
        with open(file, "wb") as partial:
            partial.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr("recbole.trainer.trainer.torch.save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer._save_checkpoint(1)
    assert os.listdir(tmp_path / "saved") == [os.path.basename(path)]
    assert open(path, "rb").read() == before


def test_changed_or_foreign_checkpoints_are_refused(tmp_path, argv):
    trainer, _, _, test_data = _trainer(tmp_path, argv)
    trainer._save_checkpoint(0)
    with open(trainer.saved_model_file, "ab") as file:
        file.write(b"\0")  # the bytes no longer match what this run wrote
    with pytest.raises(LayerSelError, match="refusing to unpickle"):
        trainer.evaluate(test_data, load_best_model=True)
    foreign = tmp_path / "foreign.pth"
    torch.save({"config": object.__new__(LayerSelConfig), "state_dict": {}}, foreign)
    with pytest.raises(LayerSelError, match=f"refusing to unpickle checkpoint {foreign}"):
        load_checkpoint(str(foreign), trainer.written_checkpoints, "cpu")
    weights_only = tmp_path / "weights.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, weights_only)
    assert load_checkpoint(str(weights_only), {}, "cpu")["state_dict"]["w"].sum() == 2


def test_a_checkpoint_is_unpickled_from_the_bytes_that_were_hashed(tmp_path, monkeypatch):
    path, swapped = tmp_path / "best.pth", tmp_path / "swapped.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": LayerSelError("not tensors")}, swapped)
    trusted = {str(path): {sha256_file(path)}}
    real_open, opened = open, []

    def open_and_swap_before_a_second_read(file, *args, **kwargs):
        if str(file) == str(path):
            opened.append(file)
            if len(opened) == 2:  # another process replaces the file after it was hashed
                os.replace(swapped, path)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_and_swap_before_a_second_read)
    checkpoint = load_checkpoint(str(path), trusted, "cpu")
    assert checkpoint.keys() == {"state_dict"} and checkpoint["state_dict"]["w"].sum() == 0


def test_atomic_files_are_read_without_quote_processing(tmp_path, argv):
    def item_row(i):
        return f'{i}\t"C" Size Battery {i}\t1.0' if i == 2 else f"{i}\tplain title {i}\t1.0"

    write_atomic_dataset(tmp_path, "quoted", n_items=6, item_row=item_row)
    config = LayerSelConfig("BPR", "quoted", config_dict={
        "data_path": str(tmp_path), "load_col": {"inter": ["user_id", "item_id", "timestamp"],
                                                 "item": ["item_id", "title"]}})
    with atomic_files_verbatim():
        dataset = create_dataset(config)
    items = dataset.item_feat.set_index("item_id")
    words = [dataset.id2token("title", t) for t in items.loc[dataset.token2id("item_id", "2"), "title"]]
    assert words == ['"C"', "Size", "Battery", "2"]


def test_a_comma_separated_file_is_read_as_csv_with_its_quotes(tmp_path, argv):
    def item_row(i):
        return f'{i},"Item, number {i}",1.0' if i == 2 else f"{i},plain title {i},1.0"

    write_atomic_dataset(tmp_path, "csv", n_items=6, item_header="item_id:token,title:token_seq,price:float",
                         item_row=item_row)
    inter = tmp_path / "csv" / "csv.inter"
    inter.write_text(inter.read_text().replace("\t", ","))
    config = LayerSelConfig("BPR", "csv", config_dict={
        "data_path": str(tmp_path), "field_separator": ",", "load_col": {
            "inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}})
    with atomic_files_verbatim():
        dataset = create_dataset(config)
    items = dataset.item_feat.set_index("item_id")
    words = [dataset.id2token("title", t) for t in items.loc[dataset.token2id("item_id", "2"), "title"]]
    assert words == ["Item,", "number", "2"]


def test_quoted_looking_fields_are_kept_and_reported_once_per_file(tmp_path, argv, caplog):
    def token(value, quotes):
        return f'"{value}"' if quotes == "both" else f'"{value}' if quotes == "open" else str(value)

    rows = [(u, (u + 3 * step) % 15, 1000 * u + step) for u in range(12) for step in range(8)]
    lines = ["user_id:token\titem_id:token\ttimestamp:float"] + [  # item 2 opens a quote it never closes
        f"{token(u, 'both' if u == 3 else '')}\t{token(i, {5: 'both', 2: 'open'}.get(i, ''))}\t{t}"
        for u, i, t in rows]
    (tmp_path / "quotes").mkdir()
    (tmp_path / "quotes" / "quotes.inter").write_text("\n".join(lines) + "\n")
    config = LayerSelConfig("BPR", "quotes", config_dict={
        "data_path": str(tmp_path), "load_col": {"inter": ["user_id", "item_id", "timestamp"]}})
    caplog.set_level(logging.WARNING, logger="recbole_layersel.compat")
    with atomic_files_verbatim():
        dataset = create_dataset(config)
    assert dataset.inter_num == len(lines) - 1  # no row swallowed by the quote that never closes
    assert '"3"' in dataset.field2token_id["user_id"]
    assert {'"5"', '"2'} <= dataset.field2token_id["item_id"].keys()
    expected = sum(u == 3 for u, _, _ in rows) + sum(i == 5 for _, i, _ in rows)
    [warning] = [record.getMessage() for record in caplog.records]
    assert warning.startswith(f"{tmp_path / 'quotes' / 'quotes.inter'}: {expected} field(s) are wrapped")
    assert 'item_id:token = "5"' in warning and "quotes are kept as part of the value" in warning


def test_atomic_files_verbatim_gives_recbole_its_pandas_back_after_a_failed_load(tmp_path, argv):
    write_atomic_dataset(tmp_path, "badtype", item_header="item_id:token\ttitle:bogus\tprice:float")
    config = LayerSelConfig("BPR", "badtype", config_dict={"data_path": str(tmp_path), "load_col": {
        "inter": ["user_id", "item_id"], "item": ["item_id", "title"]}})
    with pytest.raises(ValueError, match="Type bogus from field title is not supported"):
        with atomic_files_verbatim():
            create_dataset(config)
    assert recbole.data.dataset.dataset.pd is pandas


def test_the_training_modules_leave_autograd_anomaly_mode_off():
    # A fresh interpreter: RecBole's sine.py switches the mode on at import, wherever it is first imported.
    code = ("import torch, recbole.model.sequential_recommender.sine, recbole_layersel.model, "
            "recbole_layersel.bench; print(torch.is_anomaly_enabled())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"
