"""One test per row of the table in recbole_layersel/compat.py: each pin, and the checkpoint shim."""

import os
import pickle

import numpy as np
import pytest
import torch
from recbole.data import create_dataset

from recbole_layersel import compat
from recbole_layersel.compat import check_pins, compat_trainer, load_checkpoint
from recbole_layersel.errors import LayerSelError
from recbole_layersel.registry import LayerSelConfig
from tests.conftest import write_atomic_dataset


def test_numpy_pin_keeps_recbole_config_working(argv):
    assert int(np.__version__.split(".")[0]) < 2
    LayerSelConfig("BPR", "ml-100k")  # Config.compatibility_settings reads np.float_, np.unicode_, ...
    assert np.float is np.float64


def test_check_pins_names_the_version_and_the_fix(monkeypatch):
    check_pins()
    monkeypatch.setitem(compat.PINS, "pandas", ("3.0.1", 3))
    with pytest.raises(LayerSelError, match=r'pandas 3\.0\.1 is installed.*pip install "pandas<3"'):
        check_pins()


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


def test_atomic_files_are_read_without_quote_processing(tmp_path, argv):
    def item_row(i):
        return f'{i}\t"C" Size Battery {i}\t1.0' if i == 2 else f"{i}\tplain title {i}\t1.0"

    write_atomic_dataset(tmp_path, "quoted", n_items=6, item_row=item_row)
    config = LayerSelConfig("BPR", "quoted", config_dict={
        "data_path": str(tmp_path), "load_col": {"inter": ["user_id", "item_id", "timestamp"],
                                                 "item": ["item_id", "title"]}})
    dataset = create_dataset(config)
    items = dataset.item_feat.set_index("item_id")
    words = [dataset.id2token("title", t) for t in items.loc[dataset.token2id("item_id", "2"), "title"]]
    assert words == ['"C"', "Size", "Battery", "2"]
