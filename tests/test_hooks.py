"""The pre-training hooks end to end on a tiny model: importance -> selection -> distillation, their
artifacts, their stage cache, and the errors a bad config gets."""

import json
from itertools import pairwise

import pytest
import torch

from recbole_layersel import hooks
from recbole_layersel import model as model_module
from recbole_layersel.backbone import CompactBackbone
from recbole_layersel.errors import LayerSelError
from tests.test_model import build  # noqa: F401  (fixture)

HOOKED = {"layer_strategy": "importance", "num_layers": 3, "distill_steps": 10, "distill_lr": 0.01,
          "importance_sample_users": 8, "importance_max_items": 6, "importance_batch_size": 4,
          "importance_warmup_steps": 5, "selection_train_users": 8, "selection_sample_users": 8,
          "selection_adapt_steps": 3, "selection_batch_size": 4}


class SpreadOut:
    """A stand-in proxy that prefers layers far apart, so the search keeps bridged layers (the real proxy on a
    random tiny model may keep adjacent ones, which have no bridge to distil)."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, layers):
        return 0.1 + 0.2 * len(layers) + sum(later - earlier for earlier, later in pairwise(layers))


class Shallow:
    """A stand-in proxy that prefers a skipped layer, then shallow layers (a bridge, layers above)."""

    def __call__(self, layers):
        skips = any(later - earlier > 1 for earlier, later in pairwise(layers))
        return 1 + len(layers) + skips - max(layers, default=0) / 10


@pytest.fixture
def spread_out(monkeypatch):
    monkeypatch.setattr(hooks, "ContentNDCG", SpreadOut)


@pytest.fixture
def hooked(build, tmp_path):  # noqa: F811
    """hooked(**settings) -> (model after its hooks ran, loaders)."""
    def hooked(**settings):
        model, loaders = build("llama", **{**HOOKED, "artifacts_dir": str(tmp_path / "run"), **settings})
        model.before_training(*loaders)
        return model, loaders

    return hooked


def test_hooks_select_distill_and_write_their_artifacts(hooked, spread_out, tmp_path):
    model, _ = hooked()
    backbone = model.compact.backbone
    assert 1 <= len(backbone.layers) <= 3 and backbone.num_source_layers == 6
    assert not model._source_llm  # the full model is gone
    assert min(model.hook_seconds[stage] for stage in ("importance", "selection", "distillation")) > 0
    run = tmp_path / "run"
    importance = json.loads((run / "importance.json").read_text())
    assert set(importance["raw"]) >= {"fisher", "attention_entropy", "block_influence", "effective_rank"}
    assert sorted(importance["ranking"]) == list(range(6)) and len(importance["fused"]) == 6
    assert importance["sample_users"] == 8 and len(importance["settings"]["sample"]) == 64
    assert (run / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    selection = json.loads((run / "selection.json").read_text())
    assert selection["selected"] == backbone.selected_layers and selection["strategy"] == "importance"
    assert selection["stop_reason"] in {"target", "saturated"}
    assert selection["trajectory"][0]["beam"][0]["layers"] == []  # what the first layer must beat
    first_step = [candidate["layers"] for candidate in selection["trajectory"][1]["candidates"]]
    assert sorted(first_step) == sorted([layer] for layer in importance["ranking"][:3])
    assert importance["correlation"]["fisher"]["fisher"] == 1.0
    distillation = json.loads((run / "distillation.json").read_text())
    assert set(distillation["before"]) == {"mse", "cosine"} and len(distillation["losses"]) == 10


def test_stages_are_cached_and_invalidated_when_their_inputs_change(hooked, spread_out, monkeypatch):
    first, _ = hooked()
    monkeypatch.setattr(hooks, "compute_importance", lambda *a, **k: pytest.fail("importance recomputed"))
    monkeypatch.setattr(hooks, "distill_bridges", lambda *a, **k: pytest.fail("distillation recomputed"))
    second, _ = hooked()
    assert second.selected_layers == first.selected_layers
    for before, after in zip(first.compact.backbone.bridges.state_dict().values(),
                             second.compact.backbone.bridges.state_dict().values(), strict=True):
        assert torch.equal(before, after)
    with pytest.raises(pytest.fail.Exception, match="importance recomputed"):
        hooked(importance_group_weights={"fisher": 1.0})
    with pytest.raises(pytest.fail.Exception, match="importance recomputed"):
        hooked(importance_sample_users=7)  # another data sample
    with pytest.raises(pytest.fail.Exception, match="distillation recomputed"):
        hooked(distill_steps=11)


@pytest.mark.parametrize("setting, value", [
    ("llm_dtype", "bfloat16"), ("title_max_tokens", 3), ("title_pooling", "last"),
    ("learning_rate", 0.002), ("embedding_size", 12), ("head_heads", 1), ("head_dropout", 0.2),
    ("code", "another version")])
def test_every_setting_the_stages_read_invalidates_them(hooked, monkeypatch, setting, value):
    hooked()
    if setting == "code":
        monkeypatch.setattr(hooks, "code_sha256", lambda: value)
        settings = {}
    else:
        settings = {setting: value}
    monkeypatch.setattr(hooks, "compute_importance", lambda *a, **k: pytest.fail("importance recomputed"))
    with pytest.raises(pytest.fail.Exception, match="importance recomputed"):
        hooked(**settings)


def test_bridges_start_from_the_runs_seed_whatever_ran_before(build, spread_out):  # noqa: F811
    """A cache miss and a hit consume the global random state differently: the bridges must not care."""
    bridges = []
    for global_seed in (1, 2):  # the first run misses the stage cache, the second hits it
        model, loaders = build("llama", **{**HOOKED, "distill_steps": 0, "mlp_bridges": True})
        torch.manual_seed(global_seed)
        model.before_training(*loaders)
        bridges.append(model.compact.backbone.bridges.state_dict())
    assert bridges[0].keys() == bridges[1].keys() and len(bridges[0]) > 0
    for name in bridges[0]:
        assert torch.equal(bridges[0][name], bridges[1][name]), name


@pytest.mark.parametrize("strategy", ["block_influence", "contiguous", "magnitude", "random"])
def test_baseline_strategies_share_the_pipeline(hooked, strategy, tmp_path):
    model, _ = hooked(layer_strategy=strategy)
    assert len(model.selected_layers) == 3
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert selection["strategy"] == strategy and selection["selected"] == model.selected_layers
    assert (tmp_path / "run" / "importance.json").exists() == (strategy != "random")


def test_adjacent_layers_chosen_without_data_skip_the_hooks(hooked, tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "run_pretraining_hooks", lambda *a, **k: pytest.fail("hooks ran"))
    model, _ = hooked(layer_strategy="last")  # distill_steps > 0, but no bridge to distil
    assert model.selected_layers == [3, 4, 5] and not (tmp_path / "run").exists()
    assert model.hook_seconds == {}


def test_explicit_layers_skip_importance_and_selection(hooked, monkeypatch):
    monkeypatch.setattr(hooks, "compute_importance", lambda *a, **k: pytest.fail("importance ran"))
    monkeypatch.setattr(hooks, "greedy_select", lambda *a, **k: pytest.fail("the search ran"))
    model, _ = hooked(selected_layers=[0, 4, 5])
    assert model.selected_layers == [0, 4, 5]


@pytest.mark.parametrize("settings", [{"selected_layers": [0, 2]}, {"num_layers": 2}])
def test_bridges_are_distilled_towards_the_full_models_states_at_the_deepest_kept_layer(
        hooked, monkeypatch, settings):
    """Not towards its last layer's: the compact model does not hold the layers above its deepest one.
    Explicit layers take those states from a full-model pass; importance from its own pass."""
    monkeypatch.setattr(hooks, "ContentNDCG", lambda *args: Shallow())
    seen, real_distill, real_seeded = {}, hooks.distill_bridges, hooks.seeded_backbone
    monkeypatch.setattr(hooks, "seeded_backbone",
                        lambda llm, *args: seen.setdefault("llm", llm) and real_seeded(llm, *args))

    def distill(compact, inputs, mask, target, **kwargs):
        seen.update(inputs=inputs, mask=mask, target=target, layers=compact.selected_layers)
        return real_distill(compact, inputs, mask, target, **kwargs)

    monkeypatch.setattr(hooks, "distill_bridges", distill)
    hooked(**settings)
    deepest = seen["layers"][-1]
    assert deepest < 5 and seen["layers"] != list(range(deepest + 1))  # a bridge, and layers above it
    with torch.no_grad():
        expected = CompactBackbone(seen["llm"], list(range(deepest + 1))).eval()(seen["inputs"], seen["mask"])
    valid = seen["mask"].bool()
    torch.testing.assert_close(seen["target"][valid], expected[valid])


def test_distillation_lowers_the_compact_vs_full_error(hooked, tmp_path):
    hooked(selected_layers=[0, 5], distill_steps=40, importance_sample_users=12)
    report = json.loads((tmp_path / "run" / "distillation.json").read_text())
    assert report["after"]["mse"] < report["before"]["mse"]


@pytest.mark.parametrize("settings, message", [
    ({"importance_group_weights": {"fisher": 1.0, "loudness": 1.0}}, "loudness"),
    ({"importance_group_weights": {"fisher": 0.0}}, "sum"),
    ({"importance_weights": {"fisher": 1.0}}, "importance_weights=.* no longer a setting; use importance_gr"),
    ({"importance_sample_users": 1000}, r"importance_sample_users=1000 is larger than the data: 12 users"),
    ({"selection_proxy": "fidelity"}, r"selection_proxy='fidelity'; use one of \('content', 'adapted'\)"),
    ({"selection_proxy": "adapted", "selection_train_users": 99}, r"selection_train_users=99 is larger than"),
    ({"layer_strategy": "best"}, r"layer_strategy='best' is not a strategy"),
    ({"selected_layers": [0, 5], "distill_steps": 2, "distill_layerwise": True},
     r"layer_strategy scores layers \(importance, .*\) and selected_layers is ~"),
])
def test_bad_hook_settings_are_named(hooked, settings, message):
    with pytest.raises(LayerSelError, match=message):
        hooked(**settings)


def test_every_strategy_starts_training_from_the_same_heads(hooked):
    importance, _ = hooked()
    last, _ = hooked(layer_strategy="last", distill_steps=0)
    for name, parameter in importance.named_parameters():
        if not name.startswith("compact.backbone."):
            assert torch.equal(parameter, dict(last.named_parameters())[name]), name


def test_layerwise_distillation_also_runs_from_a_cached_importance(hooked, spread_out, tmp_path):
    hooked(distill_layerwise=True)
    hooked(distill_layerwise=True, distill_steps=12)  # importance cached, distillation not
    report = json.loads((tmp_path / "run" / "distillation.json").read_text())
    assert len(report["losses"]) == 12


def test_scoring_before_the_hooks_ran_is_an_error(build):  # noqa: F811
    model, (train, _, _) = build("llama", **HOOKED)
    with pytest.raises(LayerSelError, match=r"hooks .* have not run. Call model.before_training"):
        model.calculate_loss(next(iter(train)))


def test_the_proxy_not_the_ranking_decides_which_layer_is_kept(hooked, tmp_path, monkeypatch):
    scored = []

    class PrefersLayerFive:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, layers):
            scored.append(layers)
            return 0.1 + (0.5 if 5 in layers else 0.0) + 0.01 * len(layers)

    monkeypatch.setattr(hooks, "ContentNDCG", PrefersLayerFive)
    model, _ = hooked(selection_candidates=6, num_layers=1)
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert model.selected_layers == [5] and selection["evaluations"] == len(scored) == 7
    assert [candidate["proxy"] for candidate in selection["trajectory"][1]["candidates"]][0] == 0.61


def test_the_adapted_proxy_drives_the_search_too(hooked, tmp_path, monkeypatch):
    monkeypatch.setattr(hooks, "ContentNDCG", lambda *args: pytest.fail("the content proxy was built"))
    adapted_calls = []
    call = hooks.AdaptedNDCG.__call__
    monkeypatch.setattr(hooks.AdaptedNDCG, "__call__", lambda self, layers: adapted_calls.append(layers)
                        or call(self, layers))
    model, _ = hooked(selection_proxy="adapted")
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert selection["selected"] == model.selected_layers
    scores = [candidate["proxy"] for step in selection["trajectory"] for candidate in step["candidates"]]
    assert all(0.0 <= score <= 1.0 for score in scores) and len(set(scores)) > 1
    assert len(adapted_calls) == len(scores)  # every score the search logged is the adapted proxy's
