"""Which layers to keep: an explicit list, or a strategy that picks ``num_layers`` of the model's layers.

Strategies that need no data: ``first``, ``last``, ``uniform`` (evenly spread, first and last layer
included) and ``random`` (seeded). Strategies that read the importance pass (``importance.py``):

- ``importance``: greedy search (``greedy_select``). Each step tries the most important layers not yet
  kept (by fused importance), scores each candidate set by a proxy (``proxy.py``: validation NDCG@10 of
  items ranked by the set's text prior, or after a short adaptation) and keeps the best; it stops at
  ``num_layers``, when ``patience`` additions in a row gain less than ``min_gain`` (relative; those
  additions are then dropped again; ``patience`` None: never), or when the budget runs out.
- ``block_influence``: keep the k layers of highest block influence (ShortGPT removes the lowest).
- ``contiguous``: drop the contiguous block of L - k layers whose input and output are closest in
  angular distance (Gromov et al.), keep the rest.
- ``magnitude``: keep the k layers of largest mean absolute weight.
"""

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from recbole_layersel.backbone import validate_selection
from recbole_layersel.errors import LayerSelError

DATA_FREE_STRATEGIES = ("first", "last", "uniform", "random")
IMPORTANCE_STRATEGIES = ("importance", "block_influence", "contiguous", "magnitude")
STRATEGIES = DATA_FREE_STRATEGIES + IMPORTANCE_STRATEGIES


def check_strategy(strategy, num_layers, num_source_layers: int) -> None:
    if strategy not in STRATEGIES:
        raise LayerSelError(
            f"layer_strategy={strategy!r} is not a strategy; use one of {', '.join(STRATEGIES)}, "
            "or list the layers with selected_layers: [..]."
        )
    if not isinstance(num_layers, int) or not 0 <= num_layers <= num_source_layers:
        raise LayerSelError(
            f"num_layers={num_layers!r} must be an integer in 0..{num_source_layers} "
            f"(the model has {num_source_layers} layers; 0 keeps none: title embeddings only), or all."
        )


def select_layers(num_source_layers: int, *, selected_layers=None, strategy: str | None = None,
                  num_layers: int | None = None, seed: int = 0, importance=None) -> list[int]:
    """The sorted layer indices to keep, from ``selected_layers`` or from ``strategy`` + ``num_layers``.
    Strategies other than the data-free ones need ``importance`` (an ``ImportanceResult``); the greedy
    ``importance`` strategy has its own entry point, ``greedy_select``."""
    if selected_layers is not None:
        return validate_selection(selected_layers, num_source_layers)
    check_strategy(strategy, num_layers, num_source_layers)
    k, total = num_layers, num_source_layers
    if k == 0:
        return []
    if strategy == "first":
        chosen = range(k)
    elif strategy == "last":
        chosen = range(total - k, total)
    elif strategy == "uniform":
        chosen = [0] if k == 1 else [round(i * (total - 1) / (k - 1)) for i in range(k)]
    elif strategy == "random":
        chosen = random.Random(seed).sample(range(total), k)
    elif strategy == "block_influence":
        chosen = _top_k(importance.raw["block_influence"], k)
    elif strategy == "magnitude":
        chosen = _top_k(importance.weight_magnitude, k)
    elif strategy == "contiguous":
        drop = total - k
        distance = importance.angular_distance_matrix
        start = min(range(total - drop + 1), key=lambda s: distance[s][s + drop - 1]) if drop else 0
        chosen = [i for i in range(total) if not start <= i < start + drop]
    else:
        chosen = importance.ranking[:k]
    return validate_selection(chosen, total)


