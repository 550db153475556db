"""Model resolution order and config precedence (RecBole's internals < plugin yaml < dataset yaml <
config file < config_dict < command line)."""

import pytest
from recbole.model.general_recommender.bpr import BPR
from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_layersel import registry
from recbole_layersel.errors import LayerSelError
from recbole_layersel.registry import LayerSelConfig, get_model_class, recbole_model_names


class PluginSASRec(SASRec):
    """Stands in for a plugin model that shares a name with a RecBole model."""


def test_plugin_models_resolve_before_recbole(monkeypatch):
    assert get_model_class("SASRec") is SASRec
    monkeypatch.setattr(registry, "PLUGIN_MODELS", {"SASRec": f"{__name__}:PluginSASRec"})
    assert get_model_class("SASRec") is PluginSASRec
    assert get_model_class("BPR") is BPR


def test_unknown_model_lists_plugin_and_recbole_models():
    with pytest.raises(LayerSelError) as error:
        get_model_class("SASrec")
    message = str(error.value)
    assert "'SASrec'" in message
    for name in ["SASRec", "BPR", "GRU4Rec", "LightGCN", *registry.PLUGIN_MODELS]:
        assert name in message
    assert len(recbole_model_names()) > 50


def test_config_precedence(tmp_path, monkeypatch, argv):
    properties, dataset_configs = tmp_path / "properties", tmp_path / "dataset_configs"
    properties.mkdir()
    dataset_configs.mkdir()
    (properties / "SASRec.yaml").write_text(
        "hidden_size: 8\nlearning_rate: 0.1\nepochs: 7\ntrain_batch_size: 1\neval_batch_size: 1\nseed: 1\n"
    )
    (dataset_configs / "ml-100k.yaml").write_text(
        "learning_rate: 0.2\nepochs: 5\ntrain_batch_size: 111\neval_batch_size: 2\nseed: 2\n"
    )
    config_file = tmp_path / "run.yaml"
    config_file.write_text("epochs: 3\neval_batch_size: 99\nseed: 3\n")
    monkeypatch.setattr(registry, "PROPERTIES_DIR", properties)
    monkeypatch.setattr(registry, "DATASET_CONFIGS_DIR", dataset_configs)
    argv.append("--seed=5")

    config = LayerSelConfig("SASRec", "ml-100k", [str(config_file)], {"eval_batch_size": 44, "seed": 4})

    assert config["n_layers"] == 2  # RecBole's own SASRec.yaml
    assert config["hidden_size"] == 8  # plugin properties over RecBole's defaults
    assert config["learning_rate"] == 0.2  # dataset config over plugin properties
    assert config["train_batch_size"] == 111
    assert config["epochs"] == 3  # config file over dataset config
    assert config["eval_batch_size"] == 44  # config_dict over config file
    assert config["seed"] == 5  # command line over everything


def test_shipped_dataset_config_sets_the_benchmark_protocol(argv):
    config = LayerSelConfig("SASRec", "ml-100k")
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"}
    assert config["eval_args"]["order"] == "TO"
    assert config["eval_args"]["mode"] == {"valid": "full", "test": "full"}
    assert config["metrics"] == ["NDCG", "MRR", "Precision", "Recall", "Hit"]
    assert config["topk"] == [5, 10]
    assert config["valid_metric"] == "NDCG@10"
    assert config["title_field"] == "movie_title"
    assert "title_field" in config.parameters["Dataset"]


def test_cross_entropy_implies_no_training_negatives(argv):
    assert LayerSelConfig("SASRec", "ml-100k")["train_neg_sample_args"]["distribution"] == "none"
    assert LayerSelConfig("BPR", "ml-100k")["train_neg_sample_args"]["distribution"] == "uniform"
    with pytest.raises(ValueError, match="should be None when the loss_type is CE"):
        LayerSelConfig(
            "SASRec", "ml-100k", config_dict={"train_neg_sample_args": {"distribution": "uniform"}}
        )
