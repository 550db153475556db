"""Per-layer importance of a full LLM on the recommendation task, fused into one ranking of its layers.

`compute_importance` runs the full model (a `CompactBackbone` holding every layer) once over a sample of
user histories, in mini-batches, and measures each layer by nine criteria. Each has a direction: +1 if a
higher raw value means a more important layer, -1 if a lower one does.

- ``fisher`` (+1): diagonal empirical Fisher information. The squared gradient of the recommendation loss
  with respect to every parameter of the layer, averaged over mini-batches, then averaged over the layer's
  parameters (normalised per parameter, so wide and narrow layers compare). The loss is sensitive to
  layers with a large Fisher.
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
enter any statistic. To fuse, every criterion is turned so that higher means more important (multiplied
by its direction), min-max scaled to [0, 1] over layers, and combined with weights that sum to 1; layers
are ranked by the fused score. Besides the criteria the result holds the angular distance between the
input of layer l and the output of every later layer m (for dropping the best contiguous block, as in
Gromov et al.) and each layer's mean absolute weight (a data-free "magnitude" baseline).

References:
    Xin Men et al. "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect." 2024.
    Andrey Gromov et al. "The Unreasonable Ineffectiveness of the Deeper Layers." ICLR 2025.
    Olivier Roy and Martin Vetterli. "The effective rank: a measure of effective dimensionality." 2007.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from recbole_layersel.backbone import CompactBackbone
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

# Keeps ratios finite for an all-zero input vector; far below any real activation norm.
_TINY_NORM = 1e-12


@dataclass
class ImportanceResult:
    """Per-layer scores; every per-layer list is indexed by the layer's original index."""

    raw: dict[str, list[float]]  # criterion -> value per layer, in the criterion's own units
    normalised: dict[str, list[float]]  # direction applied, then min-max scaled to [0, 1] over layers
    weights: dict[str, float]  # fusion weight per criterion, summing to 1
    fused: list[float]  # weighted sum of the normalised scores, in [0, 1]
    ranking: list[int]  # layer indices, most important first; the lower index first among equals
    # D[l][m], m >= l: mean angular distance (in [0, 1]) between the input of layer l and the output of
    # layer m; 0.0 below the diagonal. D[l][l] is raw["angular_distance"][l].
    angular_distance_matrix: list[list[float]]
    weight_magnitude: list[float]  # mean |w| over all parameters of the layer: a data-free baseline

    def to_json(self) -> dict:
        """All fields as plain dicts, lists, floats and ints (ready for json.dump)."""
        return asdict(self)


def validate_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """Fusion weights over all of CRITERIA, normalised to sum 1.

    None gives every criterion the same weight; criteria not named get weight 0.
    """
    if weights is None:
        return dict.fromkeys(CRITERIA, 1.0 / len(CRITERIA))
    if not isinstance(weights, Mapping):
        raise LayerSelError(
            f"importance weights must be a mapping criterion -> weight, got {weights!r}; "
            f"e.g. {{'fisher': 1.0, 'block_influence': 1.0}} with criteria from {', '.join(CRITERIA)}."
        )
    unknown = [name for name in weights if name not in CRITERIA]
    if unknown:
        raise LayerSelError(
            f"unknown importance criteria {unknown}; weights may only name {', '.join(CRITERIA)}."
        )
    invalid = {
        name: weight
        for name, weight in weights.items()
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight) or weight < 0
    }
    if invalid:
        raise LayerSelError(
            f"importance weights must be finite numbers >= 0, got {invalid}; use 0 to leave a criterion out."
        )
    total = sum(weights.values())
    if not total > 0:
        raise LayerSelError(
            f"importance weights {dict(weights)} sum to {total}; give at least one criterion a weight > 0."
        )
    return {name: float(weights.get(name, 0.0)) / total for name in CRITERIA}


