"""Recommendations from an exported (or checkpointed) model, in Python and on the command line."""

import json

import pytest
import torch

from recbole_layersel.compat import compat_trainer
from recbole_layersel.errors import LayerSelError
from recbole_layersel.export import export_compact
from recbole_layersel.recommend import Recommender, main
from recbole_layersel.registry import get_trainer_class
from tests.test_model import build, first_eval_batch, train_steps  # noqa: F401  (build is a fixture)


@pytest.fixture
def trained(build, tmp_path):  # noqa: F811
    """(model after a few training steps, its loaders, a Recommender loaded from its export)."""
    model, loaders = build("llama")
    model.before_training(*loaders)
    train_steps(model, loaders[0], 5)
    model.eval()
    return model, loaders, Recommender.load(export_compact(model, tmp_path / "export"))


def history_of(model, interaction, row):
    length = int(interaction["item_length"][row])
    return [model.item_tokens[i] for i in interaction["item_id_list"][row, :length].tolist()]


def test_top_k_is_the_full_sort_predict_ranking_without_the_history(trained):
    model, loaders, recommender = trained
    interaction = first_eval_batch(loaders[2])
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
    for row in range(3):
        history = history_of(model, interaction, row)
        (recommended,) = recommender.recommend([history], top_k=5)
        expected = scores[row].clone()
        expected[0] = -torch.inf
        expected[interaction["item_id_list"][row]] = -torch.inf
        top = expected.topk(5)
        assert [r.item_id for r in recommended] == [model.item_tokens[j] for j in top.indices.tolist()]
        assert [r.score for r in recommended] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert not set(history) & {r.item_id for r in recommended}
        assert all(r.source == "model" and r.title == f"Item number {r.item_id}" for r in recommended)


def test_history_items_come_back_only_when_asked(trained):
    _, _, recommender = trained
    history = ["1", "4", "7"]
    # Top 15 of the 15 items: the history is in it however the model ranks it.
    (everything,) = recommender.recommend([history], top_k=15, include_history=True)
    assert set(history) <= {r.item_id for r in everything}
    (unseen,) = recommender.recommend([history], top_k=15)
    assert len(unseen) == 12 and not set(history) & {r.item_id for r in unseen}


def test_batched_equals_one_by_one(trained):
    _, _, recommender = trained
    histories = [["1", "4"], ["2", "5", "8", "11"], ["3"]]
    batched = recommender.recommend(histories, top_k=4)
    for history, result in zip(histories, batched, strict=True):
        (alone,) = recommender.recommend([history], top_k=4)
        assert [r.item_id for r in result] == [r.item_id for r in alone]
        assert [r.score for r in result] == pytest.approx([r.score for r in alone], abs=1e-5)


def test_users_of_the_dataset_use_their_whole_history(trained):
    model, _, recommender = trained
    user = next(iter(recommender.histories))
    history = recommender.histories[user]
    assert len(history) == 8  # every interaction the tiny dataset gives this user
    (by_user,) = recommender.recommend_users([user], top_k=3)
    (by_items,) = recommender.recommend([history], top_k=3)
    assert [r.item_id for r in by_user] == [r.item_id for r in by_items]


def test_empty_history_gets_popular_items_stated_as_such(trained):
    model, _, recommender = trained
    (popular,) = recommender.recommend([[]], top_k=3)
    assert all(r.source == "popularity" for r in popular)
    counts = [model.item_counts[model.item_tokens.index(r.item_id)] for r in popular]
    assert counts == sorted(counts, reverse=True) and counts[0] == max(model.item_counts)


def test_unknown_ids_are_named(trained):
    _, _, recommender = trained
    with pytest.raises(LayerSelError, match=r"unknown item ids \['999', 'abc'\]"):
        recommender.recommend([["1", "999"], ["abc"]])
    with pytest.raises(LayerSelError, match=r"unknown user ids \['nobody'\]"):
        recommender.recommend_users(["nobody"])


def test_cli_prints_a_table_and_parseable_json(trained, tmp_path, capsys):
    export = str(tmp_path / "export")
    assert main(["--model-dir", export, "--items", "1,4", "--topk", "3"]) == 0
    table = capsys.readouterr().out
    assert "Recommendations" in table and table.count("Item number") == 3
    assert main(["--model-dir", export, "--user", "0", "--topk", "2", "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert len(parsed) == 2 and set(parsed[0]) == {"item_id", "title", "score", "source"}
    assert main(["--model-dir", export, "--items", "", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["source"] == "popularity"
    assert main(["--model-dir", export, "--items", "1,999"]) == 2
    assert "unknown item ids ['999']" in capsys.readouterr().err


def test_works_from_a_checkpoint_run_recbole_saved_without_unpickling_it(build, tmp_path):  # noqa: F811
    model, (train, valid, test) = build("llama", epochs=1)
    model.before_training(train, valid, test)
    trainer = compat_trainer(get_trainer_class(train.config))(train.config, model)
    trainer.fit(train, valid, saved=True, show_progress=False)
    trainer.evaluate(test, load_best_model=True)
    model.eval()
    recommender = Recommender.load(trainer.saved_model_file)
    interaction = first_eval_batch(test)
    (recommended,) = recommender.recommend([history_of(model, interaction, 0)], top_k=3)
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)[0]
    scores[0] = -torch.inf
    scores[interaction["item_id_list"][0]] = -torch.inf
    assert [r.item_id for r in recommended] == [model.item_tokens[j] for j in scores.topk(3).indices.tolist()]
    lone = tmp_path / "other.pth"
    lone.write_bytes(b"not read")
    with pytest.raises(LayerSelError, match="pickles are not loaded"):
        Recommender.load(lone)