def _top_k(scores: list[float], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


@dataclass
class Scored:
    layers: list[int]
    proxy: float


@dataclass
class GreedyStep:
    candidates: list[Scored]  # every layer set scored at this step, best first
    beam: list[Scored]  # the sets kept for the next step, best first
    gain: float | None  # of the best set, relative to the previous step's best; None for the first


@dataclass
class GreedyResult:
    selected: list[int]
    stop_reason: str  # "target", "saturated", "budget_evaluations", "budget_seconds", "all_layers"
    trajectory: list[GreedyStep]
    evaluations: int

    def to_json(self) -> dict:
        return asdict(self)


def greedy_select(ranking: list[int], evaluate: Callable[[list[int]], float], *, target_k: int,
                  candidates: int = 4, beam_width: int = 1, patience: int | None = 3, min_gain: float = 0.01,
                  max_evaluations: int | None = None, max_seconds: float | None = None,
                  clock: Callable[[], float] = time.perf_counter,
                  on_beam: Callable[[list[list[int]]], None] | None = None) -> GreedyResult:
    """Grow a layer set one layer a step, keeping the layers that ``evaluate`` (higher is better) scores best.

    The search starts from no layer (scored too: what the first layer must beat). At each step every set
    of the beam is extended by each of the first ``candidates`` layers of ``ranking`` it lacks, every
    extension is scored, and the ``beam_width`` best distinct ones become the next beam. It stops at
    ``target_k`` layers; when ``patience`` steps in a row gain less than ``min_gain`` (relative); before a
    step that would exceed ``max_evaluations`` or start after ``max_seconds`` (``clock``); or when no
    layer is left. Whatever stopped it, the steps since the last one that gained ``min_gain`` did not pay
    for their layers: the result is the best set from before them, and at least one layer (a budget stops
    the search only after its first step; no layer at all is the text-only model, ``num_layers: 0``).
    ``patience=None`` judges no step: the search grows to ``target_k`` (or its budget) and keeps every step.
    ``on_beam`` is given each new beam's layer sets, the ones the next step extends.
    """
    if patience is not None and not (isinstance(patience, int) and patience >= 1):
        raise LayerSelError(
            f"selection_patience {patience!r} is not a number of additions; use 1 or more, or None (~ in "
            "yaml) to grow the set to num_layers without the saturation stop")
    start, evaluations = clock(), 1
    beam = [Scored([], float(evaluate([])))]
    trajectory = [GreedyStep(list(beam), list(beam), None)]
    on_beam = on_beam or (lambda sets: None)
    if target_k == 0:
        return GreedyResult([], "target", trajectory, evaluations)
    flat_run = 0

    def result(reason: str) -> GreedyResult:
        kept = trajectory[max(len(trajectory) - 1 - flat_run, 1)].beam[0].layers
        return GreedyResult(kept, reason, trajectory, evaluations)

    while True:
        extensions = _extensions(beam, ranking, candidates)
        if len(beam[0].layers) == target_k or not extensions:
            return result("target" if extensions else "all_layers")
        over_evaluations = max_evaluations is not None and evaluations + len(extensions) > max_evaluations
        if len(trajectory) > 1 and over_evaluations:
            return result("budget_evaluations")
        if len(trajectory) > 1 and max_seconds is not None and clock() - start >= max_seconds:
            return result("budget_seconds")
        scored = sorted((Scored(layers, float(evaluate(layers))) for layers in extensions),
                        key=lambda s: (-s.proxy, s.layers))
        evaluations += len(scored)
        previous, beam = beam[0].proxy, scored[:beam_width]
        on_beam([kept.layers for kept in beam])
        gain = (beam[0].proxy - previous) / max(abs(previous), 1e-12)
        trajectory.append(GreedyStep(scored, list(beam), gain))
        flat_run = flat_run + 1 if patience is not None and gain < min_gain else 0
        if flat_run == patience:
            return result("saturated")


def _extensions(beam: list[Scored], ranking: list[int], candidates: int) -> list[list[int]]:
    """Each set of the beam plus each of the first ``candidates`` layers of ``ranking`` it lacks; distinct."""
    extended: dict[tuple[int, ...], None] = {}
    for kept in beam:
        for layer in [layer for layer in ranking if layer not in kept.layers][:candidates]:
            extended[tuple(sorted([*kept.layers, layer]))] = None
    return [list(layers) for layers in extended]
