"""Distil a compact backbone towards the full model it was cut from.

A `CompactBackbone` that skips layers starts with identity bridges, so its hidden states drift away from
the full model's. `distill_bridges` trains the bridges (and, optionally, the LoRA adapters of the kept
layers) so that the compact backbone's final states match the teacher's on the same inputs (the hooks'
teacher: the full model's states after the compact model's deepest kept layer and the final norm):

    loss = MSE(compact final states, teacher final states)                     (valid positions only)
         + sum_j w[i_j] * MSE(compact output of kept layer j, teacher output of layer i_j)    (optional)
         + reg_lambda * sum(bridge.regularizer() for every bridge)

where i_j is the original index of kept layer j and the layer weights w (e.g. Fisher importance) are
normalised to sum to 1 over the kept layers. The regulariser pulls every bridge towards the identity,
i.e. towards "skip nothing". The kept layers' own weights are never changed.

The teacher states are computed beforehand from the full model, e.g. with a `CompactBackbone` over all of
its layers built from a deep copy (building a compact backbone re-uses and re-numbers the model's layers):

    full = CompactBackbone(copy.deepcopy(model), list(range(num_layers)))
    teacher_last, teacher_per_layer = full(inputs_embeds, attention_mask, output_hidden_states=True)

`fidelity` measures how close the compact backbone is (MSE and cosine similarity at valid positions);
`distill_bridges` reports it before and after training on rows it did not train on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from numbers import Integral, Real

import torch
import torch.nn.functional as F

from recbole_layersel.backbone import Bridge, CompactBackbone, evaluating
from recbole_layersel.distributed import all_reduce_gradients, all_reduce_sum, my_batches, rank_and_world
from recbole_layersel.errors import LayerSelError


@dataclass
class Fidelity:
    """How closely a compact backbone's final states (after the final norm) follow the full model's."""

    mse: float  # mean squared error per element, over valid (non-padding) positions
    cosine: float  # mean cosine similarity per valid token


@dataclass
class DistillReport:
    """Fidelity before and after distillation, and the training loss of every optimiser step.

    `heldout_rows` is how many rows the fidelities were measured on without being trained on; 0 means
    there were too few rows to hold any out and the fidelities are measured on the training rows.
    """

    before: Fidelity
    after: Fidelity
    losses: list[float]
    steps: int
    heldout_rows: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def fidelity(compact: CompactBackbone, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
             teacher_last: torch.Tensor, batch_size: int = 16) -> Fidelity:
    """MSE and cosine similarity between `compact`'s final states and `teacher_last` (N, T, H) at the
    valid positions of `attention_mask` (N, T; None = no padding), run in eval mode without gradients."""
    _check_backbone(compact)
    attention_mask = _check_inputs(compact, inputs_embeds, attention_mask, teacher_last)
    _check_positive_int("batch_size", batch_size)
    with evaluating(compact):
        # Sums in float64 so that long evaluations do not lose precision; one division at the end.
        sums = torch.zeros(3, dtype=torch.float64)  # squared error, cosine, valid tokens
        for start, stop in my_batches(inputs_embeds.shape[0], batch_size):
            student, teacher, valid = _forward_batch(
                compact, inputs_embeds[start:stop], attention_mask[start:stop], teacher_last[start:stop]
            )
            student, teacher = student[valid], teacher[valid]  # (valid tokens, H)
            sums[0] += (student - teacher).double().pow(2).sum().item()
            sums[1] += F.cosine_similarity(student, teacher, dim=-1).double().sum().item()
            sums[2] += student.shape[0]
        squared_error, cosine, valid_tokens = all_reduce_sum(sums).tolist()
    valid_elements = valid_tokens * inputs_embeds.shape[-1]
    return Fidelity(mse=squared_error / valid_elements, cosine=cosine / valid_tokens)


def distill_bridges(
    compact: CompactBackbone,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    teacher_last: torch.Tensor,
    *,
    teacher_per_layer: torch.Tensor | Sequence[torch.Tensor] | None = None,
    layer_weights: Mapping[int, float] | None = None,
    reg_lambda: float = 1e-3,
    steps: int = 50,
    lr: float = 1e-3,
    batch_size: int = 8,
    train_lora: bool = False,
    seed: int = 0,
    heldout_fraction: float = 0.25,
) -> DistillReport:
    """Train `compact`'s bridges (and LoRA adapters with `train_lora`) to reproduce the full model's states.

    compact: a `CompactBackbone` of the selected layers. inputs_embeds (N, T, H) and attention_mask (N, T),
    right-padded, 1 = valid (None = no padding). teacher_last (N, T, H): the full model's final states on
    the same inputs, after its final norm. teacher_per_layer (L_source, N, T, H), or the tuple of L_source
    tensors (N, T, H) that a full `CompactBackbone` returns with ``output_hidden_states=True``: the full
    model's per-layer outputs before the final norm, indexed by original layer index. Giving it adds the
    layer-wise terms: kept layer j is matched to teacher layer ``compact.selected_layers[j]``, weighted by
    `layer_weights` ({original layer index: weight >= 0}, only kept layers, normalised to sum 1; missing
    kept layers weigh 0; None = equal weights).

    The last ``int(N * heldout_fraction)`` rows are held out: training uses Adam (`lr`) for `steps` steps
    on seeded shuffled mini-batches of the other rows, and the returned fidelities before/after are
    measured on the held-out rows only. When N is too small to hold out a row (or heldout_fraction is 0)
    every row is used for both and the report says ``heldout_rows=0``.

    Under a process group (``distributed.py``) every step's mini-batch is split over the processes, which
    sum their gradients and so all take the step a single process would.

    Only the bridges, plus the parameters named ``lora_*`` with `train_lora`, are trained; the layers' own
    weights stay as they are. When there is nothing to train (every bridge is the identity, as between
    adjacent layers, and `train_lora` is off) or `steps` is 0, no step is taken and before == after.
    Training runs in eval mode (dropout off), as the teacher states were computed; the requires_grad
    flags and train/eval modes found on entry are restored on exit.
    """
    _check_backbone(compact)
    attention_mask = _check_inputs(compact, inputs_embeds, attention_mask, teacher_last)
    _check_settings(steps, reg_lambda, lr, batch_size, heldout_fraction)
    teacher_kept = _kept_teacher_layers(compact, teacher_per_layer, inputs_embeds.shape)
    kept_weights = _kept_layer_weights(compact, layer_weights, teacher_kept is not None)
    trainable = _trainable_parameters(compact, train_lora)
    train_rows, eval_rows, heldout_rows = _heldout_split(inputs_embeds.shape[0], heldout_fraction)

    def evaluate() -> Fidelity:
        return fidelity(compact, inputs_embeds[eval_rows], attention_mask[eval_rows], teacher_last[eval_rows])

    before = evaluate()
    if not trainable or steps == 0:
        return DistillReport(before=before, after=before, losses=[], steps=0, heldout_rows=heldout_rows)
    with _training_only(compact, trainable):
        losses = _train(compact, trainable, inputs_embeds, attention_mask, teacher_last, teacher_kept,
                        kept_weights, train_rows=train_rows, steps=steps, lr=lr, batch_size=batch_size,
                        reg_lambda=reg_lambda, seed=seed)
    after = evaluate()
    return DistillReport(before=before, after=after, losses=losses, steps=steps, heldout_rows=heldout_rows)


def _check_settings(steps, reg_lambda, lr, batch_size, heldout_fraction) -> None:
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 0:
        raise LayerSelError(f"steps={steps!r}; pass the number of optimiser steps, an integer >= 0.")
    if not isinstance(reg_lambda, Real) or not reg_lambda >= 0:
        raise LayerSelError(f"reg_lambda={reg_lambda!r}; pass a number >= 0 (0 = no pull towards identity).")
    if not isinstance(lr, Real) or not lr > 0:
        raise LayerSelError(f"lr={lr!r}; pass a learning rate > 0, e.g. 1e-3.")
    _check_positive_int("batch_size", batch_size)
    if not isinstance(heldout_fraction, Real) or not 0 <= heldout_fraction < 1:
        raise LayerSelError(
            f"heldout_fraction={heldout_fraction!r}; pass a fraction in [0, 1), e.g. 0.25 "
            "(0 = hold out nothing)."
        )


def _trainable_parameters(compact, train_lora: bool) -> list[torch.nn.Parameter]:
    """The parameters of the non-identity bridges, then, with `train_lora`, those named ``lora_*``."""
    lora_parameters = [p for name, p in compact.named_parameters() if "lora_" in name]
    if train_lora and not lora_parameters:
        raise LayerSelError(
            "train_lora=True but the backbone has no LoRA adapters; inject them first with "
            "recbole_layersel.model.add_lora(backbone, r, alpha, dropout), or pass train_lora=False."
        )
    trainable = [p for bridge in _trained_bridges(compact) for p in bridge.parameters()]
    return trainable + lora_parameters if train_lora else trainable


def _trained_bridges(compact) -> list[Bridge]:
    # Identity bridges have no parameters: between adjacent kept layers there is nothing to learn.
    return [bridge for bridge in compact.bridges if bridge.kind != "identity"]


def _heldout_split(num_rows: int, heldout_fraction: float) -> tuple[int, slice, int]:
    """(training rows, evaluated rows, held-out rows): the first rows are trained on and the last
    ``int(num_rows * heldout_fraction)`` evaluated; when that is 0, every row is evaluated."""
    heldout_rows = int(num_rows * heldout_fraction)
    eval_rows = slice(num_rows - heldout_rows, num_rows) if heldout_rows else slice(None)
    return num_rows - heldout_rows, eval_rows, heldout_rows


@contextmanager
def _training_only(compact, trainable):
    """Within it only `trainable` requires gradients and `compact` is in eval mode; on exit, also on
    error, every requires_grad flag and train/eval mode is as found."""
    requires_grad = {parameter: parameter.requires_grad for parameter in compact.parameters()}
    try:
        compact.requires_grad_(False)
        for parameter in trainable:
            parameter.requires_grad_(True)
        with evaluating(compact):
            yield
    finally:
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)


def _train(compact, trainable, inputs_embeds, attention_mask, teacher_last, teacher_kept, kept_weights, *,
           train_rows: int, steps: int, lr: float, batch_size: int, reg_lambda: float,
           seed: int) -> list[float]:
    """Take `steps` Adam steps on mini-batches of the first `train_rows` rows; return each step's loss.

    Under a process group each process computes the loss of its share of the mini-batch, normalised by
    the valid positions of the whole mini-batch, so the summed gradients are the single-process ones.
    """
    optimizer = torch.optim.Adam(trainable, lr=lr)
    bridges = _trained_bridges(compact)
    rank, world = rank_and_world()
    losses = []
    for batch in _shuffled_batches(train_rows, batch_size, steps, seed):
        mine = batch[rank::world]
        loss = torch.zeros(())
        if len(mine):  # the last mini-batch of an epoch may leave a process without rows
            loss = _distill_loss(
                compact, inputs_embeds[mine], attention_mask[mine], teacher_last[mine],
                None if teacher_kept is None else teacher_kept[:, mine], kept_weights,
                valid_elements=int(attention_mask[batch].sum()) * inputs_embeds.shape[-1],
            )
        if reg_lambda and rank == 0:  # once, not once per process
            loss = loss + reg_lambda * sum(bridge.regularizer() for bridge in bridges)
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        all_reduce_gradients(trainable)  # also on a process without rows: every process joins it
        optimizer.step()
        losses.append(all_reduce_sum(loss.detach().double().cpu()).item())
    return losses


def _shuffled_batches(num_rows: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` mini-batches of row indices, epoch after epoch, each epoch a new order of all `num_rows`."""
    # Its own generator: the shuffling is reproducible without touching the global RNG.
    generator = torch.Generator().manual_seed(seed)
    remaining = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(remaining) == 0:
            remaining = torch.randperm(num_rows, generator=generator)
        batch, remaining = remaining[:batch_size], remaining[batch_size:]
        yield batch


