"""Tests for recbole_layersel.importance on tiny random models built from configs (nothing is downloaded).

Expected values are recomputed from the source model itself, independently of the backbone: its own
forward (with Hugging Face's ``output_attentions``), hooks on its layers, and torch.autograd.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from scipy.stats import spearmanr
from transformers import AutoModel

from recbole_layersel import importance
from recbole_layersel.backbone import CompactBackbone
from recbole_layersel.errors import LayerSelError
from recbole_layersel.importance import (
    CRITERIA,
    GROUPS,
    ImportanceResult,
    compute_importance,
    fuse_scores,
    plot_importance_heatmap,
    rank_correlation,
    validate_group_weights,
)
from tests.tiny_models import CONFIGS, HIDDEN, NUM_LAYERS, SEQ_LEN

# Right-padded rows of different lengths, one with a single valid position; batch_size=3 makes two
# mini-batches of unequal size.
LENGTHS = torch.tensor([8, 5, 3, 8, 1])
MASK = (torch.arange(SEQ_LEN) < LENGTHS[:, None]).long()
BATCH_SIZE = 3
BATCHES = [slice(0, 3), slice(3, 5)]
NUM_ITEMS = 7
TOP_K = 2
IDENTITY_LAYER = 2


def make_model(family, attn_implementation="sdpa"):
    """The family's seeded base model, with weights 10x the default init scale so that every layer
    visibly changes its input and attention is far from uniform."""
    torch.manual_seed(0)
    config = CONFIGS[family]()
    config.initializer_range = 0.2
    return AutoModel.from_config(config, attn_implementation=attn_implementation).eval()


def full_backbone(model):
    return CompactBackbone(model, list(range(model.config.num_hidden_layers)))


def sample():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(len(LENGTHS), SEQ_LEN, HIDDEN, generator=generator)
    head = torch.randn(HIDDEN, NUM_ITEMS, generator=generator)
    targets = torch.randint(NUM_ITEMS, (len(LENGTHS),), generator=generator)
    return inputs, head, targets


def cross_entropy_loss(head, targets):
    """A recommendation-style loss: scores of a fixed linear head on the last states, cross-entropy with
    fixed targets."""
    def loss(states, rows):
        last_states = states[torch.arange(len(states)), LENGTHS[rows] - 1]
        return F.cross_entropy(last_states @ head, targets[rows])

    return loss


def given(loss_fn):
    """A make_loss that ignores the full model's final states and returns ``loss_fn``."""
    return lambda _final_states: loss_fn


def reference_pass(model, inputs):
    """The HF model's own eager forward: per-layer inputs and outputs (hooks), attention probabilities
    and the final states."""
    layer_inputs, layer_outputs = [], []
    hooks = []
    for layer in model.layers:
        hooks.append(layer.register_forward_pre_hook(lambda _m, args: layer_inputs.append(args[0])))
        hooks.append(layer.register_forward_hook(lambda _m, _a, output: layer_outputs.append(output)))
    with torch.no_grad():
        output = model(inputs_embeds=inputs, attention_mask=MASK, output_attentions=True)
    for hook in hooks:
        hook.remove()
    return layer_inputs, layer_outputs, output.attentions, output.last_hidden_state


@pytest.fixture(scope="module")
def llama_run():
    """compute_importance on a full Llama backbone, and an identical eager Llama as the reference."""
    inputs, head, targets = sample()
    backbone = full_backbone(make_model("llama"))
    loss_fn = cross_entropy_loss(head, targets)
    result, teacher = compute_importance(
        backbone, inputs, MASK, given(loss_fn), attention_top_k=TOP_K, batch_size=BATCH_SIZE
    )
    return result, teacher, make_model("llama", "eager"), inputs, head, targets


