"""Tests for recbole_layersel.distill on a tiny random Llama (nothing is downloaded).

The teacher is a `CompactBackbone` over all 6 layers of a deep copy of the model; every compact student is
built from another deep copy, because building a backbone re-numbers the model's layers in place.

Two choices make held-out gains measurable rather than noise. The model is initialised with std 0.1: at the
default 0.02 the skipped layers barely change the states (compact vs full cosine ~0.9998). The inputs lie
on an 8-dimensional subspace of the 32-dimensional embedding space, as item embeddings share structure:
with isotropic random inputs, ~50 training tokens cannot pin down a 32 x 32 bridge and the held-out error
rises while the training loss falls.
"""

import copy

import pytest
import torch
from transformers import AutoModel

from recbole_layersel import distill
from recbole_layersel.backbone import CompactBackbone
from recbole_layersel.distill import DistillReport, Fidelity, distill_bridges, fidelity
from recbole_layersel.errors import LayerSelError
from recbole_layersel.model import add_lora
from tests.tiny_models import CONFIGS, HIDDEN, NUM_LAYERS

ROWS, STEPS_LEN, INPUT_RANK = 16, 6, 8
HELDOUT = slice(12, None)  # heldout_fraction=0.25 of 16 rows: the last 4


@pytest.fixture(scope="module")
def source():
    """(pristine model, inputs_embeds, right-padded attention_mask, teacher_last, teacher_per_layer)."""
    torch.manual_seed(0)
    config = CONFIGS["llama"]()
    config.initializer_range = 0.1
    model = AutoModel.from_config(config).eval()
    generator = torch.Generator().manual_seed(1)
    basis = torch.randn(INPUT_RANK, HIDDEN, generator=generator) / INPUT_RANK**0.5
    inputs_embeds = torch.randn(ROWS, STEPS_LEN, INPUT_RANK, generator=generator) @ basis
    lengths = torch.randint(2, STEPS_LEN + 1, (ROWS,), generator=generator)
    attention_mask = (torch.arange(STEPS_LEN) < lengths[:, None]).long()
    assert (attention_mask == 0).any()
    full = CompactBackbone(copy.deepcopy(model), list(range(NUM_LAYERS)))
    with torch.no_grad():
        teacher_last, teacher_per_layer = full(inputs_embeds, attention_mask, output_hidden_states=True)
    return model, inputs_embeds, attention_mask, teacher_last, torch.stack(teacher_per_layer)


def compact_of(source, layers):
    return CompactBackbone(copy.deepcopy(source[0]), layers)


def snapshot(module):
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def changed(before, module):
    return {name for name, tensor in module.state_dict().items() if not torch.equal(before[name], tensor)}


def test_fidelity_of_all_layers_is_exact(source):
    _, inputs_embeds, attention_mask, teacher_last, _ = source
    full = compact_of(source, list(range(NUM_LAYERS)))
    result = fidelity(full, inputs_embeds, attention_mask, teacher_last, batch_size=5)
    assert result.mse == pytest.approx(0.0, abs=1e-12)
    assert result.cosine == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("layers", "bridge_kinds"), [([0, 5], ["residual"]), ([0, 2, 5], ["linear", "linear"])]
)
def test_distillation_lowers_heldout_error_and_trains_only_bridges(source, layers, bridge_kinds):
    _, inputs_embeds, attention_mask, teacher_last, _ = source
    compact = compact_of(source, layers)
    assert [bridge.kind for bridge in compact.bridges] == bridge_kinds
    before_state = snapshot(compact)
    layer_weight = compact.layers[0].self_attn.q_proj.weight.detach().clone()

    report = distill_bridges(compact, inputs_embeds, attention_mask, teacher_last, steps=60, lr=1e-2)

    assert report.steps == 60 and len(report.losses) == 60 and report.heldout_rows == 4
    assert report.after.mse < 0.8 * report.before.mse
    assert report.after.cosine > report.before.cosine
    # The fidelities are the held-out rows' (rows 12..15), never trained on.
    assert report.after == fidelity(compact, inputs_embeds[HELDOUT], attention_mask[HELDOUT],
                                    teacher_last[HELDOUT])
    assert torch.equal(compact.layers[0].self_attn.q_proj.weight, layer_weight)
    assert changed(before_state, compact) == {name for name in before_state if name.startswith("bridges.")}
    assert report.to_json()["before"] == {"mse": report.before.mse, "cosine": report.before.cosine}
    assert report.to_json()["heldout_rows"] == 4


