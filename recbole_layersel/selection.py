"""Which layers to keep: an explicit list, or a strategy that picks ``num_layers`` of the model's layers.

Strategies that need no data: ``first``, ``last``, ``uniform`` (evenly spread, first and last layer
included) and ``random`` (seeded). Importance-driven selection builds on the same entry point.
"""

import random

from recbole_layersel.backbone import validate_selection
from recbole_layersel.errors import LayerSelError

STRATEGIES = ("first", "last", "uniform", "random")


def select_layers(num_source_layers: int, *, selected_layers=None, strategy: str | None = None,
                  num_layers: int | None = None, seed: int = 0) -> list[int]:
    """The sorted layer indices to keep, from ``selected_layers`` or from ``strategy`` + ``num_layers``."""
    if selected_layers is not None:
        return validate_selection(selected_layers, num_source_layers)
    if strategy not in STRATEGIES:
        raise LayerSelError(
            f"layer_strategy={strategy!r} is not a strategy; use one of {', '.join(STRATEGIES)}, "
            "or list the layers with selected_layers: [..]."
        )
    if not isinstance(num_layers, int) or not 1 <= num_layers <= num_source_layers:
        raise LayerSelError(
            f"num_layers={num_layers!r} must be an integer in 1..{num_source_layers} "
            f"(the model has {num_source_layers} layers)."
        )
    k, total = num_layers, num_source_layers
    if strategy == "first":
        chosen = range(k)
    elif strategy == "last":
        chosen = range(total - k, total)
    elif strategy == "uniform":
        chosen = [0] if k == 1 else [round(i * (total - 1) / (k - 1)) for i in range(k)]
    else:
        chosen = random.Random(seed).sample(range(total), k)
    return validate_selection(chosen, total)
