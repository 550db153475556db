"""Per-layer importance of a full LLM on the recommendation task, fused into one ranking of its layers.

`compute_importance` measures each layer of the full model (a `CompactBackbone` holding every layer) on a
sample of user histories by nine criteria. Each has a direction: +1 if a higher raw value means a more
important layer, -1 if a lower one does.

- ``fisher`` (+1): diagonal empirical Fisher information. For every sample row on its own, the squared
  gradient of that row's recommendation loss with respect to every weight and bias of the layer's linear
  maps (all its parameters but the norms' scales), summed over them; the mean over rows, divided by their
  number (so wide and narrow layers compare). The loss is sensitive to layers with a large Fisher.
- ``attention_entropy`` (-1): mean entropy (nats) of the attention distribution of a query over the keys,
  over heads and valid (non-padding) queries. Focused, low-entropy attention does specific work; a
  near-uniform one mostly averages.
- ``attention_topk_mass`` (+1): mean probability mass on the ``attention_top_k`` most attended keys of a
  query (same averaging): concentrated attention again.
- ``norm_growth`` (+1): mean over valid tokens of ||h_out|| / ||h_in||: how much the layer adds to the
  residual stream.
- ``activation_variance`` (+1): mean over valid tokens of the variance of h_out across hidden features.
- ``activation_kurtosis`` (+1): excess kurtosis of all h_out values at valid tokens; the outlier
  ("massive") features that LLMs develop mark layers the model relies on.
- ``effective_rank`` (+1): exp of the entropy of the normalised singular values of the centred
  (valid tokens x hidden) h_out matrix (Roy & Vetterli): how many directions the layer's output uses.
- ``block_influence`` (+1): ShortGPT's score, mean over valid tokens of 1 - cos(h_in, h_out). A layer
  that barely changes its input's direction is redundant.
- ``angular_distance`` (+1): mean over valid tokens of arccos(cos(h_in, h_out)) / pi (Gromov et al.), the
  same idea on an angular scale in [0, 1].

h_in is a layer's input, h_out its output (before the final norm). Only valid (non-padding) positions
enter any statistic.

Fusion works on ranks, not values, so one outlying layer cannot squeeze every other layer's scores
together. Each criterion is multiplied by its direction and replaced by its rank over layers scaled to
[0, 1] (lowest 0, highest 1, ties share their average rank). Criteria that measure the same thing move
together across layers, so they are grouped (`GROUPS`) and each group counts once: a group's score is the
mean of its criteria's scaled ranks, the fused score the weighted sum of the group scores (group weights
summing to 1), and layers are ranked by the fused score. The result also holds Spearman's rank
correlation between the criteria over layers (how far they agree), the angular distance between the
input of layer l and the output of every later layer m (for dropping the best contiguous block, as in
Gromov et al.) and each layer's mean absolute weight (a data-free "magnitude" baseline).

References:
    Xin Men et al. "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect." 2024.
    Andrey Gromov et al. "The Unreasonable Ineffectiveness of the Deeper Layers." ICLR 2025.
    Olivier Roy and Martin Vetterli. "The effective rank: a measure of effective dimensionality." 2007.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import rankdata
from transformers.pytorch_utils import Conv1D

from recbole_layersel.backbone import CompactBackbone, evaluating
from recbole_layersel.distributed import all_reduce_sum, my_batches
from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import save_figure

CRITERIA: dict[str, int] = {
    "fisher": +1,
    "attention_entropy": -1,
    "attention_topk_mass": +1,
    "norm_growth": +1,
    "activation_variance": +1,
    "activation_kurtosis": +1,
    "effective_rank": +1,
    "block_influence": +1,
    "angular_distance": +1,
}

# What each group measures; every criterion is in exactly one group.
GROUPS: dict[str, tuple[str, ...]] = {
    # The only signal from the task's gradient.
    "fisher": ("fisher",),
    # How much the layer changes the residual stream.
    "change": ("norm_growth", "block_influence", "angular_distance"),
    # The size of the layer's outputs: their spread and their outlier features.
    "activations": ("activation_variance", "activation_kurtosis"),
    # How many directions the layer's outputs use; a group of its own, as it orders SmolLM2's layers
    # against the two above (rank correlation -0.83 and -1.00 on ml-100k), and their mean would cancel.
    "output_rank": ("effective_rank",),
    # How focused the layer's attention is.
    "attention": ("attention_entropy", "attention_topk_mass"),
}

_GROUPS_HELP = "; ".join(f"{group} = {' + '.join(criteria)}" for group, criteria in GROUPS.items())

# Keeps ratios finite for an all-zero input vector; far below any real activation norm.
_TINY_NORM = 1e-12
# loss_fn(states, rows) -> scalar loss (see `compute_importance`)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_TOKEN_CRITERIA = ("norm_growth", "activation_variance", "block_influence")
_ATTENTION_CRITERIA = ("attention_entropy", "attention_topk_mass")


@dataclass
class ImportanceResult:
    """Per-layer scores; every per-layer list is indexed by the layer's original index."""

    raw: dict[str, list[float]]  # criterion -> value per layer, in the criterion's own units
    normalised: dict[str, list[float]]  # direction applied, then ranks over layers scaled to [0, 1]
    groups: dict[str, list[str]]  # group -> its criteria (GROUPS)
    group_weights: dict[str, float]  # fusion weight per group, summing to 1
    group_scores: dict[str, list[float]]  # group -> mean of its criteria's scaled ranks, per layer
    fused: list[float]  # weighted sum of the group scores, in [0, 1]
    ranking: list[int]  # layer indices, most important first; the lower index first among equals
    correlation: dict[str, dict[str, float]]  # criterion -> criterion -> Spearman's rho over layers
    # D[l][m], m >= l: mean angular distance (in [0, 1]) between the input of layer l and the output of
    # layer m; 0.0 below the diagonal. D[l][l] is raw["angular_distance"][l].
    angular_distance_matrix: list[list[float]]
    weight_magnitude: list[float]  # mean |w| over all parameters of the layer: a data-free baseline

    def to_json(self) -> dict:
        """All fields as plain dicts, lists, floats and ints (ready for json.dump)."""
        return asdict(self)

    @classmethod
    def fused_from(cls, raw: dict[str, list[float]], group_weights: Mapping[str, float] | None,
                   angular_distance_matrix: list[list[float]],
                   weight_magnitude: list[float]) -> ImportanceResult:
        """The result of fusing ``raw`` with ``group_weights`` (``fuse_scores``), correlations included."""
        group_weights = validate_group_weights(group_weights)
        fusion = fuse_scores(raw, group_weights)
        return cls(raw=raw, normalised=fusion.normalised,
                   groups={group: list(criteria) for group, criteria in GROUPS.items()},
                   group_weights=group_weights, group_scores=fusion.group_scores, fused=fusion.fused,
                   ranking=fusion.ranking, correlation=rank_correlation(raw),
                   angular_distance_matrix=angular_distance_matrix, weight_magnitude=weight_magnitude)


