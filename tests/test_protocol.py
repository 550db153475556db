"""The protocol of every run: sequential and general models rank the same items for the same user, and a
run killed mid-training resumes to the same result."""

import random

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from recbole.trainer import Trainer
from recbole.utils import init_seed

from recbole_layersel.compat import compat_trainer
from recbole_layersel.errors import LayerSelError
from recbole_layersel.protocol import training_items
from recbole_layersel.quick_start import run_recbole
from recbole_layersel.registry import LayerSelConfig, get_trainer_class
from tests.conftest import write_atomic_dataset

PER_USER = 8  # user u has items u, u+3, u+6, ... (mod 15): the 6th repeats the 1st


def masks(tmp_path, model: str, mask) -> dict[str, dict[str, set[str]]]:
    """Per phase (valid, test), per user: the items a zero-scoring model's full ranking leaves out."""
    if not (tmp_path / "data").exists():
        write_atomic_dataset(tmp_path / "data", "tiny", per_user=PER_USER)
    config = LayerSelConfig(model, "tiny", config_dict={
        "data_path": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "saved"),
        "eval_mask_history": mask,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "eval_args": {
            "split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}})
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    trainer = compat_trainer(get_trainer_class(config))(config, config.model_class(config, train._dataset))
    trainer.training_items = training_items(train, config)
    trainer.model.full_sort_predict = lambda interaction: torch.zeros(len(interaction), dataset.item_num)
    left_out = {}
    for phase, loader in (("valid", valid), ("test", test)):
        trainer.tot_item_num = dataset.item_num
        left_out[phase] = {}
        for batch in loader:
            interaction, scores, _, _ = trainer._full_sort_batch_eval(batch)
            for user, row in zip(interaction["user_id"].tolist(), scores, strict=True):
                items = torch.nonzero(torch.isinf(row[1:])).flatten() + 1
                left_out[phase][dataset.id2token("user_id", user)] = set(dataset.id2token("item_id", items))
    return left_out


def test_sequential_and_general_models_leave_out_the_same_items(tmp_path, argv):
    sequential, general = masks(tmp_path, "SASRec", True), masks(tmp_path, "BPR", True)
    assert sequential == general
    # User 0: 0 3 6 9 12 0 | valid 3 | test 6 (targets that repeat an earlier item stay ranked).
    assert general["valid"]["0"] == {"0", "6", "9", "12"} and general["test"]["0"] == {"0", "3", "9", "12"}


@pytest.mark.parametrize("model", ["SASRec", "BPR"])
def test_without_masking_every_item_is_ranked(tmp_path, argv, model):
    left_out = masks(tmp_path, model, False)
    assert all(items == set() for phase in left_out.values() for items in phase.values())


def test_masking_is_the_default_and_takes_only_a_boolean(tmp_path, argv):
    config = LayerSelConfig("BPR", "own", config_dict={"load_col": {"inter": ["user_id", "item_id"]}})
    assert config["eval_mask_history"] is True
    with pytest.raises(LayerSelError, match="eval_mask_history='yes'; use True"):
        masks(tmp_path, "SASRec", "yes")


class Killed(Exception):
    """What a session's end does to a run, mid-epoch."""


def test_a_run_killed_mid_training_resumes_and_ends_as_if_never_stopped(tmp_path, argv, monkeypatch):
    write_atomic_dataset(tmp_path / "data", "tiny", n_users=30, per_user=10)
    monkeypatch.chdir(tmp_path)

    def run(name):
        settings = {"data_path": str(tmp_path / "data"), "epochs": 5, "stopping_step": 10,
                    "resume_file": str(tmp_path / f"{name}.resume.pth"), "show_progress": False,
                    "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "hidden_size": 8,
                    "inner_size": 16, "n_heads": 1, "n_layers": 1, "train_batch_size": 32}
        return run_recbole("SASRec", "tiny", config_dict=settings)

    uninterrupted = run("once")
    train_epoch = Trainer._train_epoch

    def killed_in_epoch_2(self, train_data, epoch_idx, *args, **kwargs):
        if epoch_idx == 2:
            raise Killed
        return train_epoch(self, train_data, epoch_idx, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_epoch", killed_in_epoch_2)
    with pytest.raises(Killed):
        run("killed")
    assert (tmp_path / "killed.resume.pth").is_file()
    epochs = []

    def counted(self, train_data, epoch_idx, *args, **kwargs):
        epochs.append(epoch_idx)
        return train_epoch(self, train_data, epoch_idx, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_epoch", counted)
    resumed = run("killed")
    assert epochs == [2, 3, 4]  # resumed, not restarted
    assert resumed["test_result"] == uninterrupted["test_result"]
    assert resumed["best_valid_result"] == uninterrupted["best_valid_result"]
    assert resumed["epochs_run"] == 5 and resumed["stopped_by"] == "epoch cap"
    assert len(uninterrupted["valid_curve"]) == 5 and resumed["valid_curve"] == uninterrupted["valid_curve"]
    assert max(resumed["valid_curve"]) == resumed["best_valid_score"]
    assert not (tmp_path / "killed.resume.pth").exists()  # a finished run leaves no resume state


def test_early_stopping_is_reported_with_the_best_epoch_of_the_validation_curve(tmp_path, argv, monkeypatch):
    folder = tmp_path / "data" / "noisy"  # random histories: validation NDCG rises, then wanders
    folder.mkdir(parents=True)
    draw = random.Random(0)
    rows = [f"{user}\t{draw.randrange(40)}\t{step}" for user in range(60) for step in range(12)]
    (folder / "noisy.inter").write_text("\n".join(["user_id:token\titem_id:token\ttimestamp:float", *rows]))
    monkeypatch.chdir(tmp_path)
    result = run_recbole("SASRec", "noisy", config_dict={
        "data_path": str(tmp_path / "data"), "epochs": 60, "stopping_step": 1, "learning_rate": 0.05,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "hidden_size": 8, "inner_size": 16,
        "n_heads": 1, "n_layers": 1, "train_batch_size": 32, "show_progress": False})
    curve = result["valid_curve"]
    assert result["stopped_by"] == "early stopping" and len(curve) == result["epochs_run"] < 60
    assert curve.index(max(curve)) == result["best_epoch"] == result["epochs_run"] - 3  # 2 evaluations later
    assert max(curve) == result["best_valid_score"]


def test_a_counting_model_is_complete_after_its_one_pass(tmp_path, argv, monkeypatch):
    write_atomic_dataset(tmp_path / "data", "tiny")
    monkeypatch.chdir(tmp_path)
    result = run_recbole("Pop", "tiny", config_dict={
        "data_path": str(tmp_path / "data"), "load_col": {"inter": ["user_id", "item_id", "timestamp"]}})
    assert (result["epochs_run"], result["stopped_by"]) == (1, "one pass")
