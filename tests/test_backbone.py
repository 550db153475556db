"""Tests for recbole_layersel.backbone on tiny random models built from configs (nothing is downloaded).

The reference is always the source model itself: its own forward for the full selection, and a hand-written
loop over its original layers for subsets.
"""

import gc
import weakref

import pytest
import torch
from transformers import (
    AutoModel,
    BertForMaskedLM,
    Gemma3ForConditionalGeneration,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
)
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from recbole_layersel.backbone import (
    SUPPORTED_FAMILIES,
    Bridge,
    CompactBackbone,
    bridge_kind_for_gap,
    evaluating,
    validate_selection,
)
from tests.tiny_models import CONFIGS, DECODER, HIDDEN, NUM_LAYERS, SEQ_LEN, SLIDING_WINDOW

# Row 0 is left-padded, row 1 right-padded, row 2 unpadded.
PADDING_MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0], [1] * SEQ_LEN])


def make_model(family, attn_implementation="sdpa"):
    """The family's base model (for "gemma3": the multimodal Gemma3Model), seeded, in eval mode."""
    torch.manual_seed(0)
    return AutoModel.from_config(CONFIGS[family](), attn_implementation=attn_implementation).eval()


def random_inputs(batch=3):
    return torch.randn(batch, SEQ_LEN, HIDDEN, generator=torch.Generator().manual_seed(1))