def test_fisher_is_mean_of_per_row_squared_gradients(llama_run):
    result, _, reference, inputs, head, targets = llama_run
    # The layers' linear maps: every parameter but the norms' scales.
    params_by_layer = [[module.weight for module in layer.modules() if isinstance(module, torch.nn.Linear)]
                       for layer in reference.layers]
    param_counts = torch.tensor([sum(p.numel() for p in layer) for layer in params_by_layer])

    def squared_gradient_per_parameter(rows):
        """Per layer: the squared gradient of the mean loss over `rows`, averaged over the parameters."""
        states = reference(inputs_embeds=inputs[rows], attention_mask=MASK[rows]).last_hidden_state
        last_states = states[torch.arange(len(states)), LENGTHS[rows] - 1]
        loss = F.cross_entropy(last_states @ head, targets[rows])
        layer_grads = [torch.autograd.grad(loss, layer, retain_graph=True) for layer in params_by_layer]
        sums = [sum(grad.double().pow(2).sum() for grad in grads) for grads in layer_grads]
        return torch.stack(sums) / param_counts

    per_row = [squared_gradient_per_parameter(slice(row, row + 1)) for row in range(len(LENGTHS))]
    expected = torch.stack(per_row).mean(0)
    assert result.raw["fisher"] == pytest.approx(expected.tolist(), rel=1e-4)
    assert expected.min() > 0
    # The squared gradient of each mini-batch's loss (the rows' gradients averaged before squaring) is
    # far from it, so this test tells the two apart.
    per_batch = torch.stack([squared_gradient_per_parameter(rows) for rows in BATCHES]).mean(0)
    assert ((per_batch / expected - 1).abs() > 0.1).all()


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "bert"])
def test_fisher_counts_the_biases_of_every_family_linear_maps(family):
    """GPT-2's Conv1D maps, Qwen2's attention biases, BERT's Linear maps with biases: the batched Fisher
    equals the per-row squared gradients of their weights and biases."""
    inputs, head, targets = sample()
    backbone = full_backbone(make_model(family))
    loss_fn = cross_entropy_loss(head, targets)
    result, _ = compute_importance(backbone, inputs, MASK, given(loss_fn), batch_size=BATCH_SIZE)
    maps = [[module for module in layer.modules() if isinstance(module, importance._LINEAR_MAPS)]
            for layer in backbone.layers]
    params = [[p for module in layer for p in (module.weight, module.bias) if p is not None]
              for layer in maps]
    assert any(module.bias is not None for layer in maps for module in layer)
    backbone.requires_grad_(True)
    per_row = []
    for row in range(len(LENGTHS)):
        loss = loss_fn(backbone(inputs[row:row + 1], MASK[row:row + 1]), torch.tensor([row]))
        per_row.append([sum(grad.double().pow(2).sum() for grad in torch.autograd.grad(loss, layer,
                                                                                          retain_graph=True))
                        / sum(p.numel() for p in layer) for layer in params])
    expected = torch.tensor(per_row).mean(0)
    assert result.raw["fisher"] == pytest.approx(expected.tolist(), rel=1e-4)


def test_make_loss_gets_the_full_models_final_states_once(llama_run):
    _, teacher, *_ = llama_run
    inputs, head, targets = sample()
    seen = []

    def make_loss(final_states):
        seen.append(final_states)
        return cross_entropy_loss(head, targets)

    compute_importance(full_backbone(make_model("llama")), inputs, MASK, make_loss, batch_size=BATCH_SIZE)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], teacher["last"])