def _distill_loss(compact, inputs_embeds, attention_mask, teacher_last, teacher_kept, kept_weights,
                  valid_elements: int):
    """Final-state MSE plus, when teacher layers are given, the weighted layer-wise MSEs (valid positions);
    squared errors are divided by ``valid_elements``, those of the whole mini-batch (it may be split)."""
    if teacher_kept is None:
        student, teacher, valid = _forward_batch(compact, inputs_embeds, attention_mask, teacher_last)
        return F.mse_loss(student[valid], teacher[valid], reduction="sum") / valid_elements
    student, teacher, valid, student_layers = _forward_batch(
        compact, inputs_embeds, attention_mask, teacher_last, per_layer=True
    )
    loss = F.mse_loss(student[valid], teacher[valid], reduction="sum") / valid_elements
    for weight, student_layer, teacher_layer in zip(kept_weights, student_layers, teacher_kept, strict=True):
        if weight:  # a zero weight would still cost the teacher layer's transfer to the device
            teacher_layer = teacher_layer.to(student_layer.device, torch.float32)
            squared_error = F.mse_loss(student_layer.float()[valid], teacher_layer[valid], reduction="sum")
            loss = loss + weight * squared_error / valid_elements
    return loss


def _forward_batch(compact, inputs_embeds, attention_mask, teacher_last, per_layer=False):
    """Run `compact` on one batch on its own device and dtype; return its final states and the teacher's
    in float32, the (B, T) boolean mask of valid positions and, with `per_layer`, the kept layers' outputs."""
    device = next(compact.parameters()).device
    attention_mask = attention_mask.to(device)
    outputs = compact(inputs_embeds.to(device, compact.dtype), attention_mask, output_hidden_states=per_layer)
    student = outputs[0] if per_layer else outputs
    teacher = teacher_last.to(device, torch.float32)
    valid = attention_mask.bool()
    if per_layer:
        return student.float(), teacher, valid, outputs[1]
    return student.float(), teacher, valid