def reference_forward(family, model, inputs_embeds, attention_mask, layers):
    """The source model's own stem, its layers `layers` in order, then its final norm, written out by hand.
    Returns (final hidden states, per-layer outputs)."""
    position_ids = torch.arange(SEQ_LEN).unsqueeze(0)
    mask_kwargs = dict(
        config=model.config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=position_ids,
    )
    outputs = []
    if family == "gpt2":
        mask = create_causal_mask(**mask_kwargs)
        hidden = model.drop(inputs_embeds + model.wpe(position_ids))
        for i in layers:
            hidden = model.h[i](hidden, attention_mask=mask, position_ids=position_ids)
            outputs.append(hidden)
        return model.ln_f(hidden), outputs
    if family == "bert":
        mask = create_bidirectional_mask(
            config=model.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
        )
        hidden = model.embeddings(inputs_embeds=inputs_embeds)
        for i in layers:
            hidden = model.encoder.layer[i](hidden, mask)
            outputs.append(hidden)
        return hidden, outputs
    # llama, gemma3_text: rotary position embeddings (one RoPE base per layer type for Gemma 3)
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * NUM_LAYERS
    hidden = inputs_embeds
    for i in layers:
        if layer_types[i] == "sliding_attention":
            mask = create_sliding_window_causal_mask(**mask_kwargs)
        else:
            mask = create_causal_mask(**mask_kwargs)
        if family == "gemma3_text":
            rope = model.rotary_emb(inputs_embeds, position_ids, layer_types[i])
        else:
            rope = model.rotary_emb(inputs_embeds, position_ids)
        hidden = model.layers[i](
            hidden, attention_mask=mask, position_embeddings=rope, position_ids=position_ids
        )
        outputs.append(hidden)
    return model.norm(hidden), outputs


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "padding"])
@pytest.mark.parametrize("family", list(CONFIGS))
@torch.no_grad()
def test_all_layers_reproduce_source_model(family, padded):
    model = make_model(family)
    source = model.language_model if family == "gemma3" else model
    inputs = random_inputs()
    mask = PADDING_MASK if padded else None
    expected = source(inputs_embeds=inputs, attention_mask=mask).last_hidden_state

    backbone = CompactBackbone(model, list(range(NUM_LAYERS))).eval()
    assert [bridge.kind for bridge in backbone.bridges] == ["identity"] * (NUM_LAYERS - 1)
    actual = backbone(inputs, attention_mask=mask)

    real = PADDING_MASK.bool() if padded else torch.ones(3, SEQ_LEN, dtype=torch.bool)
    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "selection, mlp_bridges, kinds",
    [
        ([0, 2, 5], False, ["linear", "linear"]),
        ([0, 5], False, ["residual"]),
        ([5, 0, 2], True, ["mlp", "mlp"]),
    ],
    ids=["linear", "residual", "mlp"],
)
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "bert"])
@torch.no_grad()
def test_subset_matches_manual_loop_over_original_layers(family, selection, mlp_bridges, kinds):
    model = make_model(family)
    inputs = random_inputs()
    expected, expected_per_layer = reference_forward(family, model, inputs, PADDING_MASK, sorted(selection))

    backbone = CompactBackbone(model, selection, mlp_bridges=mlp_bridges).eval()
    assert backbone.selected_layers == sorted(selection)
    assert [bridge.kind for bridge in backbone.bridges] == kinds
    last, per_layer = backbone(inputs, attention_mask=PADDING_MASK, output_hidden_states=True)

    real = PADDING_MASK.bool()
    torch.testing.assert_close(last[real], expected[real], atol=1e-5, rtol=0)
    assert len(per_layer) == len(selection)
    for actual_layer, expected_layer in zip(per_layer, expected_per_layer, strict=True):
        torch.testing.assert_close(actual_layer[real], expected_layer[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["identity", "linear", "residual", "mlp"])
def test_bridges_are_exact_identities_at_init(kind):
    torch.manual_seed(0)
    bridge = Bridge(kind, HIDDEN)
    hidden = torch.randn(2, SEQ_LEN, HIDDEN)
    assert bridge.kind == kind
    assert torch.equal(bridge(hidden), hidden)
    assert bridge.regularizer().item() == 0.0


def test_bridge_regularizers_measure_distance_from_identity():
    linear, residual, mlp = Bridge("linear", HIDDEN), Bridge("residual", HIDDEN), Bridge("mlp", HIDDEN)
    with torch.no_grad():
        linear.proj.weight.add_(0.5)
        residual.proj.weight.fill_(0.5)
        mlp.up.weight.fill_(0.5)
        mlp.up.bias.fill_(0.5)
    expected = 0.25 * HIDDEN * HIDDEN
    assert linear.regularizer().item() == pytest.approx(expected)
    assert residual.regularizer().item() == pytest.approx(expected)
    assert mlp.regularizer().item() == pytest.approx(0.25 * (mlp.up.weight.numel() + HIDDEN))
    linear.regularizer().backward()  # the penalty is differentiable, so it can join a training loss
    assert linear.proj.weight.grad is not None


@pytest.mark.parametrize("kind", ["linear", "residual"])
def test_low_rank_bridges_start_as_identity_and_penalise_their_change(kind):
    bridge = Bridge(kind, HIDDEN, rank=2)
    hidden = torch.randn(3, 5, HIDDEN)
    assert torch.equal(bridge(hidden), hidden) and bridge.regularizer().item() == 0.0
    assert sum(p.numel() for p in bridge.parameters()) == 2 * 2 * HIDDEN  # U and V, not H x H
    with torch.no_grad():
        bridge.up.weight.normal_()
    change = bridge.up.weight @ bridge.down.weight  # W - I (linear) or W (residual), rank 2
    assert torch.allclose(bridge(hidden), hidden + hidden @ change.T, atol=1e-5)
    assert bridge.regularizer().item() == pytest.approx(change.pow(2).sum().item(), rel=1e-4)


def test_bridge_rank_at_or_above_hidden_size_is_full_rank():
    assert Bridge("linear", HIDDEN, rank=HIDDEN).proj.weight.shape == (HIDDEN, HIDDEN)
    assert not Bridge("mlp", HIDDEN, rank=2).low_rank  # the MLP bridge has its own bottleneck


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_bridge_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match=f"bridge_rank={rank!r}; use a positive integer"):
        Bridge("linear", HIDDEN, rank=rank)


def test_bridge_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'conv'.*identity"):
        Bridge("conv", HIDDEN)