def test_before_is_measured_on_heldout_rows(source):
    _, inputs_embeds, attention_mask, teacher_last, _ = source
    expected = fidelity(compact_of(source, [0, 5]), inputs_embeds[HELDOUT], attention_mask[HELDOUT],
                        teacher_last[HELDOUT])
    report = distill_bridges(compact_of(source, [0, 5]), inputs_embeds, attention_mask, teacher_last, steps=1)
    assert report.before == expected


def test_too_few_rows_to_hold_out_uses_all_rows(source):
    _, inputs_embeds, attention_mask, teacher_last, _ = source
    one_row = inputs_embeds[:1], attention_mask[:1], teacher_last[:1]
    expected = fidelity(compact_of(source, [0, 5]), *one_row)
    report = distill_bridges(compact_of(source, [0, 5]), *one_row, steps=2)
    assert report.heldout_rows == 0 and report.before == expected


def test_huge_reg_lambda_keeps_bridges_at_identity(source):
    _, inputs_embeds, attention_mask, teacher_last, _ = source
    distances = {}
    for reg_lambda in (0.0, 1e4):
        compact = compact_of(source, [0, 2, 5])
        distill_bridges(compact, inputs_embeds, attention_mask, teacher_last, reg_lambda=reg_lambda, steps=30,
                        lr=1e-2)
        distances[reg_lambda] = sum(bridge.regularizer().item() for bridge in compact.bridges)
    assert distances[1e4] < 1e-3
    assert distances[1e4] < 0.01 * distances[0.0]


def test_layer_wise_terms_add_weighted_layer_errors(source):
    _, inputs_embeds, attention_mask, teacher_last, teacher_per_layer = source
    compact = compact_of(source, [0, 2, 5])
    train = slice(0, 12)
    with torch.no_grad():
        last, per_layer = compact(inputs_embeds[train], attention_mask[train], output_hidden_states=True)
    valid = attention_mask[train].bool()

    def mse(student, teacher):
        return (student[valid] - teacher[valid]).pow(2).mean().item()

    # Only layer 2 weighs (5.0 normalises to 1); kept layer 1 is original layer 2. One batch = all 12 rows.
    expected = mse(last, teacher_last[train]) + mse(per_layer[1], teacher_per_layer[2][train])
    report = distill_bridges(compact, inputs_embeds, attention_mask, teacher_last,
                             teacher_per_layer=teacher_per_layer, layer_weights={2: 5.0}, reg_lambda=0.0,
                             steps=1, batch_size=12)
    assert report.losses[0] == pytest.approx(expected, rel=1e-5)


def test_layer_wise_distillation_lowers_heldout_error(source):
    _, inputs_embeds, attention_mask, teacher_last, teacher_per_layer = source
    report = distill_bridges(compact_of(source, [0, 2, 5]), inputs_embeds, attention_mask, teacher_last,
                             teacher_per_layer=tuple(teacher_per_layer),  # the tuple a backbone returns
                             layer_weights={0: 0.2, 2: 0.3, 5: 0.5}, steps=60, lr=1e-2)
    assert report.after.mse < report.before.mse
    assert report.after.cosine > report.before.cosine


def test_layer_weights_on_layers_not_kept_error(source):
    _, inputs_embeds, attention_mask, teacher_last, teacher_per_layer = source
    with pytest.raises(LayerSelError, match=r"keys \[1, 3\] that are not kept layers"):
        distill_bridges(compact_of(source, [0, 2, 5]), inputs_embeds, attention_mask, teacher_last,
                        teacher_per_layer=teacher_per_layer, layer_weights={0: 1.0, 1: 1.0, 3: 1.0})