def _check_backbone(compact) -> None:
    if not isinstance(compact, CompactBackbone):
        raise LayerSelError(
            f"compact is a {type(compact).__name__}; pass a recbole_layersel.backbone.CompactBackbone."
        )


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise LayerSelError(f"{name}={value!r}; pass an integer >= 1.")


def _check_inputs(compact, inputs_embeds, attention_mask, teacher_last) -> torch.Tensor:
    """Validate the shapes of the inputs and the teacher states; return the (N, T) mask (ones if None)."""
    hidden_size = compact.config.hidden_size
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
        raise LayerSelError(
            f"inputs_embeds has shape {tuple(inputs_embeds.shape)}; expected (N, T, {hidden_size}), "
            "the input embeddings of N right-padded sequences of length T."
        )
    if inputs_embeds.shape[0] == 0:
        raise LayerSelError("inputs_embeds holds no sequences (N = 0); pass at least one row.")
    if tuple(teacher_last.shape) != tuple(inputs_embeds.shape):
        raise LayerSelError(
            f"teacher_last has shape {tuple(teacher_last.shape)} but inputs_embeds has "
            f"{tuple(inputs_embeds.shape)}; pass the full model's final states on these same inputs."
        )
    if attention_mask is None:
        return torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
    if tuple(attention_mask.shape) != tuple(inputs_embeds.shape[:2]):
        raise LayerSelError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected (N, T) = "
            f"{tuple(inputs_embeds.shape[:2])}, 1 at valid positions and 0 at padding."
        )
    empty_rows = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty_rows:
        raise LayerSelError(
            f"rows {empty_rows} of attention_mask have no valid position; drop those sequences."
        )
    return attention_mask