def test_attention_criteria_match_hf_attention_probabilities(llama_run):
    result, _, reference, inputs, *_ = llama_run
    _, _, attentions, _ = reference_pass(reference, inputs)
    valid = MASK.bool()
    for layer, probs in enumerate(attentions):
        assert probs.shape == (len(LENGTHS), reference.config.num_attention_heads, SEQ_LEN, SEQ_LEN)
        entropy = -torch.where(probs > 0, probs * probs.log(), torch.zeros(())).sum(-1)  # (N, heads, T)
        top_mass = probs.topk(TOP_K, dim=-1).values.sum(-1)
        # Only valid queries count: padding rows of the batch are left out.
        assert result.raw["attention_entropy"][layer] == pytest.approx(
            entropy.transpose(1, 2)[valid].mean().item(), rel=1e-5
        )
        assert result.raw["attention_topk_mass"][layer] == pytest.approx(
            top_mass.transpose(1, 2)[valid].mean().item(), rel=1e-5
        )
        # With padding queries included the value would differ, so the test can tell.
        assert entropy.mean().item() != pytest.approx(result.raw["attention_entropy"][layer], rel=1e-3)


def test_hidden_state_criteria_match_hand_computation(llama_run):
    result, _, reference, inputs, *_ = llama_run
    layer_inputs, layer_outputs, _, _ = reference_pass(reference, inputs)
    valid = MASK.bool()
    for layer, (h_in, h_out) in enumerate(zip(layer_inputs, layer_outputs, strict=True)):
        h_in, h_out = h_in[valid].double(), h_out[valid].double()
        cos = F.cosine_similarity(h_in, h_out, dim=-1)
        values = h_out.flatten() - h_out.mean()
        singular = torch.linalg.svdvals(h_out - h_out.mean(0))
        spectrum = singular / singular.sum()
        expected = {
            "norm_growth": (h_out.norm(dim=-1) / h_in.norm(dim=-1)).mean(),
            "activation_variance": h_out.var(dim=-1, correction=0).mean(),
            "activation_kurtosis": (values**4).mean() / (values**2).mean() ** 2 - 3,
            "effective_rank": torch.exp(-(spectrum * spectrum.log()).sum()),
            "block_influence": (1 - cos).mean(),
            "angular_distance": (torch.arccos(cos) / math.pi).mean(),
        }
        for name, value in expected.items():
            assert result.raw[name][layer] == pytest.approx(value.item(), rel=1e-4), name
        assert result.raw["block_influence"][layer] > 1e-3


def test_angular_distance_matrix_spans_input_of_l_to_output_of_m(llama_run):
    result, _, reference, inputs, *_ = llama_run
    layer_inputs, layer_outputs, _, _ = reference_pass(reference, inputs)
    valid = MASK.bool()
    matrix = result.angular_distance_matrix
    assert len(matrix) == NUM_LAYERS and all(len(row) == NUM_LAYERS for row in matrix)
    for first in range(NUM_LAYERS):
        for last in range(NUM_LAYERS):
            if last < first:
                assert matrix[first][last] == 0.0
                continue
            h_in, h_out = layer_inputs[first][valid].double(), layer_outputs[last][valid].double()
            cos = F.cosine_similarity(h_in, h_out, dim=-1)
            assert matrix[first][last] == pytest.approx((torch.arccos(cos) / math.pi).mean().item(), rel=1e-4)
    assert [matrix[layer][layer] for layer in range(NUM_LAYERS)] == result.raw["angular_distance"]


def test_ranges_teacher_and_weight_magnitude(llama_run):
    result, teacher, reference, inputs, *_ = llama_run
    assert all(0 <= mass <= 1 for mass in result.raw["attention_topk_mass"])
    assert all(1 <= rank <= HIDDEN for rank in result.raw["effective_rank"])
    _, layer_outputs, _, last_hidden_state = reference_pass(reference, inputs)
    valid = MASK.bool()
    assert teacher["last"].shape == (len(LENGTHS), SEQ_LEN, HIDDEN)
    assert teacher["per_layer"].shape == (NUM_LAYERS, len(LENGTHS), SEQ_LEN, HIDDEN)
    for tensor in teacher.values():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and not tensor.requires_grad
    torch.testing.assert_close(teacher["last"][valid], last_hidden_state[valid])
    torch.testing.assert_close(teacher["per_layer"][:, valid], torch.stack(layer_outputs)[:, valid])
    expected_magnitude = [
        (sum(p.abs().sum() for p in layer.parameters()) / sum(p.numel() for p in layer.parameters())).item()
        for layer in reference.layers
    ]
    assert result.weight_magnitude == pytest.approx(expected_magnitude, rel=1e-5)


