"""Model resolution order and config precedence (RecBole's internals < plugin yaml < dataset yaml <
config file < config_dict < command line)."""

import re

import pytest
import yaml
from recbole.model.general_recommender.bpr import BPR
from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_layersel import registry
from recbole_layersel.errors import LayerSelError
from recbole_layersel.quick_start import run_recbole
from recbole_layersel.registry import LayerSelConfig, get_model_class, recbole_model_names
from tests.conftest import write_atomic_dataset


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


def test_a_setting_nothing_defines_is_named_with_the_closest_one(argv, caplog):
    LayerSelConfig("SASRec", "ml-100k", config_dict={"n_layers": 1, "resume_file": "x.pth", "seed": 3})
    assert not caplog.records  # RecBole's, the model's and the run's own settings
    LayerSelConfig("SASRec", "ml-100k", config_dict={"num_layers": 4, "learning_rat": 0.01, "zzz": 1})
    unread = "is not a setting of SASRec or RecBole, so nothing reads it"
    assert [record.getMessage() for record in caplog.records] == [
        f"learning_rat=0.01 {unread}; did you mean learning_rate?",
        f"num_layers=4 {unread}; did you mean n_layers?", f"zzz=1 {unread}."]


def test_the_title_field_of_a_dataset_without_a_yaml_is_a_setting(argv, caplog, tiny_dataset):
    LayerSelConfig("SASRec", "tiny", config_dict={
        "data_path": str(tiny_dataset), "title_field": "title",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}})
    assert not caplog.records


def test_cross_entropy_implies_no_training_negatives(argv):
    assert LayerSelConfig("SASRec", "ml-100k")["train_neg_sample_args"]["distribution"] == "none"
    assert LayerSelConfig("BPR", "ml-100k")["train_neg_sample_args"]["distribution"] == "uniform"
    with pytest.raises(ValueError, match="should be None when the loss_type is CE"):
        LayerSelConfig(
            "SASRec", "ml-100k", config_dict={"train_neg_sample_args": {"distribution": "uniform"}}
        )


@pytest.mark.parametrize("model", ["SASRec", "LayerSelLLM"])
def test_dataset_without_yaml_loads_its_header_columns_under_the_sequential_protocol(model, tmp_path, argv,
                                                                                    caplog):
    write_atomic_dataset(tmp_path, "steam")
    config = LayerSelConfig(model, "steam", config_dict={"data_path": str(tmp_path)})
    assert config["load_col"] == {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}
    assert config["title_field"] == "title"  # the item file's only token_seq column
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"}
    assert (config["eval_args"]["order"], config["eval_args"]["group_by"]) == ("TO", "user")
    assert config["eval_args"]["mode"] == {"valid": "full", "test": "full"}
    assert (config["metrics"], config["topk"], config["valid_metric"]) == (
        ["NDCG", "MRR", "Precision", "Recall", "Hit"], [5, 10], "NDCG@10")
    assert "title_field" in config.parameters["Dataset"]
    assert "no " + str(registry.DATASET_CONFIGS_DIR / "steam.yaml") in caplog.text
    assert "derived from the headers" in caplog.text and registry.DATASET_TEMPLATE in caplog.text

    own = {"inter": ["user_id", "item_id"]}
    assert LayerSelConfig(model, "steam", config_dict={"data_path": str(tmp_path), "load_col": own})[
        "load_col"] == own  # a user's load_col: nothing derived