@pytest.mark.parametrize(
    "gap, mlp, kind",
    [(1, False, "identity"), (2, False, "linear"), (3, False, "linear"), (4, False, "residual")]
    + [(9, False, "residual"), (1, True, "identity"), (2, True, "mlp"), (7, True, "mlp")],
)
def test_bridge_kind_for_gap(gap, mlp, kind):
    assert bridge_kind_for_gap(gap, mlp=mlp) == kind


def test_bridge_kind_for_gap_rejects_non_positive_gap():
    with pytest.raises(ValueError, match="gap must be >= 1"):
        bridge_kind_for_gap(0)


def test_validate_selection_returns_sorted_ints():
    assert validate_selection((5, 0, 2), 6) == [0, 2, 5]
    assert validate_selection([torch.tensor(3).item()], 6) == [3]


@pytest.mark.parametrize(
    "selection, message",
    [
        ([], r"empty.*0\.\.5"),
        ([0, 6], r"\[6\] are out of range; valid indices are 0\.\.5"),
        ([-1, 2], r"\[-1\] are out of range"),
        ([1, 2, 2, 4, 4], r"\[2, 4\] are selected more than once"),
        ([0, "1"], r"integer layer indices, got \['1'\]"),
        ([0, 1.0], r"integer layer indices, got \[1\.0\]"),
        ([True], r"integer layer indices, got \[True\]"),
        (list(range(7)), r"7 layers selected but the model has only 6"),
    ],
    ids=["empty", "out_of_range", "negative", "duplicates", "str", "float", "bool", "too_many"],
)
def test_validate_selection_rejects_bad_selections(selection, message):
    with pytest.raises(ValueError, match=message):
        validate_selection(selection, NUM_LAYERS)


def test_backbone_rejects_bad_selection():
    with pytest.raises(ValueError, match=r"valid indices are 0\.\.5"):
        CompactBackbone(make_model("llama"), [0, 6])


def test_unsupported_architecture_is_named():
    torch.manual_seed(0)
    model = AutoModel.from_config(MistralConfig(**dict(DECODER, num_hidden_layers=1)))
    with pytest.raises(ValueError, match="'mistral'") as error:
        CompactBackbone(model, [0])
    assert all(family in str(error.value) for family in SUPPORTED_FAMILIES)