def test_fusion_correlation_and_json(llama_run):
    result = llama_run[0]
    assert result.group_weights == validate_group_weights(None)
    assert result.groups == {group: list(criteria) for group, criteria in GROUPS.items()}
    fusion = fuse_scores(result.raw)
    assert (result.normalised, result.group_scores, result.fused, result.ranking) == tuple(fusion)
    assert result.correlation == rank_correlation(result.raw)
    assert sorted(result.ranking) == list(range(NUM_LAYERS))
    assert all(0 <= value <= 1 for value in result.normalised["fisher"])  # distillation weights rely on it
    for first in CRITERIA:  # Spearman's rho, computed independently, direction applied
        for second in CRITERIA:
            rho = spearmanr([CRITERIA[first] * v for v in result.raw[first]],
                            [CRITERIA[second] * v for v in result.raw[second]]).statistic
            assert result.correlation[first][second] == pytest.approx(rho, abs=1e-12), (first, second)
    as_json = json.loads(json.dumps(result.to_json()))
    assert as_json == result.to_json()
    assert set(as_json) == {
        "raw", "normalised", "groups", "group_weights", "group_scores", "fused", "ranking", "correlation",
        "angular_distance_matrix", "weight_magnitude",
    }


def test_groups_partition_the_criteria():
    grouped = [name for criteria in GROUPS.values() for name in criteria]
    assert sorted(grouped) == sorted(CRITERIA) and len(grouped) == len(set(grouped))


def test_identity_layer_has_zero_influence_and_topk_mass_one_for_k_at_least_t():
    model = make_model("llama")
    layer = model.layers[IDENTITY_LAYER]
    with torch.no_grad():  # zero output projections: the layer adds nothing to its residual stream
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    inputs, head, targets = sample()
    result, _ = compute_importance(
        full_backbone(model), inputs, MASK, given(cross_entropy_loss(head, targets)), attention_top_k=SEQ_LEN
    )
    raw, matrix = result.raw, result.angular_distance_matrix
    others = [i for i in range(NUM_LAYERS) if i != IDENTITY_LAYER]
    assert raw["block_influence"][IDENTITY_LAYER] == pytest.approx(0.0, abs=1e-12)
    assert raw["angular_distance"][IDENTITY_LAYER] == pytest.approx(0.0, abs=1e-12)
    assert raw["norm_growth"][IDENTITY_LAYER] == pytest.approx(1.0, abs=1e-12)
    assert all(raw["block_influence"][i] > 1e-3 and raw["angular_distance"][i] > 1e-3 for i in others)
    # Skipping an identity layer changes no distance: from layer 1's input, layer 2's output is layer 1's.
    assert matrix[1][IDENTITY_LAYER] == pytest.approx(matrix[1][1], abs=1e-12)
    assert matrix[IDENTITY_LAYER][3] == pytest.approx(matrix[3][3], abs=1e-12)
    assert raw["attention_topk_mass"] == pytest.approx([1.0] * NUM_LAYERS, abs=1e-5)


