"""Pop counts every training interaction once, whatever the batch size or the negatives sampled."""

import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_layersel.pop import Pop
from recbole_layersel.registry import LayerSelConfig, get_model_class
from tests.conftest import write_atomic_dataset


def test_pop_is_the_training_count(tmp_path, argv):
    write_atomic_dataset(tmp_path / "data", "tiny", n_users=20, per_user=9)
    config = LayerSelConfig("Pop", "tiny", config_dict={
        "data_path": str(tmp_path / "data"), "train_batch_size": 64,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}})
    init_seed(config["seed"], config["reproducibility"])
    train, _, _ = data_preparation(config, create_dataset(config))
    model = get_model_class("Pop")(config, train._dataset)
    assert isinstance(model, Pop)
    for batch in train:  # one pass, as RecBole's TraditionalTrainer does
        model.calculate_loss(batch)
    counts = torch.bincount(train._dataset.inter_feat["item_id"], minlength=model.n_items)
    assert torch.equal(model.item_cnt.flatten(), counts) and int(counts.sum()) == len(train._dataset)
