"""run_recbole.py end to end: RecBole baselines train and reload their best checkpoint, datasets load
with titles, and every bad input stops with one clear message before anything is written."""

import json
import logging
import subprocess
import sys

import pandas
import pytest
import recbole.data.dataset.dataset
from recbole.data import create_dataset
from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_layersel import quick_start, registry
from recbole_layersel.compat import atomic_files_verbatim
from recbole_layersel.errors import LayerSelError
from recbole_layersel.model import LayerSelLLM
from recbole_layersel.quick_start import check_dataset_files, inference_throughput, run_recbole
from recbole_layersel.registry import LayerSelConfig
from tests.conftest import REPO_ROOT, SHARED_DATA, write_atomic_dataset
from tests.tiny_models import CONFIGS, save_tiny_llm

SMALL_SASREC = ["--hidden_size=16", "--inner_size=32", "--n_heads=1", "--n_layers=1"]


def cli(*args, cwd):
    return subprocess.run([sys.executable, str(REPO_ROOT / "run_recbole.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("model", ["BPR", "SASRec"])
def test_recbole_baselines_train_and_reload_their_best_checkpoint(model, tmp_path):
    extra = SMALL_SASREC if model == "SASRec" else []
    result = cli(f"--model={model}", "--dataset=ml-100k", "--epochs=1", "--show_progress=False", *extra,
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = next((tmp_path / "log" / model).glob("*.log")).read_text()
    assert "Loading model structure and parameters from" in log
    assert "test result" in log and "'ndcg@10'" in log and "'hit@5'" in log
    assert len(list((tmp_path / "saved").glob(f"{model}-*.pth"))) == 1


@pytest.mark.parametrize("dataset", ["amazon-electronics", "amazon-electronics-2018", "ml-1m", "ml-100k"])
def test_each_dataset_loads_with_titles(dataset, argv, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # dataset_configs give data_path relative to the repo root
    if dataset != "ml-100k" and not (SHARED_DATA / dataset).is_dir():
        pytest.fail(f"{SHARED_DATA / dataset} is missing: the suite reads the shared datasets from there")
    config = LayerSelConfig("SASRec", dataset)
    with atomic_files_verbatim():  # as run_recbole reads them
        loaded = create_dataset(config)
    title_field = config["title_field"]
    titles = loaded.item_feat[title_field]
    with_title = sum(len(title) > 0 for title in titles)
    assert with_title >= 0.99 * (loaded.item_num - 1)
    first = loaded.item_feat.iloc[1]
    words = " ".join(loaded.id2token(title_field, first[title_field]))
    assert len(words) > 2


def test_a_run_reads_atomic_files_verbatim_and_leaves_pandas_to_everyone_else(tmp_path, argv, monkeypatch,
                                                                               caplog):
    monkeypatch.chdir(tmp_path)
    inter = write_atomic_dataset(tmp_path / "data", "quoted") / "quoted.inter"
    quoted = inter.read_text().count("\t5\t")
    inter.write_text(inter.read_text().replace("\t5\t", '\t"5"\t'))
    caplog.set_level(logging.WARNING, logger="recbole_layersel.compat")
    run_recbole("BPR", "quoted", config_dict={
        "data_path": str(tmp_path / "data"), "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "epochs": 1, "embedding_size": 4, "show_progress": False})
    assert quoted > 0 and f"{inter}: {quoted} field(s) are wrapped in double quotes" in caplog.text
    assert recbole.data.dataset.dataset.pd is pandas  # the shim ends with our load


def test_unknown_model_fails_before_writing(tmp_path):
    result = cli("--model=SASrec", "--dataset=ml-100k", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown model 'SASrec'" in result.stderr and "SASRec" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_dataset_says_where_it_looked(tmp_path):
    result = cli("--model=BPR", "--dataset=amazon-electronics", cwd=tmp_path)
    assert result.returncode == 2
    # The dataset config's data_path is relative to where you run, and the message prints it so.
    assert "no ../shared/data/amazon-electronics/amazon-electronics.inter" in result.stderr
    assert "--data_path=" in result.stderr
    assert list(tmp_path.iterdir()) == []


class TitledSASRec(SASRec):
    needs_titles = True


def test_dataset_without_title_field_fails_before_writing(tmp_path, argv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_atomic_dataset(tmp_path / "data", "notitle", item_header="item_id:token\tprice:float\tname:token",
                         item_row=lambda i: f"{i}\t1.0\tthing {i}")
    monkeypatch.setattr(registry, "PLUGIN_MODELS", {"TitledSASRec": f"{__name__}:TitledSASRec"})
    settings = {"data_path": str(tmp_path / "data"), "title_field": "title", "loss_type": "CE",
                "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}}
    with pytest.raises(LayerSelError, match=r"title_field='title' is not a column of .*notitle.item "
                                            r"\(columns: item_id, price, name\)"):
        run_recbole("TitledSASRec", "notitle", config_dict=settings)
    settings["title_field"] = "name"
    with pytest.raises(LayerSelError, match=r"title_field='name' is not loaded"):
        run_recbole("TitledSASRec", "notitle", config_dict=settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_model_that_reads_titles_without_a_title_field_fails_before_writing(tmp_path, argv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_atomic_dataset(tmp_path / "data", "own")
    settings = {"data_path": str(tmp_path / "data"),  # the user's own load_col: nothing derived
                "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}}
    with pytest.raises(LayerSelError, match=r"LayerSelLLM reads item titles, but title_field is not set"):
        run_recbole("LayerSelLLM", "own", config_dict=settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_unknown_llm_path_fails_before_writing(tmp_path, argv, monkeypatch):
    monkeypatch.chdir(tmp_path)  # RecBole's logger writes log/ under the working directory
    settings = {"llm_path": "no-such-model", "llm_cache_dir": str(tmp_path / "cache"), "show_progress": False}
    with pytest.raises(LayerSelError, match=r"llm_path 'no-such-model' is neither an existing local path"):
        run_recbole("LayerSelLLM", "ml-100k", config_dict=settings)
    assert list(tmp_path.iterdir()) == []


def test_an_export_dir_that_is_not_ours_is_refused_before_training(tmp_path, argv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("not an export")
    settings = {"export_dir": str(tmp_path / "work"), "llm_cache_dir": str(tmp_path / "cache")}
    with pytest.raises(LayerSelError, match=r"work already exists and was not written by recbole_layersel"):
        run_recbole("LayerSelLLM", "ml-100k", config_dict=settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["notes.txt"]


def test_check_dataset_files_names_the_missing_item_file(tmp_path):
    folder = write_atomic_dataset(tmp_path, "noitem")
    (folder / "noitem.item").unlink()
    check_dataset_files(str(folder), "noitem")
    with pytest.raises(LayerSelError, match=r"no item file .*noitem.item"):
        check_dataset_files(str(folder), "noitem", title_field="title")


def test_check_dataset_files_reads_the_header_with_the_field_separator(tmp_path):
    folder = tmp_path / "comma"
    folder.mkdir()
    (folder / "comma.inter").write_text("user_id:token,item_id:token\n1,2\n")
    (folder / "comma.item").write_text("item_id:token,title:token_seq\r\n2,A film\r\n")
    check_dataset_files(str(folder), "comma", title_field="title", separator=",")
    with pytest.raises(LayerSelError, match=r"title_field='title' is not a column"):
        check_dataset_files(str(folder), "comma", title_field="title")  # read with tabs: one column


def test_check_dataset_files_refuses_a_title_field_that_is_not_text(tmp_path):
    folder = write_atomic_dataset(tmp_path, "prices")
    check_dataset_files(str(folder), "prices", title_field="title")
    with pytest.raises(LayerSelError, match=r"title_field='price' is a float column .* a title is text"):
        check_dataset_files(str(folder), "prices", title_field="price")


def tiny_llm_run(tmp_path, **settings):
    write_atomic_dataset(tmp_path / "data", "tiny")
    save_tiny_llm(tmp_path / "llm", CONFIGS["llama"]())
    return run_recbole("LayerSelLLM", "tiny", config_dict={
        "data_path": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "saved"),
        "llm_path": str(tmp_path / "llm"), "llm_cache_dir": str(tmp_path / "cache"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
        "title_field": "title", "embedding_size": 8, "title_max_tokens": 6, "num_layers": 3,
        "artifacts_dir": str(tmp_path / "artifacts"), "show_progress": False, "epochs": 1, **HOOKS_SMALL,
        **settings})


HOOKS_SMALL = {"layer_strategy": "importance", "distill_steps": 5, "importance_sample_users": 8,
               "importance_max_items": 6, "importance_warmup_steps": 2, "selection_train_users": 8,
               "selection_sample_users": 8, "selection_adapt_steps": 3, "selection_batch_size": 4}


def test_hooks_only_chooses_layers_without_training(tmp_path, argv):
    result = tiny_llm_run(tmp_path, hooks_only=True)
    selection = json.loads((tmp_path / "artifacts" / "selection.json").read_text())
    assert result == {"selected_layers": selection["selected"]} and 1 <= len(selection["selected"]) <= 3
    assert not (tmp_path / "saved").exists()


def test_a_run_reports_its_layers_and_an_inference_throughput_that_runs_the_backbone(tmp_path, argv,
                                                                                  monkeypatch):
    calls = []
    original = inference_throughput

    def counted(model, test_data, max_users=256):
        model.compact.backbone.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
        return original(model, test_data, max_users)

    monkeypatch.setattr(quick_start, "inference_throughput", counted)
    result = tiny_llm_run(tmp_path, layer_strategy="uniform")
    assert result["selected_layers"] == [0, 2, 5] and result["inference_users_per_second"] > 0
    assert sum(calls) == result["test_users"]  # every test user's history went through the backbone
    assert set(result["hook_seconds"]) == {"importance", "selection", "distillation"}
    assert result["hook_seconds"]["distillation"] > 0  # the bridges of [0, 2, 5] were distilled


def test_layersel_trains_on_one_window_per_user(tmp_path, argv, monkeypatch):
    rows = []
    original = LayerSelLLM.calculate_loss
    monkeypatch.setattr(LayerSelLLM, "calculate_loss",
                        lambda model, interaction: rows.extend(interaction["user_id"].tolist())
                        or original(model, interaction))
    result = tiny_llm_run(tmp_path, layer_strategy="uniform")
    assert result["epochs_run"] == 1 and rows and sorted(rows) == sorted(set(rows))  # one window each