def test_restores_attention_implementation_flags_modes_and_leaves_no_grad():
    inputs, head, targets = sample()
    head.requires_grad_(True)  # a trainable head in the caller's closure must not get a .grad either
    backbone = full_backbone(make_model("llama"))
    backbone.requires_grad_(False)
    backbone.layers[1].mlp.requires_grad_(True)  # mixed flags must come back exactly
    backbone.train()
    backbone.norm.eval()
    flags = [p.requires_grad for p in backbone.parameters()]
    modes = [m.training for m in backbone.modules()]
    hook_counts = [len(layer._forward_pre_hooks) for layer in backbone.layers]

    def check_restored():
        assert backbone.config._attn_implementation == "sdpa"
        configs = [m.config for m in backbone.modules() if hasattr(m, "config")]
        assert all(config._attn_implementation == "sdpa" for config in configs)
        assert [p.requires_grad for p in backbone.parameters()] == flags
        assert [m.training for m in backbone.modules()] == modes
        assert [len(layer._forward_pre_hooks) for layer in backbone.layers] == hook_counts
        assert all(p.grad is None for p in backbone.parameters()) and head.grad is None

    loss_fn = cross_entropy_loss(head, targets)
    compute_importance(backbone, inputs, MASK, given(loss_fn), batch_size=BATCH_SIZE)
    check_restored()

    def failing_loss(states, rows):
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        compute_importance(backbone, inputs, MASK, given(failing_loss))
    check_restored()


@pytest.mark.parametrize("family", ["gpt2", "bert", "gemma3_text"])
def test_other_families_smoke(family):
    inputs, head, targets = sample()
    backbone = full_backbone(make_model(family))
    backbone.train()  # dropout in GPT-2 and BERT: the pass must run in eval mode to be reproducible
    loss_fn = cross_entropy_loss(head, targets)
    result, teacher = compute_importance(backbone, inputs, MASK, given(loss_fn), batch_size=BATCH_SIZE)
    again, _ = compute_importance(backbone, inputs, MASK, given(loss_fn), batch_size=BATCH_SIZE)
    assert result.raw == again.raw
    assert backbone.training and backbone.config._attn_implementation == "sdpa"
    for name, values in result.raw.items():
        assert len(values) == NUM_LAYERS and all(math.isfinite(v) for v in values), name
    assert sorted(result.ranking) == list(range(NUM_LAYERS))
    assert teacher["per_layer"].shape == (NUM_LAYERS, len(LENGTHS), SEQ_LEN, HIDDEN)
    backbone.eval()
    with torch.no_grad():
        expected_last = backbone(inputs, MASK)
    torch.testing.assert_close(teacher["last"][MASK.bool()], expected_last[MASK.bool()])


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (MASK.flip(1), r"rows \[1, 2, 4\] are empty or not right-padded"),
        (torch.cat([MASK[:4], torch.zeros(1, SEQ_LEN, dtype=torch.long)]), r"rows \[4\]"),
        (MASK[:, :4], r"attention_mask has shape \(5, 4\)"),
        (MASK * 2, r"only 0 and 1, got values \[0, 2\]"),
    ],
)
def test_bad_masks_are_rejected(mask, match):
    inputs, head, targets = sample()
    backbone = full_backbone(make_model("llama"))
    with pytest.raises(LayerSelError, match=match):
        compute_importance(backbone, inputs, mask, given(cross_entropy_loss(head, targets)))