def test_unselected_layers_and_heads_are_released():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**DECODER))
    layer_refs = [weakref.ref(layer) for layer in model.model.layers]
    head_refs = [weakref.ref(model.lm_head), weakref.ref(model.model.embed_tokens)]
    layer_numel = sum(p.numel() for p in model.model.layers[0].parameters())
    full_numel = sum(p.numel() for p in model.parameters())

    backbone = CompactBackbone(model, [1, 4])
    del model
    gc.collect()

    assert [ref() is not None for ref in layer_refs] == [False, True, False, False, True, False]
    assert all(ref() is None for ref in head_refs)
    decoder_layers = [m for m in backbone.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert decoder_layers == list(backbone.layers) and len(decoder_layers) == 2
    # two layers + final norm + one linear bridge (two layers skipped)
    expected_numel = 2 * layer_numel + HIDDEN + HIDDEN * HIDDEN
    assert sum(p.numel() for p in backbone.parameters()) == expected_numel < full_numel


@torch.no_grad()
def test_building_a_backbone_leaves_the_source_model_as_it_was():
    model = make_model("gemma3_text").eval()
    inputs = random_inputs()
    before = model(inputs_embeds=inputs).last_hidden_state
    configs = [(module, module.config) for module in model.modules() if hasattr(module, "config")]
    layer_ids = [(module, module.layer_idx) for module in model.modules() if hasattr(module, "layer_idx")]
    backbone = CompactBackbone(model, [4, 0, 1])
    assert backbone.selected_layers == [0, 1, 4] and backbone.num_source_layers == NUM_LAYERS
    assert backbone.config.num_hidden_layers == 3
    assert backbone.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert [layer.self_attn.sliding_window for layer in backbone.layers] == [
        SLIDING_WINDOW,
        None,
        SLIDING_WINDOW,
    ]
    with backbone.eager_attention():
        backbone(inputs, output_attentions=True)
    assert all(module.config is config for module, config in configs)
    assert all(module.layer_idx == index for module, index in layer_ids)
    assert model.config.num_hidden_layers == NUM_LAYERS and model.config._attn_implementation == "sdpa"
    assert backbone.config._attn_implementation == "sdpa"
    assert torch.equal(model(inputs_embeds=inputs).last_hidden_state, before)


@torch.no_grad()
def test_sliding_window_changes_the_output():
    """Guards the Gemma 3 exactness test: its sliding window must actually cut attention short."""
    backbone = CompactBackbone(make_model("gemma3_text"), list(range(NUM_LAYERS))).eval()
    inputs = random_inputs()
    windowed = backbone(inputs)
    backbone.config.sliding_window = SEQ_LEN
    assert not torch.allclose(backbone(inputs)[:, SLIDING_WINDOW:], windowed[:, SLIDING_WINDOW:])


@pytest.mark.parametrize(
    "model_class, family",
    [
        (LlamaForCausalLM, "llama"),
        (GPT2LMHeadModel, "gpt2"),
        (BertForMaskedLM, "bert"),
        (Gemma3ForConditionalGeneration, "gemma3"),
    ],
)
@torch.no_grad()
def test_models_with_heads_use_their_base_model(model_class, family):
    torch.manual_seed(0)
    model = model_class(CONFIGS[family]()).eval()
    source = model.model.language_model if family == "gemma3" else model.base_model
    inputs = random_inputs()
    expected = source(inputs_embeds=inputs, attention_mask=PADDING_MASK).last_hidden_state
    backbone = CompactBackbone(model, list(range(NUM_LAYERS))).eval()
    real = PADDING_MASK.bool()
    torch.testing.assert_close(backbone(inputs, PADDING_MASK)[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "bert"])
@torch.no_grad()
def test_eager_attention_probabilities_match_source(family):
    model = make_model(family, attn_implementation="eager")
    inputs = random_inputs()
    expected = model(inputs_embeds=inputs, attention_mask=PADDING_MASK, output_attentions=True)

    backbone = CompactBackbone(model, list(range(NUM_LAYERS))).eval()
    last, per_layer, attentions = backbone(
        inputs, PADDING_MASK, output_hidden_states=True, output_attentions=True
    )
    real = PADDING_MASK.bool()
    torch.testing.assert_close(last[real], expected.last_hidden_state[real], atol=1e-5, rtol=0)
    assert len(per_layer) == len(attentions) == NUM_LAYERS
    for actual, reference in zip(attentions, expected.attentions, strict=True):
        assert actual.shape == (3, 4, SEQ_LEN, SEQ_LEN)  # (batch, heads, query, key)
        real_queries, reference_queries = actual.transpose(1, 2)[real], reference.transpose(1, 2)[real]
        torch.testing.assert_close(real_queries, reference_queries, atol=1e-5, rtol=0)
        torch.testing.assert_close(real_queries.sum(-1), torch.ones(int(real.sum()), 4))


def test_attention_probabilities_need_eager_attention():
    backbone = CompactBackbone(make_model("llama"), [0, 1])
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        backbone(random_inputs(), output_attentions=True)


def test_evaluating_puts_every_submodule_in_eval_mode_and_back_also_on_error():
    module = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Dropout(0.5)))
    module[1].eval()  # a mixed start: the parent trains, one child does not
    before = [submodule.training for submodule in module.modules()]
    with evaluating(module):
        assert not any(submodule.training for submodule in module.modules())
    assert [submodule.training for submodule in module.modules()] == before
    with pytest.raises(RuntimeError), evaluating(module):
        raise RuntimeError("a pass failed")
    assert [submodule.training for submodule in module.modules()] == before
