"""SASRec's all-position objective: the windows hold every training target once, and the loss is the
mean of the per-prefix losses it replaces."""

import torch
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender.sasrec import SASRec
from recbole.utils import init_seed

from recbole_layersel.all_positions import SASRecAllPositions, window_rows, windowed
from recbole_layersel.quick_start import run_recbole
from recbole_layersel.registry import LayerSelConfig
from tests.conftest import write_atomic_dataset

SMALL = {"hidden_size": 8, "inner_size": 16, "n_heads": 1, "n_layers": 1, "show_progress": False,
         "load_col": {"inter": ["user_id", "item_id", "timestamp"]}}


def loaders(tmp_path, max_length):
    write_atomic_dataset(tmp_path / "data", "tiny", n_users=6, per_user=12)
    config = LayerSelConfig("SASRecAllPositions", "tiny", config_dict={
        **SMALL, "data_path": str(tmp_path / "data"), "MAX_ITEM_LIST_LENGTH": max_length})
    init_seed(config["seed"], config["reproducibility"])
    return config, data_preparation(config, create_dataset(config))


def test_window_rows_end_every_max_length_targets_from_each_users_last():
    users = torch.tensor([7, 7, 7, 7, 7, 3, 3])
    assert window_rows(users, 2).tolist() == [0, 2, 4, 6]
    assert window_rows(users, 10).tolist() == [4, 6]


def test_the_windows_hold_every_training_target_once(tmp_path, argv):
    config, (train, _, _) = loaders(tmp_path, max_length=4)  # 9 training targets a user, windows of 4
    rows = train._dataset.inter_feat
    targets = sorted(zip(rows["user_id"].tolist(), rows["timestamp"].tolist(), strict=True))
    windows = windowed(train, config)._dataset.inter_feat
    covered = []  # (user, time) of each position's target: the next history item, the last the row's target
    for user, times, length, time in zip(windows["user_id"].tolist(), windows["timestamp_list"],
                                         windows["item_length"].tolist(), windows["timestamp"].tolist(),
                                         strict=True):
        covered += [(user, t) for t in times[1:length].tolist()] + [(user, time)]
    assert sorted(covered) == targets and len(windows) == 6 * 3  # a user's targets 9..6, 5..2 and 1


def test_the_all_position_loss_is_the_mean_of_the_prefix_losses(tmp_path, argv):
    config, (train, _, _) = loaders(tmp_path, max_length=50)  # one window holds every history
    model = SASRecAllPositions(config, train._dataset).eval()  # no dropout: one pass equals the prefixes
    prefixes = train._dataset[torch.arange(len(train._dataset))]
    windows = windowed(train, config)._dataset
    window_loss = model.calculate_loss(windows[torch.arange(len(windows))])
    assert len(windows) == 6 and len(prefixes) == 6 * 9
    assert torch.allclose(window_loss, SASRec.calculate_loss(model, prefixes), atol=1e-6)


def test_it_trains_through_run_recbole(tmp_path, argv, monkeypatch):
    write_atomic_dataset(tmp_path / "data", "tiny", n_users=6, per_user=12)
    monkeypatch.chdir(tmp_path)
    result = run_recbole("SASRecAllPositions", "tiny",
                         config_dict={**SMALL, "data_path": str(tmp_path / "data"), "epochs": 2})
    assert result["epochs_run"] == 2 and set(result["test_result"]) >= {"ndcg@10"}