class Fusion(NamedTuple):
    """What `fuse_scores` derives from raw scores (fields as in ImportanceResult)."""

    normalised: dict[str, list[float]]
    group_scores: dict[str, list[float]]
    fused: list[float]
    ranking: list[int]


def validate_group_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """Fusion weights over all of GROUPS, normalised to sum 1.

    None gives every group the same weight; groups not named get weight 0.
    """
    if weights is None:
        return dict.fromkeys(GROUPS, 1.0 / len(GROUPS))
    if not isinstance(weights, Mapping):
        raise LayerSelError(
            f"importance group weights must be a mapping group -> weight, got {weights!r}; "
            f"e.g. {{'fisher': 1.0, 'change': 1.0}} with groups from {_GROUPS_HELP}."
        )
    unknown = [name for name in weights if name not in GROUPS]
    if unknown:
        raise LayerSelError(
            f"unknown importance groups {unknown}; group weights may only name {', '.join(GROUPS)} "
            f"(weight groups of criteria, not single criteria: {_GROUPS_HELP})."
        )
    invalid = {
        name: weight
        for name, weight in weights.items()
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight) or weight < 0
    }
    if invalid:
        raise LayerSelError(
            f"importance group weights must be finite numbers >= 0, got {invalid}; use 0 to leave a group "
            f"out (groups: {', '.join(GROUPS)})."
        )
    total = sum(weights.values())
    if not total > 0:
        raise LayerSelError(
            f"importance group weights {dict(weights)} sum to {total}; give at least one of the groups "
            f"{', '.join(GROUPS)} a weight > 0."
        )
    return {name: float(weights.get(name, 0.0)) / total for name in GROUPS}