def fuse_scores(
    raw: Mapping[str, list[float]], weights: Mapping[str, float] | None = None
) -> tuple[dict[str, list[float]], list[float], list[int]]:
    """(normalised, fused, ranking) from per-layer raw criterion values.

    normalised[c]: the values times CRITERIA[c], min-max scaled to [0, 1] over layers (all 0 if all equal).
    fused[l]: sum over criteria of weight * normalised value. ranking: layer indices by descending fused
    score, the lower index first among equals. `raw` may hold a subset of CRITERIA if `weights` gives
    the missing ones weight 0.
    """
    weights = validate_weights(weights)
    unknown = [name for name in raw if name not in CRITERIA]
    if unknown:
        raise LayerSelError(
            f"unknown importance criteria {unknown} in raw scores; expected {', '.join(CRITERIA)}."
        )
    missing = [name for name, weight in weights.items() if weight > 0 and name not in raw]
    if missing:
        raise LayerSelError(
            f"criteria {missing} have weight > 0 but no raw scores; add their scores or give them weight 0."
        )
    layer_counts = {name: len(values) for name, values in raw.items()}
    if len(set(layer_counts.values())) != 1 or 0 in layer_counts.values():
        raise LayerSelError(
            f"raw scores must hold one value per layer, the same number of layers (>= 1) for every "
            f"criterion; got these lengths: {layer_counts}."
        )
    normalised = {name: _min_max([CRITERIA[name] * v for v in values]) for name, values in raw.items()}
    num_layers = len(next(iter(raw.values())))
    fused = [sum(weights[c] * normalised[c][layer] for c in normalised) for layer in range(num_layers)]
    ranking = sorted(range(num_layers), key=lambda layer: (-fused[layer], layer))
    return normalised, fused, ranking