def test_bad_backbone_arguments_and_loss_are_rejected():
    inputs, head, targets = sample()
    loss_fn = cross_entropy_loss(head, targets)
    with pytest.raises(LayerSelError, match=r"keeps only layers \[0, 2\] of 6.*list\(range\(6\)\)"):
        compute_importance(CompactBackbone(make_model("llama"), [0, 2]), inputs, MASK, given(loss_fn))
    backbone = full_backbone(make_model("llama"))
    with pytest.raises(LayerSelError, match="batch_size must be a positive integer, got 0"):
        compute_importance(backbone, inputs, MASK, given(loss_fn), batch_size=0)
    with pytest.raises(LayerSelError, match="attention_top_k must be a positive integer, got 1.5"):
        compute_importance(backbone, inputs, MASK, given(loss_fn), attention_top_k=1.5)
    with pytest.raises(LayerSelError, match=r"inputs_embeds must have shape \(N >= 1, T, 32\)"):
        compute_importance(backbone, inputs[..., :16], MASK, given(loss_fn))
    with pytest.raises(LayerSelError, match=r"unknown importance groups \['fishr'\]"):
        compute_importance(backbone, inputs, MASK, given(loss_fn), group_weights={"fishr": 1.0})
    with pytest.raises(LayerSelError, match="loss_fn must return a scalar tensor"):
        compute_importance(backbone, inputs, MASK, given(lambda states, rows: states.sum(-1)))
    assert backbone.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"fishr": 1.0}, r"groups \['fishr'\]; .*fisher, change, activations, output_rank, attention"),
        ({"block_influence": 1.0}, r"\['block_influence'\].*change = norm_growth \+ block_influence"),
        ({"fisher": -1.0, "change": 2.0}, r">= 0, got \{'fisher': -1\.0\}.*fisher, change, activations"),
        ({"fisher": float("nan")}, r"got \{'fisher': nan\}"),
        ({"fisher": True}, r"got \{'fisher': True\}"),
        ({"fisher": "1"}, r"got \{'fisher': '1'\}"),
        ({"fisher": 0, "change": 0.0}, r"\{'fisher': 0, 'change': 0\.0\} sum to 0.*fisher, change, activ"),
        (["fisher"], r"mapping group -> weight, got \['fisher'\].*fisher = fisher; change = "),
    ],
)
def test_validate_group_weights_rejects(weights, match):
    with pytest.raises(LayerSelError, match=match):
        validate_group_weights(weights)


def test_group_weights_normalise_and_zero_drops_a_group():
    assert validate_group_weights(None) == dict.fromkeys(GROUPS, 0.2)
    assert validate_group_weights({"fisher": 3, "change": 1, "attention": 0}) == {
        "fisher": 0.75, "change": 0.25, "activations": 0.0, "output_rank": 0.0, "attention": 0.0
    }
    raw = {name: [4.0, 1.0, 3.0, 2.0] for name in (*GROUPS["fisher"], *GROUPS["change"])}
    raw["fisher"] = [1.0, 2.0, 3.0, 4.0]
    fusion = fuse_scores(raw, {"fisher": 3, "change": 1, "attention": 0})  # no activation/attention scores
    assert set(fusion.group_scores) == {"fisher", "change"}
    fisher_ranks, change_ranks = [0, 1 / 3, 2 / 3, 1], [1, 0, 2 / 3, 1 / 3]
    expected = [0.75 * f + 0.25 * c for f, c in zip(fisher_ranks, change_ranks, strict=True)]
    assert fusion.fused == pytest.approx(expected)
    assert fuse_scores(raw, {"fisher": 6, "change": 2}).fused == pytest.approx(expected)
    # With every criterion given, the attention scores still change nothing.
    full = {name: [0.0, 9.0, 5.0, 7.0] for name in CRITERIA} | raw
    changed = full | {"attention_entropy": [9.0, 0.0, 5.0, 1.0]}
    weights = {"fisher": 3, "change": 1}
    assert fuse_scores(full, weights).fused == fuse_scores(changed, weights).fused == pytest.approx(expected)


def hand_made_raw():
    """Three layers; every criterion is given, only some vary."""
    raw = {name: [5.0, 5.0, 5.0] for name in CRITERIA}  # all equal: scaled ranks all 0.5
    raw["fisher"] = [1.0, 3.0, 2.0]
    raw["attention_entropy"] = [1.0, 3.0, 2.0]  # direction -1: the lowest entropy is the most important
    return raw


def test_scaled_ranks_direction_and_fusion():
    normalised, group_scores, fused, ranking = fuse_scores(hand_made_raw(), {"fisher": 3, "attention": 1})
    assert normalised["fisher"] == [0.0, 1.0, 0.5]
    assert normalised["attention_entropy"] == [1.0, 0.0, 0.5]
    assert normalised["norm_growth"] == [0.5, 0.5, 0.5]
    assert group_scores["attention"] == [0.75, 0.25, 0.5]  # mean of entropy's ranks and the constant 0.5
    assert fused == pytest.approx([0.1875, 0.8125, 0.5])
    assert ranking == [1, 2, 0]
    assert fuse_scores({"fisher": [7.0]}, {"fisher": 1}).normalised == {"fisher": [0.0]}  # one layer