def fuse_scores(
    raw: Mapping[str, list[float]], group_weights: Mapping[str, float] | None = None
) -> Fusion:
    """(normalised, group_scores, fused, ranking) from per-layer raw criterion values.

    normalised[c]: the values times CRITERIA[c], ranked over layers (ties share their average rank) and
    scaled to [0, 1] by (rank - 1) / (L - 1): lowest 0, highest 1, all equal 0.5 (so a constant criterion
    moves no layer), a single layer 0. group_scores[g]: the mean of its criteria's scaled ranks, for every
    group whose criteria are all in `raw`. fused[l]: sum over groups of weight * group score. ranking:
    layer indices by descending fused score, the lower index first among equals. `raw` may lack the
    criteria of groups with weight 0.
    """
    weights = validate_group_weights(group_weights)
    _check_raw(raw, weights)
    normalised = {name: _scaled_ranks([CRITERIA[name] * value for value in values])
                  for name, values in raw.items()}
    group_scores = {
        group: np.mean([normalised[name] for name in criteria], axis=0).tolist()
        for group, criteria in GROUPS.items()
        if all(name in normalised for name in criteria)
    }
    num_layers = len(next(iter(raw.values())))
    fused = [
        sum(weight * group_scores[group][layer] for group, weight in weights.items() if weight > 0)
        for layer in range(num_layers)
    ]
    ranking = sorted(range(num_layers), key=lambda layer: (-fused[layer], layer))
    return Fusion(normalised, group_scores, fused, ranking)


def _check_raw(raw: Mapping[str, list[float]], weights: Mapping[str, float]) -> None:
    unknown = [name for name in raw if name not in CRITERIA]
    if unknown:
        raise LayerSelError(
            f"unknown importance criteria {unknown} in raw scores; expected {', '.join(CRITERIA)}."
        )
    missing = {group: [name for name in GROUPS[group] if name not in raw]
               for group, weight in weights.items() if weight > 0}
    missing = {group: names for group, names in missing.items() if names}
    if missing:
        raise LayerSelError(
            f"groups {list(missing)} have weight > 0 but raw scores lack their criteria {missing}; add "
            "those scores or give the groups weight 0."
        )
    layer_counts = {name: len(values) for name, values in raw.items()}
    if len(set(layer_counts.values())) != 1 or 0 in layer_counts.values():
        raise LayerSelError(
            f"raw scores must hold one value per layer, the same number of layers (>= 1) for every "
            f"criterion; got these lengths: {layer_counts}."
        )
    not_finite = {name: values for name, values in raw.items() if not all(map(math.isfinite, values))}
    if not_finite:
        raise LayerSelError(
            f"raw scores must be finite to be ranked, got {not_finite}; a NaN or infinite score means the "
            "pass that measured it diverged (check the loss and the model's dtype)."
        )


def _scaled_ranks(values: list[float]) -> list[float]:
    if len(values) == 1:
        return [0.0]
    return ((rankdata(values, method="average") - 1) / (len(values) - 1)).tolist()


def rank_correlation(raw: Mapping[str, list[float]]) -> dict[str, dict[str, float]]:
    """Spearman's rho over layers between every two criteria in `raw`, direction applied (+1: they agree
    on which layers matter). Where a criterion is constant over layers rho is undefined (NaN, which JSON
    cannot hold); its row and column, diagonal included, are 0.0 instead.
    """
    names = list(raw)
    ranks = np.array([_scaled_ranks([CRITERIA[name] * value for value in raw[name]]) for name in names])
    centred = ranks - ranks.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    varies = norms > 0
    units = np.divide(centred, norms[:, None], out=np.zeros_like(centred), where=varies[:, None])
    rho = np.clip(units @ units.T, -1.0, 1.0)
    np.fill_diagonal(rho, varies.astype(float))  # exactly 1, not 1 less a rounding error
    return {first: {second: float(rho[i, j]) for j, second in enumerate(names)}
            for i, first in enumerate(names)}