def _min_max(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    if high == low:
        return [0.0] * len(values)
    return [(value - low) / (high - low) for value in values]


def compute_importance(
    backbone: CompactBackbone,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    weights: Mapping[str, float] | None = None,
    attention_top_k: int = 4,
    batch_size: int = 16,
) -> tuple[ImportanceResult, dict[str, torch.Tensor]]:
    """Score every layer of the full model on a sample of N sequences; also return the teacher states.

    backbone: a CompactBackbone holding ALL layers of its source model (then it is the full model).
    inputs_embeds (N, T, H) and attention_mask (N, T) of 1/0, right-padded (each row's valid positions
    first). loss_fn(states, rows) -> scalar loss, where states (B, T, H) are the backbone's final states
    (after the final norm) of the mini-batch and rows is a LongTensor, on the device of inputs_embeds, of
    its row indices into the N rows (to look up histories and targets).

    One pass in mini-batches of `batch_size`, shared out over the processes of a process group if
    there is one (``distributed.py``: every sum and the teacher are all-reduced, so every process gets
    the single-process result), with eager attention (for the probabilities) and the
    backbone in eval mode (dropout would make every statistic random); the attention implementation,
    train/eval modes and requires_grad flags are restored afterwards, also on error. Gradients are taken
    with torch.autograd.grad for the layer parameters only, so no `.grad` is written anywhere (not
    even on parameters the loss_fn closure uses).

    Returns (result, teacher) with teacher = {"last": (N, T, H) final states after the final norm,
    "per_layer": (L, N, T, H) each layer's output before the final norm}, detached, CPU float32.
    """
    fusion_weights = validate_weights(weights)  # fail on bad weights before the expensive pass
    _check_positive_int("attention_top_k", attention_top_k)
    _check_positive_int("batch_size", batch_size)
    _check_inputs(backbone, inputs_embeds, attention_mask)

    layers = list(backbone.layers)
    num_layers = len(layers)
    num_rows, seq_len, hidden_size = inputs_embeds.shape
    layer_params = [list(layer.parameters()) for layer in layers]
    params = [param for layer in layer_params for param in layer]
    param_layers = torch.tensor([index for index, layer in enumerate(layer_params) for _ in layer])
    device, dtype = params[0].device, backbone.dtype

    fisher_sums = torch.zeros(num_layers, dtype=torch.float64)
    token_sums = {
        name: torch.zeros(num_layers, dtype=torch.float64)
        for name in ("norm_growth", "activation_variance", "block_influence")
    }
    distance_sums = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    attention_sums = {
        name: torch.zeros(num_layers, dtype=torch.float64)
        for name in ("attention_entropy", "attention_topk_mass")
    }
    attention_rows = torch.zeros(num_layers, dtype=torch.float64)  # valid queries x heads, per layer
    num_tokens = num_batches = 0
    teacher = {
        "last": torch.zeros(num_rows, seq_len, hidden_size),
        "per_layer": torch.zeros(num_layers, num_rows, seq_len, hidden_size),
    }

    layer_inputs: list[torch.Tensor | None] = [None] * num_layers

    def input_recorder(index: int):
        def record_input(_module, args):
            layer_inputs[index] = args[0].detach()

        return record_input

    saved_requires_grad = [param.requires_grad for param in params]
    saved_training = {module: module.training for module in backbone.modules()}
    hooks = []
    try:
        backbone.eval()
        for param in params:
            param.requires_grad_(True)
        hooks = [layer.register_forward_pre_hook(input_recorder(i)) for i, layer in enumerate(layers)]
        with torch.enable_grad(), backbone.eager_attention():
            for start, stop in my_batches(num_rows, batch_size):
                batch_mask = attention_mask[start:stop].to(device)
                batch_embeds = inputs_embeds[start:stop].detach().to(device=device, dtype=dtype)
                last, per_layer, attentions = backbone(
                    batch_embeds, batch_mask, output_hidden_states=True, output_attentions=True
                )
                rows = torch.arange(start, stop, device=inputs_embeds.device)
                loss = loss_fn(last, rows)
                if not (isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.requires_grad):
                    raise LayerSelError(
                        f"loss_fn must return a scalar tensor that depends on the states, got {loss!r}; "
                        "return e.g. a cross-entropy over the items for these rows."
                    )
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                no_grad = torch.zeros((), device=device)  # a parameter the loss does not depend on
                squared_grads = torch.stack(
                    [no_grad if grad is None else grad.float().pow(2).sum() for grad in grads]
                )
                fisher_sums.index_add_(0, param_layers, squared_grads.double().cpu())
                num_batches += 1

                batch_valid = batch_mask.bool()
                inputs_valid = torch.stack([hidden[batch_valid] for hidden in layer_inputs]).float()
                outputs_valid = torch.stack([hidden.detach()[batch_valid] for hidden in per_layer]).float()
                for name, sums in _token_sums(inputs_valid, outputs_valid).items():
                    token_sums[name] += sums
                distance_sums += _distance_sums(inputs_valid, outputs_valid)
                num_tokens += inputs_valid.shape[1]
                for index, probs in enumerate(attentions):
                    # One row per valid query and head: (valid queries, heads, keys).
                    query_rows = probs.detach().float().transpose(1, 2)[batch_valid]
                    entropy = torch.special.entr(query_rows).sum()
                    top_mass = query_rows.topk(min(attention_top_k, seq_len), dim=-1).values.sum()
                    attention_sums["attention_entropy"][index] += entropy.item()
                    attention_sums["attention_topk_mass"][index] += top_mass.item()
                    attention_rows[index] += query_rows.shape[0] * query_rows.shape[1]

                teacher["last"][start:stop] = last.detach().float().cpu()
                teacher["per_layer"][:, start:stop] = torch.stack(per_layer).detach().float().cpu()
    finally:
        for hook in hooks:
            hook.remove()
        for param, requires_grad in zip(params, saved_requires_grad, strict=True):
            param.requires_grad_(requires_grad)
        for module, training in saved_training.items():
            module.training = training

    # Each process filled its own rows of the teacher (zeros elsewhere): the sum is every row.
    for sums in (fisher_sums, distance_sums, attention_rows, *token_sums.values(), *attention_sums.values(),
                 *teacher.values()):
        sums.copy_(all_reduce_sum(sums))
    counts = all_reduce_sum(torch.tensor([num_tokens, num_batches], dtype=torch.float64))
    num_tokens, num_batches = counts.tolist()
    valid = attention_mask.bool().cpu()
    output_statistics = [_output_statistics(outputs[valid].to(device)) for outputs in teacher["per_layer"]]
    distances = distance_sums / num_tokens
    param_counts = torch.tensor([sum(param.numel() for param in layer) for layer in layer_params])
    raw_tensors = {
        "fisher": fisher_sums / num_batches / param_counts,
        "attention_entropy": attention_sums["attention_entropy"] / attention_rows,
        "attention_topk_mass": attention_sums["attention_topk_mass"] / attention_rows,
        "norm_growth": token_sums["norm_growth"] / num_tokens,
        "activation_variance": token_sums["activation_variance"] / num_tokens,
        "activation_kurtosis": torch.tensor([kurtosis for kurtosis, _ in output_statistics]),
        "effective_rank": torch.tensor([rank for _, rank in output_statistics]),
        "block_influence": token_sums["block_influence"] / num_tokens,
        "angular_distance": distances.diagonal(),
    }
    raw = {name: raw_tensors[name].tolist() for name in CRITERIA}
    normalised, fused, ranking = fuse_scores(raw, weights)
    with torch.no_grad():
        absolute_sums = [
            sum(param.abs().sum(dtype=torch.float64).item() for param in layer) for layer in layer_params
        ]
    weight_magnitude = (torch.tensor(absolute_sums, dtype=torch.float64) / param_counts).tolist()
    result = ImportanceResult(
        raw=raw,
        normalised=normalised,
        weights=fusion_weights,
        fused=fused,
        ranking=ranking,
        angular_distance_matrix=distances.tolist(),
        weight_magnitude=weight_magnitude,
    )
    return result, teacher


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


def plot_importance_heatmap(result: ImportanceResult, path, title: str = "", *, num_marked: int = 8) -> None:
    """Write a PNG heatmap of the normalised scores: one row per criterion plus a last "fused" row, one
    column per layer; stars mark the `num_marked` top-ranked layers on the fused row.

    Drawn with matplotlib's Agg canvas (no display, no pyplot state) and written atomically.
    """
    rows = len(result.normalised) + 1
    figure = Figure(figsize=(max(6.0, 2.5 + 0.3 * len(result.fused)), 1.5 + 0.4 * rows), layout="constrained")
    FigureCanvasAgg(figure)  # renders through Agg: no display, and pyplot's global state is left alone
    axes = figure.add_subplot()
    marked = result.ranking[:num_marked]
    image = draw_importance(axes, result, marked, title)
    axes.set_xlabel(f"layer (stars: top {len(marked)} by fused score)")
    figure.colorbar(image, ax=axes, label="normalised importance")
    save_figure(figure, Path(path))


def draw_importance(axes, result: ImportanceResult, marked: list[int], title: str = ""):
    """The heatmap on `axes` (criteria rows, a last fused row, one column per layer), stars on the fused
    row at `marked`; returns the image for a colorbar."""
    criteria = list(result.normalised)
    rows = [result.normalised[name] for name in criteria] + [result.fused]
    labels = [f"{name} (w={result.weights.get(name, 0.0):.2f})" for name in criteria] + ["fused"]
    num_layers, fused_row = len(result.fused), len(rows) - 1
    image = axes.imshow(rows, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.scatter(marked, [fused_row] * len(marked), marker="*", s=90, c="white", edgecolors="black")
    axes.axhline(fused_row - 0.5, color="white", linewidth=2)
    axes.set_xticks(range(num_layers), [str(layer) for layer in range(num_layers)], fontsize=7)
    axes.set_yticks(range(len(rows)), labels)
    if title:
        axes.set_title(title)
    return image
