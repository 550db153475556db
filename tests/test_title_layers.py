"""The title-layer screen: every candidate is the prior the model would get, scored by a content-only
ranking that leaves the history out and gives ties to the other items."""

import json
import math

import pytest
import torch

from recbole_layersel.backbone import CompactBackbone
from recbole_layersel.llm import load_llm
from recbole_layersel.proxy import content_ndcg_at_10
from recbole_layersel.title_layers import encode_every_layer, main
from recbole_layersel.titles import TitleSettings, encode_titles, pool
from tests.conftest import write_atomic_dataset
from tests.tiny_models import CONFIGS, NUM_LAYERS, save_tiny_llm

TITLES = ["", "item number 1", "item 2", "number 3 item 4"]


@pytest.mark.parametrize("layer, pooling", [(None, "mean"), (0, "last"), (2, "mean"), (NUM_LAYERS, "last")])
def test_every_candidate_pools_the_hidden_states_it_names(tmp_path, layer, pooling):
    llm, tokenizer = load_llm(str(save_tiny_llm(tmp_path, CONFIGS["llama"]())))
    candidates = encode_every_layer(llm, tokenizer, TITLES, max_tokens=8, batch_size=2, show_progress=False)
    assert len(candidates) == 2 * (NUM_LAYERS + 2)  # layers 0..L and ~, two poolings
    batch = tokenizer(TITLES[1:], padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = llm(**batch, output_hidden_states=True)
    hidden = outputs.last_hidden_state if layer is None else outputs.hidden_states[layer]
    expected = pool(hidden, batch["attention_mask"], pooling)
    assert torch.allclose(candidates["~" if layer is None else str(layer), pooling][1:], expected, atol=1e-5)


def test_the_last_candidate_is_the_prior_of_the_model_with_every_layer(tmp_path):
    llm, tokenizer = load_llm(str(save_tiny_llm(tmp_path, CONFIGS["llama"]())))
    candidates = encode_every_layer(llm, tokenizer, TITLES, max_tokens=8, batch_size=2, show_progress=False)
    settings = TitleSettings(title_max_tokens=8, title_pooling="mean", llm_dtype="float32",
                             llm_quantization=None)
    prior = encode_titles(CompactBackbone(llm, list(range(NUM_LAYERS))), llm.get_input_embeddings(),
                          tokenizer, TITLES, settings, batch_size=2, show_progress=False)["prior"]
    assert torch.allclose(candidates["~", "mean"], prior, atol=1e-5)


def test_the_content_ranking_leaves_the_history_out_and_gives_ties_away():
    s = 0.5 ** 0.5  # eight unit directions: standardising over them changes no cosine
    vectors = torch.tensor([[0.0, 0], [1, 0], [-1, 0], [0, 1], [0, -1], [s, s], [-s, -s], [s, -s], [-s, s]])

    def ndcg(history, target):
        return content_ndcg_at_10(vectors, torch.tensor([history]), torch.tensor([target]))

    assert ndcg([1, 3], 5) == pytest.approx(1.0)  # (s, s) is the history's own direction
    assert ndcg([1, 0], 5) == pytest.approx(1 / math.log2(3))  # tied with item 7, which goes first
    assert ndcg([1, 0], 2) == pytest.approx(1 / math.log2(8))  # six items ahead; read item 1 is not ranked


def test_the_screen_writes_every_candidates_score(tmp_path, argv):
    write_atomic_dataset(tmp_path / "data", "tiny")
    llm_dir = save_tiny_llm(tmp_path / "llm", CONFIGS["llama"]())
    main(["--dataset", "tiny", "--out", str(tmp_path / "out"), "--set", f"data_path={tmp_path / 'data'}",
          f"llm_path={llm_dir}", "title_field=title", "show_progress=false", "title_max_tokens=6",
          'load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}'])
    result = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert result["valid_users"] == 12 and len(result["scores"]) == 2 * (NUM_LAYERS + 2)
    assert all(0 <= row["ndcg@10"] <= 1 for row in result["scores"])
    assert (tmp_path / "out" / "tiny.png").stat().st_size > 0


@pytest.mark.parametrize("item", ["title_max_tokens", "=16"])
def test_a_set_item_without_a_key_and_value_is_refused(item, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--dataset", "tiny", "--out", str(tmp_path / "out"), "--set", item])
    assert f"--set {item!r}: write KEY=VALUE" in capsys.readouterr().err and not (tmp_path / "out").exists()