def compute_importance(
    backbone: CompactBackbone,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    make_loss: Callable[[torch.Tensor], LossFn],
    *,
    group_weights: Mapping[str, float] | None = None,
    attention_top_k: int = 4,
    batch_size: int = 16,
) -> tuple[ImportanceResult, dict[str, torch.Tensor]]:
    """Score every layer of the full model on a sample of N sequences; also return the teacher states.

    backbone: a CompactBackbone holding ALL layers of its source model (then it is the full model).
    inputs_embeds (N, T, H) and attention_mask (N, T) of 1/0, right-padded (each row's valid positions
    first). make_loss(final_states) -> loss_fn is called once, with the full model's final states
    (N, T, H) of the sample (e.g. to warm a recommendation head up on them); loss_fn(states, rows) ->
    scalar loss, where states (B, T, H) are the backbone's final states (after the final norm) of the
    batch and rows is a LongTensor, on the device of inputs_embeds, of its row indices into the N rows (to
    look up histories and targets); it is called with one row at a time (B = 1).
    group_weights: see `validate_group_weights`.

    Two passes of mini-batches of `batch_size`, both shared out over the processes of a process group if
    there is one (``distributed.py``: every sum and the teacher are all-reduced, so every process gets the
    single-process result), with the backbone in eval mode (dropout would make every statistic random):
    the statistics pass without gradients and with eager attention (for the probabilities), then the
    Fisher pass with gradients (`_per_example_fisher`). The attention implementation and train/eval modes
    are restored afterwards, also on error. No parameter gets a gradient (not even those the loss_fn
    closure uses): gradients are taken for the layers' linear maps' outputs only.

    Returns (result, teacher) with teacher = {"last": (N, T, H) final states after the final norm,
    "per_layer": (L, N, T, H) each layer's output before the final norm}, detached, CPU float32.
    """
    weights = validate_group_weights(group_weights)  # fail on bad weights before the expensive passes
    _check_positive_int("attention_top_k", attention_top_k)
    _check_positive_int("batch_size", batch_size)
    _check_inputs(backbone, inputs_embeds, attention_mask)

    with evaluating(backbone):
        criteria, distances, teacher = _statistics_pass(
            backbone, inputs_embeds, attention_mask, attention_top_k, batch_size
        )
        loss_fn = make_loss(teacher["last"])
        fisher = _per_example_fisher(backbone, inputs_embeds, attention_mask, loss_fn, batch_size)
    return _assemble({"fisher": fisher, **criteria}, distances, backbone, weights), teacher


def _per_example_fisher(backbone, inputs_embeds, attention_mask, loss_fn, batch_size) -> torch.Tensor:
    """(L,) diagonal empirical Fisher per layer: the mean over rows of the squared gradient of that one
    row's loss with respect to the layer's linear maps (weights and biases: all of a transformer layer's
    parameters but its norms' scales, 99.97 % of a SmolLM2 layer), summed over them, divided by their
    number.

    The squared gradient of a mini-batch's loss would not do: the rows' gradients partly cancel before
    squaring, so it measures the mean gradient, and shrinks as the batch grows. Rows do not interact in
    a forward pass (eval mode; attention stays within a row), so a mini-batch runs at once and the gradient
    of its summed per-row losses with respect to a linear map's output y = x W^T + b is, at row b, row b's
    own g_b; row b's weight gradient g_b^T x_b then has the squared norm sum over positions t, s of
    (x_b x_b^T)_ts (g_b g_b^T)_ts, computed without forming it (Goodfellow 2015, "Efficient per-example
    gradient computations"), and its bias gradient the sum of g_b over positions. No parameter gradient is
    computed at all. Rows are shared out over processes and the sums all-reduced.
    """
    maps = [[module for module in layer.modules() if isinstance(module, _LINEAR_MAPS)]
            for layer in backbone.layers]
    device, dtype = next(backbone.layers.parameters()).device, backbone.dtype
    num_rows = inputs_embeds.shape[0]
    squared_sums = torch.zeros(len(maps), dtype=torch.float64)
    with _recording_linear_maps(maps) as calls, torch.enable_grad():
        for start, stop in my_batches(num_rows, batch_size):
            inputs = inputs_embeds[start:stop].detach().to(device=device, dtype=dtype).requires_grad_(True)
            states = backbone(inputs, attention_mask[start:stop].to(device))
            rows = torch.arange(start, stop, device=inputs_embeds.device)
            loss = sum(_checked(loss_fn(states[i:i + 1], rows[i:i + 1])) for i in range(stop - start))
            recorded = [(index, module, x, output) for index, layer_calls in enumerate(calls)
                        for module, (x, output) in layer_calls.items()]
            grads = torch.autograd.grad(loss, [output for *_, output in recorded], allow_unused=True)
            for (index, module, x, _), grad in zip(recorded, grads, strict=True):
                if grad is not None:  # None: the loss does not depend on this map
                    squared_sums[index] += _squared_gradient_norms(module, x, grad).sum().double().cpu()
            for layer_calls in calls:
                layer_calls.clear()
    sizes = torch.tensor([sum(_parameter_count(module) for module in layer) for layer in maps])
    return all_reduce_sum(squared_sums) / num_rows / sizes