def test_sasrec_trains_on_a_dataset_without_yaml(tmp_path, argv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_atomic_dataset(tmp_path / "data", "steam", n_users=6, n_items=10, per_user=5)
    result = run_recbole("SASRec", "steam", saved=False, config_dict={
        "data_path": str(tmp_path / "data"), "epochs": 1, "hidden_size": 8, "inner_size": 16, "n_heads": 1,
        "n_layers": 1, "MAX_ITEM_LIST_LENGTH": 5, "show_progress": False})
    assert result["test_users"] == 6 and "ndcg@10" in result["test_result"]


def yaml_advice_in(message):
    """The error says which yaml to write, and from what."""
    yaml_file = registry.DATASET_CONFIGS_DIR / "steam.yaml"
    return f"to {yaml_file} (or to a file you pass with --config_files)" in message and (
        registry.DATASET_TEMPLATE in message)


def test_dataset_without_yaml_or_timestamps_stops_with_the_yaml_to_write(tmp_path, argv):
    folder = write_atomic_dataset(tmp_path, "steam")
    rows = (folder / "steam.inter").read_text().splitlines()
    (folder / "steam.inter").write_text("\n".join(row.rsplit("\t", 1)[0] for row in rows) + "\n")
    with pytest.raises(LayerSelError, match=r"steam.inter has no column for TIME_FIELD='timestamp' "
                                            r"\(columns: user_id, item_id\)") as error:
        LayerSelConfig("SASRec", "steam", config_dict={"data_path": str(tmp_path)})
    assert yaml_advice_in(str(error.value))


def test_dataset_without_yaml_and_two_title_candidates_asks_which(tmp_path, argv):
    write_atomic_dataset(tmp_path, "steam", item_header="item_id:token\tname:token_seq\ttags:token_seq",
                         item_row=lambda i: f"{i}\tItem {i}\tgame")
    settings = {"data_path": str(tmp_path)}
    with pytest.raises(LayerSelError, match=r"which column of .*steam.item holds the item titles\? It has no "
                                            r"column named title and 2 token_seq columns .* "
                                            r"--title_field=COLUMN") as error:
        LayerSelConfig("LayerSelLLM", "steam", config_dict=settings)
    assert yaml_advice_in(str(error.value))
    named = LayerSelConfig("LayerSelLLM", "steam", config_dict={**settings, "title_field": "tags"})
    assert named["load_col"]["item"] == ["item_id", "tags"]
    # A model that reads no titles loads the item ids alone: the same interactions as the others.
    assert LayerSelConfig("SASRec", "steam", config_dict=settings)["load_col"]["item"] == ["item_id"]


def test_a_column_named_title_is_the_title_whatever_else_the_item_file_has(tmp_path, argv):
    # RecBole's own Amazon item files: categories:token_seq, title:token
    write_atomic_dataset(tmp_path, "books", item_header="item_id:token\tcategories:token_seq\ttitle:token",
                         item_row=lambda i: f"{i}\tBooks Fiction\tThe Book {i}")
    config = LayerSelConfig("LayerSelLLM", "books", config_dict={"data_path": str(tmp_path)})
    assert config["title_field"] == "title"
    assert config["load_col"]["item"] == ["item_id", "title"]


def test_a_time_field_that_is_not_a_number_is_refused(tmp_path, argv):
    folder = write_atomic_dataset(tmp_path, "dates")
    inter = folder / "dates.inter"
    inter.write_text(inter.read_text().replace("timestamp:float", "timestamp:token"))
    with pytest.raises(LayerSelError, match=r"dates.inter: TIME_FIELD 'timestamp' is a token column, so "
                                            r"RecBole would order .* Write it as timestamp:float"):
        LayerSelConfig("SASRec", "dates", config_dict={"data_path": str(tmp_path)})


def test_a_byte_order_mark_is_named_and_utf_8_sig_reads_past_it(tmp_path, argv):
    folder = write_atomic_dataset(tmp_path, "bom")
    inter = folder / "bom.inter"
    inter.write_text("\ufeff" + inter.read_text(), encoding="utf-8")
    with pytest.raises(LayerSelError, match=r"bom.inter starts with a byte-order mark.* encoding: utf-8-sig"):
        LayerSelConfig("SASRec", "bom", config_dict={"data_path": str(tmp_path)})
    settings = {"data_path": str(tmp_path), "encoding": "utf-8-sig"}
    config = LayerSelConfig("SASRec", "bom", config_dict=settings)
    assert config["load_col"]["inter"] == ["user_id", "item_id", "timestamp"]


def test_the_derived_settings_warning_gives_the_values_that_apply(tmp_path, argv, caplog):
    write_atomic_dataset(tmp_path, "steam")
    LayerSelConfig("SASRec", "steam", config_dict={"data_path": str(tmp_path), "epochs": 1})
    assert "'epochs': 1" in caplog.text and "'epochs': 300" not in caplog.text


def test_dataset_without_yaml_or_item_file_stops_only_a_model_that_needs_titles(tmp_path, argv):
    (write_atomic_dataset(tmp_path, "steam") / "steam.item").unlink()
    settings = {"data_path": str(tmp_path)}
    assert LayerSelConfig("SASRec", "steam", config_dict=settings)["load_col"] == {
        "inter": ["user_id", "item_id", "timestamp"]}
    with pytest.raises(LayerSelError, match=r"no item file .*steam.item, but the model needs item titles"):
        LayerSelConfig("LayerSelLLM", "steam", config_dict=settings)


def test_shipped_configs_and_the_template_set_the_protocol_a_dataset_without_yaml_gets():
    template = registry.DATASET_CONFIGS_DIR / registry.DATASET_TEMPLATE
    protocol = registry.SEQUENTIAL_PROTOCOL
    for file in [*registry.DATASET_CONFIGS_DIR.glob("*.yaml"), template]:
        settings = yaml.safe_load(file.read_text())
        assert {key: settings[key] for key in protocol} == protocol, file
    keys = [line for line in template.read_text().splitlines() if re.match(r"\w+:", line)]
    assert keys and all(re.search(r"# \(\w+\) \S", line) for line in keys)
