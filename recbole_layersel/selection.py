"""Which layers to keep: an explicit list, or a strategy that picks ``num_layers`` of the model's layers.

Strategies that need no data: ``first``, ``last``, ``uniform`` (evenly spread, first and last layer
included) and ``random`` (seeded). Strategies that read the importance pass (``importance.py``):

- ``importance``: greedy. Candidates in fused-importance order; after each addition a proxy scores the
  compact model on a validation sample; stop at ``num_layers``, when ``patience`` additions in a row gain
  less than ``min_gain`` (relative; those additions are then dropped again), or when the budget runs out.
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
class GreedyStep:
    added: int
    layers: list[int]
    proxy: float
    gain: float | None  # relative to the previous step; None for the first


@dataclass
class GreedyResult:
    selected: list[int]
    stop_reason: str  # "target", "saturated", "budget_evaluations", "budget_seconds", "all_layers"
    trajectory: list[GreedyStep]

    def to_json(self) -> dict:
        return asdict(self)


def greedy_select(ranking: list[int], evaluate: Callable[[list[int]], float], *, target_k: int,
                  patience: int = 3, min_gain: float = 0.01, max_evaluations: int | None = None,
                  max_seconds: float | None = None,
                  clock: Callable[[], float] = time.perf_counter) -> GreedyResult:
    """Add layers in ``ranking`` order, scoring each selection with ``evaluate`` (higher is better).
    ``clock`` (seconds) measures the time budget."""
    start, selected, trajectory, flat_run = clock(), [], [], 0
    for layer in ranking:
        if len(selected) == target_k:
            return GreedyResult(selected, "target", trajectory)
        # A budget stops the search only once it has a selection to return.
        if selected and max_evaluations is not None and len(trajectory) >= max_evaluations:
            return GreedyResult(selected, "budget_evaluations", trajectory)
        if selected and max_seconds is not None and clock() - start >= max_seconds:
            return GreedyResult(selected, "budget_seconds", trajectory)
        candidate = sorted([*selected, layer])
        proxy = float(evaluate(candidate))
        previous = trajectory[-1].proxy if trajectory else None
        gain = None if previous is None else (proxy - previous) / max(abs(previous), 1e-12)
        trajectory.append(GreedyStep(layer, candidate, proxy, gain))
        selected = candidate
        flat_run = flat_run + 1 if gain is not None and gain < min_gain else 0
        if flat_run == patience:  # these additions did not pay for themselves: drop them again
            return GreedyResult(trajectory[-patience - 1].layers, "saturated", trajectory)
    return GreedyResult(selected, "all_layers", trajectory)