# What a linear map is: torch's, and GPT-2's Conv1D (y = x W + b, W stored transposed).
_LINEAR_MAPS = (torch.nn.Linear, Conv1D)


@contextmanager
def _recording_linear_maps(maps: list[list[torch.nn.Module]]) -> Iterator[list[dict]]:
    """calls[l]: linear map -> (its input, detached; its output, still in the graph) for each of layer
    l's maps called in the forward passes since calls[l] was last cleared; the hooks are removed
    afterwards, also on error."""
    calls: list[dict] = [{} for _ in maps]

    def recorder(layer: int):
        def record(module, args, output):
            if module in calls[layer]:
                raise LayerSelError(
                    f"{type(module).__name__} in layer {layer} ran twice in one forward pass; the per-row "
                    "Fisher needs each linear map of a layer to run once (no shared weights)."
                )
            calls[layer][module] = (args[0].detach(), output)
        return record

    hooks = [module.register_forward_hook(recorder(layer))
             for layer, modules in enumerate(maps) for module in modules]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def _squared_gradient_norms(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(B,) squared norm of each row's gradient of a linear map's weight and bias, from its input x
    (B, ..., d_in) and the gradient at its output (B, ..., d_out)."""
    x, grad = x.float().flatten(1, -2), grad.float().flatten(1, -2)
    squared = ((x @ x.transpose(1, 2)) * (grad @ grad.transpose(1, 2))).sum((1, 2))
    return squared + grad.sum(1).pow(2).sum(1) if module.bias is not None else squared


def _parameter_count(module: torch.nn.Module) -> int:
    """A linear map's number of weights and biases (from its shape: a quantised weight stores fewer)."""
    if isinstance(module, torch.nn.Linear):
        weights = module.in_features * module.out_features
    else:
        weights = module.weight.numel()
    return weights + (module.bias.numel() if module.bias is not None else 0)


def _checked(loss) -> torch.Tensor:
    if not (isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.requires_grad):
        raise LayerSelError(
            f"loss_fn must return a scalar tensor that depends on the states, got {loss!r}; "
            "return e.g. a cross-entropy over the items for these rows."
        )
    return loss


def _statistics_pass(backbone, inputs_embeds, attention_mask, attention_top_k, batch_size):
    """(criteria, distances, teacher): every criterion but the Fisher as an (L,) tensor, the (L, L)
    angular distance matrix and the teacher states, from one batched pass without gradients."""
    sums, teacher = _batched_sums(backbone, inputs_embeds, attention_mask, attention_top_k, batch_size)
    criteria = {name: sums[name] / sums["tokens"] for name in _TOKEN_CRITERIA}
    criteria |= {name: sums[name] / sums["attention_rows"] for name in _ATTENTION_CRITERIA}
    distances = sums["angular_distance_matrix"] / sums["tokens"]
    criteria["angular_distance"] = distances.diagonal()
    device = next(backbone.layers.parameters()).device
    valid = attention_mask.bool().cpu()
    output_statistics = [_output_statistics(outputs[valid].to(device)) for outputs in teacher["per_layer"]]
    criteria["activation_kurtosis"] = torch.tensor([kurtosis for kurtosis, _ in output_statistics])
    criteria["effective_rank"] = torch.tensor([rank for _, rank in output_statistics])
    return criteria, distances, teacher


def _batched_sums(backbone, inputs_embeds, attention_mask, attention_top_k, batch_size):
    """Per-layer sums over valid tokens (for attention: over valid queries x heads) with their counts,
    and the teacher states, from mini-batches run with eager attention and no gradients; all summed over
    processes."""
    num_layers = len(backbone.layers)
    num_rows, seq_len, hidden_size = inputs_embeds.shape
    device, dtype = next(backbone.layers.parameters()).device, backbone.dtype
    names = (*_TOKEN_CRITERIA, *_ATTENTION_CRITERIA, "attention_rows")
    sums = {name: torch.zeros(num_layers, dtype=torch.float64) for name in names}
    sums["angular_distance_matrix"] = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    sums["tokens"] = torch.zeros((), dtype=torch.float64)
    teacher = {
        "last": torch.zeros(num_rows, seq_len, hidden_size),
        "per_layer": torch.zeros(num_layers, num_rows, seq_len, hidden_size),
    }
    with _recording_layer_inputs(backbone) as layer_inputs, torch.no_grad(), backbone.eager_attention():
        for start, stop in my_batches(num_rows, batch_size):
            batch_mask = attention_mask[start:stop].to(device)
            last, per_layer, attentions = backbone(
                inputs_embeds[start:stop].to(device=device, dtype=dtype), batch_mask,
                output_hidden_states=True, output_attentions=True,
            )
            valid = batch_mask.bool()
            inputs_valid = torch.stack([hidden[valid] for hidden in layer_inputs]).float()
            outputs_valid = torch.stack([hidden[valid] for hidden in per_layer]).float()
            batch_sums = {
                **_token_sums(inputs_valid, outputs_valid),
                **_attention_sums(attentions, valid, attention_top_k),
                "angular_distance_matrix": _distance_sums(inputs_valid, outputs_valid),
                "tokens": inputs_valid.shape[1],
            }
            for name, values in batch_sums.items():
                sums[name] += values
            teacher["last"][start:stop] = last.float().cpu()
            teacher["per_layer"][:, start:stop] = torch.stack(per_layer).float().cpu()
    # Each process filled its own rows of the teacher (zeros elsewhere): the sum is every row.
    for tensor in (*sums.values(), *teacher.values()):
        tensor.copy_(all_reduce_sum(tensor))
    return sums, teacher


@contextmanager
def _recording_layer_inputs(backbone: CompactBackbone) -> Iterator[list[torch.Tensor | None]]:
    """A list whose entry l is the input of layer l in the latest forward pass; the hooks that fill it are
    removed afterwards, also on error."""
    layer_inputs: list[torch.Tensor | None] = [None] * len(backbone.layers)

    def recorder(index: int):
        def record_input(_module, args):
            layer_inputs[index] = args[0]

        return record_input

    hooks = [layer.register_forward_pre_hook(recorder(i)) for i, layer in enumerate(backbone.layers)]
    try:
        yield layer_inputs
    finally:
        for hook in hooks:
            hook.remove()


def _assemble(raw_tensors, distances, backbone, group_weights) -> ImportanceResult:
    """The result from the per-layer criteria (tensors), the distance matrix and the layers' parameters."""
    raw = {name: raw_tensors[name].tolist() for name in CRITERIA}
    layer_params = [list(layer.parameters()) for layer in backbone.layers]
    with torch.no_grad():
        weight_magnitude = [
            sum(param.abs().sum(dtype=torch.float64).item() for param in layer)
            / sum(param.numel() for param in layer)
            for layer in layer_params
        ]
    return ImportanceResult.fused_from(raw, group_weights, distances.tolist(), weight_magnitude)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise LayerSelError(f"{name} must be a positive integer, got {value!r}; e.g. {name}=4.")


def _check_inputs(backbone, inputs_embeds, attention_mask) -> None:
    """Validate the backbone and the sample."""
    if not isinstance(backbone, CompactBackbone):
        raise LayerSelError(
            f"backbone must be a CompactBackbone, got {type(backbone).__name__}; "
            "build CompactBackbone(model, list(range(num_layers)))."
        )
    all_layers = list(range(backbone.num_source_layers))
    if backbone.selected_layers != all_layers:
        raise LayerSelError(
            f"importance is measured on the full model, but the backbone keeps only layers "
            f"{backbone.selected_layers} of {backbone.num_source_layers}; build "
            f"CompactBackbone(model, list(range({backbone.num_source_layers}))) from the source model."
        )
    hidden_size = backbone.config.hidden_size
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] == 0 or inputs_embeds.shape[2] != hidden_size:
        raise LayerSelError(
            f"inputs_embeds must have shape (N >= 1, T, {hidden_size}), got {tuple(inputs_embeds.shape)}; "
            "pass the input embeddings of N sequences of T positions."
        )
    if tuple(attention_mask.shape) != tuple(inputs_embeds.shape[:2]):
        raise LayerSelError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but inputs_embeds has "
            f"{tuple(inputs_embeds.shape)}; pass one 1/0 entry per sequence position, shape (N, T)."
        )
    if ((attention_mask != 0) & (attention_mask != 1)).any():
        raise LayerSelError(
            f"attention_mask must hold only 0 and 1, got values {attention_mask.unique().tolist()}; "
            "use 1 for real positions and 0 for padding."
        )
    mask = attention_mask.bool().cpu()
    lengths = mask.sum(1)
    right_padded = torch.arange(mask.shape[1]) < lengths[:, None]
    bad_rows = ((mask != right_padded).any(1) | (lengths == 0)).nonzero().flatten().tolist()
    if bad_rows:
        raise LayerSelError(
            f"attention_mask rows {bad_rows[:10]} are empty or not right-padded; every row needs at least "
            "one valid position and its valid positions first (1 ... 1 0 ... 0)."
        )