def test_ties_share_the_average_rank_and_put_lower_index_first():
    _, _, fused, ranking = fuse_scores(hand_made_raw(), {"change": 1})
    assert fused == [0.5, 0.5, 0.5]
    assert ranking == [0, 1, 2]
    normalised, _, _, ranking = fuse_scores({"fisher": [2.0, 1.0, 2.0, 1.0]}, {"fisher": 1})
    assert normalised["fisher"] == pytest.approx([5 / 6, 1 / 6, 5 / 6, 1 / 6])
    assert ranking == [0, 2, 1, 3]


def test_one_outlier_does_not_dominate():
    # Layer 3's Fisher is 50x the next one's. Min-max scaling would squeeze layers 0-2 to ~0 on the Fisher
    # and rank [1, 3, 0, 2]; ranks keep the Fisher's order among them.
    raw = {"fisher": [0.0, 1.0, 2.0, 100.0]} | {name: [2.0, 3.0, 1.0, 0.0] for name in GROUPS["change"]}
    fusion = fuse_scores(raw, {"fisher": 1, "change": 1})
    assert fusion.normalised["fisher"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert fusion.fused == pytest.approx([1 / 3, 2 / 3, 1 / 2, 1 / 2])
    assert fusion.ranking == [1, 2, 3, 0]


def test_a_group_of_perfectly_correlated_criteria_counts_once():
    fisher, change = [0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 1.0, 0.0]
    raw = {name: [1.0] * 4 for name in CRITERIA} | {"fisher": fisher}
    # The change group's three criteria order the layers alike, in different units.
    raw |= {name: [10.0**scale * value for value in change] for scale, name in enumerate(GROUPS["change"])}
    fusion = fuse_scores(raw, {"fisher": 1, "change": 1})
    assert fusion.group_scores["change"] == pytest.approx([2 / 3, 1, 1 / 3, 0])
    # The group weighs as much as the Fisher alone: (ranks of fisher + ranks of change) / 2. Were its three
    # criteria counted one by one, it would weigh 3x and rank [1, 0, 2, 3].
    assert fusion.fused == pytest.approx([1 / 3, 2 / 3, 1 / 2, 1 / 2])
    assert fusion.ranking == [1, 2, 3, 0]
    duplicated = raw | {name: raw["norm_growth"] for name in GROUPS["change"]}
    assert fuse_scores(duplicated, {"fisher": 1, "change": 1}).fused == fusion.fused
    # With default weights the constant groups add 0.5 each, moving no layer.
    assert fuse_scores(raw).fused == pytest.approx([(2 * fused + 1.5) / 5 for fused in fusion.fused])


def test_rank_correlation():
    raw = {
        "fisher": [1.0, 2.0, 3.0, 4.0, 5.0],
        "norm_growth": [1.0, 8.0, 27.0, 64.0, 500.0],  # same order as fisher, not linearly related
        "attention_entropy": [1.0, 2.0, 3.0, 4.0, 5.0],  # direction -1: the opposite order
        "effective_rank": [6.0] * 5,  # constant: rho undefined
        "block_influence": [3.0, 1.0, 4.0, 1.0, 5.0],
    }
    correlation = rank_correlation(raw)
    names = list(raw)
    assert list(correlation) == names and all(list(row) == names for row in correlation.values())
    assert all(correlation[a][b] == correlation[b][a] for a in names for b in names)
    assert [correlation[name][name] for name in names] == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert correlation["fisher"]["norm_growth"] == pytest.approx(1.0)
    assert correlation["fisher"]["attention_entropy"] == pytest.approx(-1.0)
    assert all(correlation["effective_rank"][name] == 0.0 for name in names)
    assert correlation["fisher"]["block_influence"] == pytest.approx(
        spearmanr(raw["fisher"], raw["block_influence"]).statistic
    )
    json.dumps(correlation, allow_nan=False)


def test_fuse_scores_rejects_inconsistent_raw():
    with pytest.raises(LayerSelError, match=r"groups \['attention'\] have weight > 0 but raw scores lack "
                                            r"their criteria \{'attention': \['attention_entropy', 'atten"):
        fuse_scores({"fisher": [1.0, 2.0]}, {"fisher": 1, "attention": 1})
    with pytest.raises(LayerSelError, match="same number of layers"):
        fuse_scores({"fisher": [1.0, 2.0], "norm_growth": [1.0]}, {"fisher": 1})
    with pytest.raises(LayerSelError, match=r"unknown importance criteria \['depth'\]"):
        fuse_scores({"fisher": [1.0], "depth": [1.0]}, {"fisher": 1})
    with pytest.raises(LayerSelError, match=r"finite to be ranked, got \{'fisher': \[1\.0, nan\]\}"):
        fuse_scores({"fisher": [1.0, float("nan")]}, {"fisher": 1})


def hand_made_result(num_layers=10):
    raw = {
        name: [float(layer * (i + 3) % 7) for layer in range(num_layers)] for i, name in enumerate(CRITERIA)
    }
    distances = [[0.0] * num_layers for _ in range(num_layers)]
    return ImportanceResult.fused_from(raw, None, distances, [0.02] * num_layers)


def test_heatmap_shows_ranks_groups_fused_and_correlation(monkeypatch):
    figures = []
    monkeypatch.setattr(importance, "save_figure", lambda figure, path: figures.append(figure))
    result = hand_made_result()
    plot_importance_heatmap(result, "unused.png", num_marked=3)
    scores_axes, correlation_axes = figures[0].axes[:2]
    labels = [label.get_text() for label in scores_axes.get_yticklabels()]
    assert labels[:4] == ["fisher [fisher]", "norm_growth [change]", "block_influence [change]",
                          "angular_distance [change]"]
    assert labels[9:] == [f"{group} group (w=0.20)" for group in GROUPS] + ["fused"]
    rows = scores_axes.get_images()[0].get_array()
    np.testing.assert_allclose(rows[0], result.normalised["fisher"])
    np.testing.assert_allclose(rows[10], result.group_scores["change"])
    np.testing.assert_allclose(rows[-1], result.fused)
    assert scores_axes.collections[0].get_offsets()[:, 0].tolist() == result.ranking[:3]  # the stars
    matrix = correlation_axes.get_images()[0]
    assert matrix.get_clim() == (-1.0, 1.0) and matrix.get_cmap().name == "RdBu_r"
    by_group = [name for criteria in GROUPS.values() for name in criteria]
    assert [label.get_text() for label in correlation_axes.get_yticklabels()] == by_group
    expected = [[result.correlation[first][second] for second in by_group] for first in by_group]
    np.testing.assert_allclose(matrix.get_array(), expected)
    assert len(correlation_axes.texts) == len(CRITERIA) ** 2


def test_heatmap_writes_png_atomically(tmp_path, monkeypatch):
    path = tmp_path / "plots" / "importance.png"
    plot_importance_heatmap(hand_made_result(), path, title="tiny")
    written = path.read_bytes()
    assert written.startswith(b"\x89PNG\r\n\x1a\n") and len(written) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["importance.png"]

    def failing_savefig(self, target, **kwargs):
        target.write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="disk full"):
        plot_importance_heatmap(hand_made_result(), path)
    assert path.read_bytes() == written  # the old image is untouched
    assert [p.name for p in path.parent.iterdir()] == ["importance.png"]
