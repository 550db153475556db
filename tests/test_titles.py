"""Title embeddings: the backbone's inputs and the text prior, from the layer the settings name."""

import pytest
import torch

from recbole_layersel.errors import LayerSelError
from recbole_layersel.llm import load_llm
from recbole_layersel.titles import TitleSettings, encode_titles
from tests.tiny_models import CONFIGS, NUM_LAYERS, save_tiny_llm

TITLES = ["", "item number 1", "item 2", "number 3 item 4"]  # row 0: RecBole's padding item


def settings(**changes) -> TitleSettings:
    return TitleSettings(**{"title_max_tokens": 8, "title_pooling": "mean", "title_layer": None,
                            "llm_dtype": "float32", "llm_quantization": None, **changes})


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return load_llm(str(save_tiny_llm(tmp_path_factory.mktemp("llm"), CONFIGS["llama"]())))


@pytest.mark.parametrize("layer", [None, 0, 2, NUM_LAYERS])
def test_the_prior_pools_the_hidden_states_of_the_layer_named(llm, layer):
    model, tokenizer = llm
    encoded = encode_titles(model, tokenizer, TITLES, settings(title_layer=layer), batch_size=2,
                            show_progress=False)
    batch = tokenizer(TITLES[1:], padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**batch, output_hidden_states=True)
    hidden = outputs.last_hidden_state if layer is None else outputs.hidden_states[layer]
    mask = batch["attention_mask"].unsqueeze(-1)
    expected = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.allclose(encoded["prior"][1:], expected, atol=1e-5)
    assert not encoded["prior"][0].any() and not encoded["inputs"][0].any()


def test_a_layer_the_model_does_not_have_is_named(llm):
    with pytest.raises(LayerSelError, match=rf"title_layer=7; use ~ .* or a layer in 0..{NUM_LAYERS}"):
        encode_titles(*llm, TITLES, settings(title_layer=NUM_LAYERS + 1), batch_size=2, show_progress=False)