def _token_sums(inputs_valid: torch.Tensor, outputs_valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer sums over valid tokens of the token-wise criteria; inputs/outputs are (L, tokens, H)."""
    input_norms = inputs_valid.norm(dim=-1)
    output_norms = outputs_valid.norm(dim=-1)
    unit_inputs = F.normalize(inputs_valid, dim=-1, eps=_TINY_NORM)
    unit_outputs = F.normalize(outputs_valid, dim=-1, eps=_TINY_NORM)
    per_token = {
        "norm_growth": output_norms / input_norms.clamp_min(_TINY_NORM),
        "activation_variance": outputs_valid.var(dim=-1, correction=0),
        # 1 - cos(a, b) = |a/|a| - b/|b||^2 / 2, which is exactly 0 for an unchanged vector.
        "block_influence": (unit_inputs - unit_outputs).pow(2).sum(-1) / 2,
    }
    return {name: values.sum(-1).double().cpu() for name, values in per_token.items()}


def _distance_sums(inputs_valid: torch.Tensor, outputs_valid: torch.Tensor) -> torch.Tensor:
    """(L, L) sums over valid tokens of the angular distance between the input of layer l and the output
    of layer m >= l; zeros below the diagonal."""
    num_layers = inputs_valid.shape[0]
    unit_inputs = F.normalize(inputs_valid, dim=-1, eps=_TINY_NORM)
    unit_outputs = F.normalize(outputs_valid, dim=-1, eps=_TINY_NORM)
    sums = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    for first in range(num_layers):
        later_outputs, unit_input = unit_outputs[first:], unit_inputs[first]
        # The angle between unit vectors u, v is 2 atan2(|u - v|, |u + v|); arccos(u . v) would lose all
        # precision near 0, where the redundant layers are.
        difference_norms = (later_outputs - unit_input).norm(dim=-1)
        angles = 2 * torch.atan2(difference_norms, (later_outputs + unit_input).norm(dim=-1))
        sums[first, first:] = (angles / math.pi).sum(-1).double().cpu()
    return sums


def _output_statistics(outputs: torch.Tensor) -> tuple[float, float]:
    """(excess kurtosis, effective rank) of one layer's outputs at all valid tokens, (tokens, H)."""
    values = outputs.double()
    centred_values = values.flatten() - values.mean()
    variance = centred_values.pow(2).mean()
    # A constant output has no tails to measure.
    kurtosis = (centred_values.pow(4).mean() / variance**2 - 3).item() if variance > 0 else 0.0

    centred = values - values.mean(0)
    # Squared singular values are the eigenvalues of the smaller Gram matrix, far cheaper than an SVD of
    # the tall (tokens x H) matrix.
    gram = centred.T @ centred if centred.shape[0] >= centred.shape[1] else centred @ centred.T
    singular_values = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    if singular_values.sum() == 0:
        return kurtosis, 0.0  # every token has the same output: rank 0
    spectrum = singular_values / singular_values.sum()
    return kurtosis, math.exp(torch.special.entr(spectrum).sum().item())


def _attention_sums(attentions, valid: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """Per-layer sums over valid queries and heads of the attention criteria, and how many there are;
    attentions[l] is layer l's (B, heads, T, T) probabilities, valid the (B, T) mask."""
    sums = {name: torch.zeros(len(attentions), dtype=torch.float64)
            for name in (*_ATTENTION_CRITERIA, "attention_rows")}
    for index, probs in enumerate(attentions):
        query_rows = probs.float().transpose(1, 2)[valid]  # (valid queries, heads, keys)
        top_mass = query_rows.topk(min(top_k, query_rows.shape[-1]), dim=-1).values.sum()
        sums["attention_entropy"][index] = torch.special.entr(query_rows).sum().item()
        sums["attention_topk_mass"][index] = top_mass.item()
        sums["attention_rows"][index] = query_rows.shape[0] * query_rows.shape[1]
    return sums


def plot_importance_heatmap(result: ImportanceResult, path, title: str = "", *, num_marked: int = 8) -> None:
    """Write a PNG of two panels: `draw_importance` with stars on the `num_marked` top-ranked layers, and
    the criteria's rank correlation matrix.

    Drawn with matplotlib's Agg canvas (no display, no pyplot state) and written atomically.
    """
    num_rows = len(result.normalised) + len(result.group_scores) + 1
    num_criteria = len(result.correlation)
    scores_width = max(6.0, 3.5 + 0.3 * len(result.fused))
    correlation_width = 2.5 + 0.45 * num_criteria
    figure = Figure(figsize=(scores_width + correlation_width, 1.5 + 0.35 * max(num_rows, num_criteria + 4)),
                    layout="constrained")
    FigureCanvasAgg(figure)  # renders through Agg: no display, and pyplot's global state is left alone
    scores_axes, correlation_axes = figure.subplots(1, 2, width_ratios=[scores_width, correlation_width])
    marked = result.ranking[:num_marked]
    scores_image = draw_importance(scores_axes, result, marked, title)
    scores_axes.set_xlabel(f"layer (stars: top {len(marked)} by fused score)")
    figure.colorbar(scores_image, ax=scores_axes, label="scaled rank over layers (1 = most important)")
    # In group order, so that each group's block of (hopefully high) correlations lies on the diagonal.
    by_group = [name for names in result.groups.values() for name in names if name in result.correlation]
    correlation_image = _draw_correlation(correlation_axes, result.correlation, by_group)
    figure.colorbar(correlation_image, ax=correlation_axes, label="Spearman's rho")
    save_figure(figure, Path(path))


def draw_importance(axes, result: ImportanceResult, marked: list[int], title: str = ""):
    """The heatmap on `axes`, one column per layer: a row of scaled ranks per criterion (labelled with its
    group), a row per group score (with its weight), a last fused row with stars at `marked`; returns
    the image for a colorbar."""
    criteria = [(group, name) for group, names in result.groups.items() for name in names
                if name in result.normalised]
    rows = [result.normalised[name] for _, name in criteria]
    rows += [*result.group_scores.values(), result.fused]
    labels = (
        [f"{name} [{group}]" for group, name in criteria]
        + [f"{group} group (w={result.group_weights[group]:.2f})" for group in result.group_scores]
        + ["fused"]
    )
    num_layers, fused_row = len(result.fused), len(rows) - 1
    image = axes.imshow(rows, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.scatter(marked, [fused_row] * len(marked), marker="*", s=90, c="white", edgecolors="black")
    for first_row in (len(criteria), fused_row):  # lines between criteria, group scores and fused score
        axes.axhline(first_row - 0.5, color="white", linewidth=2)
    axes.set_xticks(range(num_layers), [str(layer) for layer in range(num_layers)], fontsize=7)
    axes.set_yticks(range(len(rows)), labels, fontsize=8)
    if title:
        axes.set_title(title)
    return image


def _draw_correlation(axes, correlation: dict[str, dict[str, float]], names: list[str]):
    """The correlation matrix of the criteria `names` on `axes`, each value written in its cell; returns
    the image for a colorbar."""
    matrix = [[correlation[first][second] for second in names] for first in names]
    image = axes.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    for row, values in enumerate(matrix):
        for column, rho in enumerate(values):
            # White on the dark ends of the colormap, black on its pale middle.
            axes.text(column, row, f"{rho:.2f}", ha="center", va="center", fontsize=7,
                      color="white" if abs(rho) > 0.6 else "black")
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.set_title("Rank correlation of the criteria over layers")
    return image