def test_identity_bridges_only_skip_training(source):
    _, inputs_embeds, attention_mask, teacher_last, _ = source
    compact = compact_of(source, [2, 3])
    before_state = snapshot(compact)
    report = distill_bridges(compact, inputs_embeds, attention_mask, teacher_last, steps=60)
    assert report.steps == 0 and report.losses == [] and report.before == report.after
    assert isinstance(report, DistillReport) and isinstance(report.after, Fidelity)
    assert changed(before_state, compact) == set()


def test_train_lora_needs_lora(source):
    _, inputs_embeds, attention_mask, teacher_last, _ = source
    with pytest.raises(LayerSelError, match="add_lora"):
        distill_bridges(compact_of(source, [0, 5]), inputs_embeds, attention_mask, teacher_last,
                        train_lora=True)


def test_train_lora_trains_adapters_not_base_weights(source):
    _, inputs_embeds, attention_mask, teacher_last, _ = source
    compact = compact_of(source, [0, 2, 5])
    add_lora(compact, r=4, alpha=8, dropout=0.0)
    before_state = snapshot(compact)
    distill_bridges(compact, inputs_embeds, attention_mask, teacher_last, train_lora=True, steps=5, lr=1e-2)
    updated = changed(before_state, compact)
    assert {name for name in updated if "lora_" in name}  # B starts at 0; its gradient moves it first
    assert {name for name in updated if name.startswith("bridges.")} == {"bridges.0.proj.weight",
                                                                          "bridges.1.proj.weight"}
    assert all(name.startswith("bridges.") or "lora_" in name for name in updated)
    assert "layers.0.self_attn.q_proj.base_layer.weight" in before_state


def flags_and_modes(module):
    return ({name: parameter.requires_grad for name, parameter in module.named_parameters()},
            {name: submodule.training for name, submodule in module.named_modules()})


def mixed_flags_and_modes(source):
    """A compact backbone in train mode but for one layer, with some parameters frozen."""
    compact = compact_of(source, [0, 2, 5]).train()
    compact.layers[1].eval()
    compact.layers[0].requires_grad_(False)
    compact.bridges[1].requires_grad_(False)
    return compact


def test_requires_grad_and_modes_are_restored(source):
    _, inputs_embeds, attention_mask, teacher_last, _ = source
    compact = mixed_flags_and_modes(source)
    found = flags_and_modes(compact)

    distill_bridges(compact, inputs_embeds, attention_mask, teacher_last, steps=2)
    fidelity(compact, inputs_embeds, attention_mask, teacher_last)

    assert flags_and_modes(compact) == found


def test_requires_grad_and_modes_are_restored_when_training_fails(source, monkeypatch):
    _, inputs_embeds, attention_mask, teacher_last, _ = source
    compact = mixed_flags_and_modes(source)
    found = flags_and_modes(compact)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(distill, "_distill_loss", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        distill_bridges(compact, inputs_embeds, attention_mask, teacher_last, steps=2)

    assert flags_and_modes(compact) == found


@pytest.mark.parametrize(("change", "message"), [
    (dict(steps=-1), "steps=-1"),
    (dict(reg_lambda=-0.5), "reg_lambda=-0.5"),
    (dict(heldout_fraction=1.0), "heldout_fraction=1.0"),
    (dict(teacher_last=lambda teacher: teacher[:, :-1]), r"teacher_last has shape \(16, 5, 32\)"),
    (dict(inputs_embeds=lambda inputs: inputs[:0]), r"no sequences \(N = 0\)"),
    (dict(attention_mask=lambda mask: mask[:-1]), r"attention_mask has shape \(15, 6\)"),
    (dict(teacher_per_layer=lambda per_layer: per_layer[1:]), "holds 5 layers but the source model has 6"),
    (dict(layer_weights={0: 1.0}), "without teacher_per_layer"),
])
def test_bad_input_errors(source, change, message):
    _, inputs_embeds, attention_mask, teacher_last, teacher_per_layer = source
    arguments = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, teacher_last=teacher_last)
    for name, value in change.items():
        if name in arguments:
            arguments[name] = value(arguments[name])
        elif name == "teacher_per_layer":
            arguments[name] = value(teacher_per_layer)
        else:
            arguments[name] = value
    with pytest.raises(LayerSelError, match=message):
        distill_bridges(compact_of(source, [0, 5]), **arguments)
