"""SASRec's all-position objective: the windows hold every training target once, and the loss is the
mean of the per-prefix losses it replaces."""

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender.sasrec import SASRec
from recbole.utils import init_seed

from recbole_layersel.all_positions import SASRecAllPositions, position_targets, window_rows, windowed
from recbole_layersel.errors import LayerSelError
from recbole_layersel.quick_start import run_recbole
from recbole_layersel.registry import LayerSelConfig
from tests.conftest import write_atomic_dataset

SMALL = {"hidden_size": 8, "inner_size": 16, "n_heads": 1, "n_layers": 1, "show_progress": False,
         "load_col": {"inter": ["user_id", "item_id", "timestamp"]}}


def loaders(tmp_path, max_length, stride=None):
    write_atomic_dataset(tmp_path / "data", "tiny", n_users=6, per_user=12)
    config = LayerSelConfig("SASRecAllPositions", "tiny", config_dict={
        **SMALL, "data_path": str(tmp_path / "data"), "MAX_ITEM_LIST_LENGTH": max_length,
        "window_stride": stride})
    init_seed(config["seed"], config["reproducibility"])
    return config, data_preparation(config, create_dataset(config))


def test_window_rows_end_every_stride_targets_from_each_users_last():
    users = torch.tensor([7, 7, 7, 7, 7, 3, 3])
    assert window_rows(users, 2).tolist() == [0, 2, 4, 6]
    assert window_rows(users, 10).tolist() == [4, 6]


@pytest.mark.parametrize(("stride", "windows_a_user"), [(None, 3), (4, 3), (3, 3), (2, 5), (1, 9)])
def test_the_windows_train_every_training_target_once(tmp_path, argv, stride, windows_a_user):
    config, (train, _, _) = loaders(tmp_path, max_length=4, stride=stride)  # 9 training targets a user
    rows = train._dataset.inter_feat
    targets = sorted(zip(rows["user_id"].tolist(), rows["timestamp"].tolist(), strict=True))
    windows = windowed(train, config)._dataset.inter_feat
    # The time of each position's target: the next history item's, the last position's the row's own.
    times = windows["timestamp_list"].clone()
    _, trained = position_targets(times, windows["item_length"], windows["timestamp"], stride)
    times[:, :-1] = times[:, 1:].clone()
    times[torch.arange(len(times)), windows["item_length"] - 1] = windows["timestamp"]
    users = windows["user_id"].unsqueeze(1).expand_as(times)
    covered = sorted(zip(users[trained].tolist(), times[trained].tolist(), strict=True))
    assert covered == targets and len(windows) == 6 * windows_a_user


@pytest.mark.parametrize("stride", [0, 5, 2.5, True])
def test_a_window_stride_outside_one_to_the_window_is_refused(tmp_path, argv, stride):
    config, (train, _, _) = loaders(tmp_path, max_length=4, stride=stride)
    with pytest.raises(LayerSelError, match=rf"window_stride={stride!r}; use a whole number from 1 .* "
                                            r"MAX_ITEM_LIST_LENGTH=4"):
        SASRecAllPositions(config, train._dataset)


def test_the_all_position_loss_is_the_mean_of_the_prefix_losses(tmp_path, argv):
    config, (train, _, _) = loaders(tmp_path, max_length=50)  # one window holds every history
    model = SASRecAllPositions(config, train._dataset).eval()  # no dropout: one pass equals the prefixes
    prefixes = train._dataset[torch.arange(len(train._dataset))]
    windows = windowed(train, config)._dataset
    window_loss = model.calculate_loss(windows[torch.arange(len(windows))])
    assert len(windows) == 6 and len(prefixes) == 6 * 9
    assert torch.allclose(window_loss, SASRec.calculate_loss(model, prefixes), atol=1e-6)


def test_a_stride_of_one_is_recboles_objective(tmp_path, argv):
    config, (train, _, _) = loaders(tmp_path, max_length=4, stride=1)  # histories longer than the window
    model = SASRecAllPositions(config, train._dataset).eval()
    prefixes = train._dataset[torch.arange(len(train._dataset))]
    windows = windowed(train, config)._dataset
    assert len(windows) == len(prefixes)
    assert torch.allclose(model.calculate_loss(windows[torch.arange(len(windows))]),
                          SASRec.calculate_loss(model, prefixes), atol=1e-6)


def test_it_trains_through_run_recbole(tmp_path, argv, monkeypatch):
    write_atomic_dataset(tmp_path / "data", "tiny", n_users=6, per_user=12)
    monkeypatch.chdir(tmp_path)
    result = run_recbole("SASRecAllPositions", "tiny",
                         config_dict={**SMALL, "data_path": str(tmp_path / "data"), "epochs": 2})
    assert result["epochs_run"] == 2 and set(result["test_result"]) >= {"ndcg@10"}
