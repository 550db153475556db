"""Title embeddings: the backbone's inputs and the text prior, the kept layers' states over the title."""

import pytest
import torch

from recbole_layersel.backbone import CompactBackbone, seeded_backbone
from recbole_layersel.errors import LayerSelError
from recbole_layersel.llm import load_llm
from recbole_layersel.titles import TitlePriors, TitleSettings, backbone_fingerprint, encode_titles
from tests.tiny_models import CONFIGS, NUM_LAYERS, save_tiny_llm

TITLES = ["", "item number 1", "item 2", "number 3 item 4"]  # row 0: RecBole's padding item


def settings(**changes) -> TitleSettings:
    return TitleSettings(**{"title_max_tokens": 8, "title_pooling": "mean", "llm_dtype": "float32",
                            "llm_quantization": None, **changes})


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return load_llm(str(save_tiny_llm(tmp_path_factory.mktemp("llm"), CONFIGS["llama"]())))


def encode(llm, layers, **changes):
    model, tokenizer = llm
    return encode_titles(CompactBackbone(model, layers), model.get_input_embeddings(), tokenizer, TITLES,
                         settings(**changes), batch_size=2, show_progress=False)


def mean_over_tokens(hidden, mask):
    mask = mask.unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("first", [0, 2, NUM_LAYERS])
def test_the_prior_pools_the_final_states_of_the_layers_kept(llm, first):
    model, tokenizer = llm
    encoded = encode(llm, list(range(first)))
    batch = tokenizer(TITLES[1:], padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**batch, output_hidden_states=True)
        # the first i layers kept give layer i's output, then the final norm
        last = first == NUM_LAYERS
        hidden = outputs.last_hidden_state if last else model.norm(outputs.hidden_states[first])
        inputs = model.get_input_embeddings()(batch["input_ids"])
    assert torch.allclose(encoded["prior"][1:], mean_over_tokens(hidden, batch["attention_mask"]), atol=1e-5)
    assert torch.allclose(encoded["inputs"][1:], mean_over_tokens(inputs, batch["attention_mask"]), atol=1e-6)
    assert not encoded["prior"][0].any() and not encoded["inputs"][0].any()


def test_other_layers_give_another_prior_and_another_fingerprint(llm):
    model, _ = llm
    assert not torch.allclose(encode(llm, [0, 1])["prior"], encode(llm, [0, 2])["prior"])
    one, other = CompactBackbone(model, [0, 2]), CompactBackbone(model, [0, 2])
    assert backbone_fingerprint(one) == backbone_fingerprint(other)
    adjacent = [backbone_fingerprint(CompactBackbone(model, layers)) for layers in ([0, 1], [1, 2])]
    assert adjacent[0] != adjacent[1]  # identity bridges both: the layers tell them apart
    with torch.no_grad():
        next(other.bridges.parameters()).add_(1.0)  # a distilled bridge
    assert backbone_fingerprint(one) != backbone_fingerprint(other)


def test_last_token_pooling_reads_each_titles_last_token(llm):
    model, tokenizer = llm
    encoded = encode(llm, [0, 1], title_pooling="last")
    for i, title in enumerate(TITLES[1:], start=1):
        batch = tokenizer([title], return_tensors="pt")
        with torch.no_grad():
            alone = CompactBackbone(model, [0, 1])(model.get_input_embeddings()(batch["input_ids"]))
        assert torch.allclose(encoded["prior"][i], alone[0, -1], atol=1e-5)


def test_titles_are_batched_by_length_and_written_to_their_own_rows(llm):
    model, tokenizer = llm
    titles = ["", "a much longer title of an item", "item 2", "another long title of an item too", "item 3"]
    backbone = CompactBackbone(model, [0])
    widths = []
    backbone.register_forward_pre_hook(lambda _module, args: widths.append(args[0].shape[1]))
    wide = settings(title_max_tokens=32)
    encoded = encode_titles(backbone, model.get_input_embeddings(), tokenizer, titles, wide, batch_size=2,
                            show_progress=False)
    lengths = sorted(len(tokenizer(title)["input_ids"]) for title in titles)
    assert widths == [max(lengths[start:start + 2]) for start in range(0, len(titles), 2)]
    for i, title in enumerate(titles[1:], start=1):
        alone = encode_titles(backbone, model.get_input_embeddings(), tokenizer, ["", title], wide,
                              batch_size=2, show_progress=False)
        assert torch.allclose(encoded["prior"][i], alone["prior"][1], atol=1e-5)


def test_an_unknown_pooling_is_named(llm):
    with pytest.raises(LayerSelError, match=r"title_pooling='max' is not supported; use one of"):
        encode(llm, [0], title_pooling="max")


@pytest.mark.parametrize("mlp_bridges", [False, True])
def test_title_priors_are_the_priors_of_the_layer_sets_at_their_identity_bridges(llm, mlp_bridges):
    model, tokenizer = llm
    priors = TitlePriors(model, tokenizer, TITLES, settings(), batch_size=2)
    for layers in ([0, 2], [0, 1], [0, 1, 5], [], [3], [0, 2]):  # gaps of 2 and 4: linear, residual bridges
        backbone = seeded_backbone(model, layers, seed=7, mlp_bridges=mlp_bridges)
        expected = encode_titles(backbone, model.get_input_embeddings(), tokenizer, TITLES, settings(),
                                 batch_size=2, show_progress=False)["prior"]
        torch.testing.assert_close(priors(layers), expected)


def layer_counting_priors(llm):
    """TitlePriors on ``llm`` and ``layers_run(layers)``: the layers a call runs, in order."""
    model, tokenizer = llm
    priors = TitlePriors(model, tokenizer, TITLES, settings(), batch_size=2)
    runs = []
    run_layer = priors.full.run_layer
    priors.full.run_layer = lambda index, *args: runs.append(index) or run_layer(index, *args)

    def layers_run(layers):
        runs.clear()
        priors(layers)
        return runs[::-(-len(TITLES) // 2)]  # each layer runs once per batch of titles

    return priors, layers_run


def test_title_priors_run_only_the_layers_above_the_longest_kept_prefix(llm):
    priors, layers_run = layer_counting_priors(llm)
    assert layers_run([0, 1, 4]) == [0, 1, 4]
    assert layers_run([0, 1, 3]) == [3]
    assert layers_run([0, 2]) == [2]
    assert layers_run([1, 0]) == []
    priors.cache_bytes = 0  # only the latest set's states stay
    assert layers_run([0, 2, 3]) == [3] and list(priors.kept) == [(0, 2, 3)]
    assert layers_run([0, 2]) == [0, 2]


def test_title_priors_drop_the_states_of_retained_sets_last(llm):
    priors, layers_run = layer_counting_priors(llm)
    priors([0, 2, 4])
    priors.cache_bytes = 4 * sum(hidden.nbytes for hidden in priors.kept[(0,)])  # room for four sets' states
    priors.retain([[0, 2, 4]])  # the beam: the next candidates extend it
    priors([0, 1, 2, 4])  # by least recent use (0, 2) and (0, 2, 4) would go now
    assert (0, 2) in priors.kept and (0, 2, 4) in priors.kept and (0, 1, 2) not in priors.kept
    assert layers_run([0, 2, 3, 4]) == [3, 4]