def _kept_teacher_layers(compact, teacher_per_layer, inputs_shape) -> torch.Tensor | None:
    """The teacher outputs of the kept layers only, (k, N, T, H), or None without layer-wise terms."""
    if teacher_per_layer is None:
        return None
    num_source = compact.num_source_layers
    if len(teacher_per_layer) != num_source:
        raise LayerSelError(
            f"teacher_per_layer holds {len(teacher_per_layer)} layers but the source model has {num_source}; "
            "pass one output per original layer (the per-layer tuple of a CompactBackbone over all layers, "
            "not Hugging Face's hidden_states, which start with the embeddings)."
        )
    kept = torch.stack([teacher_per_layer[i] for i in compact.selected_layers])
    if tuple(kept.shape[1:]) != tuple(inputs_shape):
        raise LayerSelError(
            f"teacher_per_layer has layers of shape {tuple(kept.shape[1:])} but inputs_embeds has "
            f"{tuple(inputs_shape)}; pass the full model's per-layer outputs on these same inputs."
        )
    return kept


def _kept_layer_weights(compact, layer_weights, has_teacher_layers: bool) -> list[float] | None:
    """One weight per kept layer, summing to 1 (equal weights when `layer_weights` is None), or None
    without layer-wise terms."""
    kept = compact.selected_layers
    if layer_weights is None:
        return [1 / len(kept)] * len(kept) if has_teacher_layers else None
    if not has_teacher_layers:
        raise LayerSelError(
            "layer_weights were given without teacher_per_layer; pass the full model's per-layer outputs "
            "too, or drop layer_weights."
        )
    if not isinstance(layer_weights, Mapping):
        raise LayerSelError(
            f"layer_weights is a {type(layer_weights).__name__}; pass a dict "
            f"{{original layer index: weight}} over kept layers {kept}."
        )
    not_kept = sorted((i for i in layer_weights if i not in kept), key=repr)
    if not_kept:
        raise LayerSelError(
            f"layer_weights has keys {not_kept} that are not kept layers; use only original indices of "
            f"kept layers {kept}."
        )
    bad_weights = {i: w for i, w in layer_weights.items() if not isinstance(w, Real) or not w >= 0}
    if bad_weights:
        raise LayerSelError(f"layer_weights {bad_weights} must be numbers >= 0.")
    weights = [float(layer_weights.get(i, 0.0)) for i in kept]
    if sum(weights) <= 0:
        raise LayerSelError(
            f"layer_weights {dict(layer_weights)} sum to 0; give at least one kept layer a positive weight."
        )
    return [weight / sum(weights) for weight in weights]

