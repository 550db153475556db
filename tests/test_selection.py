"""Layer selection: data-free strategies, importance-based baselines and the greedy stop rules."""

import time
from types import SimpleNamespace

import pytest

from recbole_layersel.errors import LayerSelError
from recbole_layersel.selection import greedy_select, select_layers


@pytest.mark.parametrize("strategy, expected", [
    ("first", [0, 1, 2]), ("last", [27, 28, 29]), ("uniform", [0, 14, 29])])
def test_deterministic_strategies(strategy, expected):
    assert select_layers(30, strategy=strategy, num_layers=3) == expected


def test_uniform_spreads_k_layers_evenly():
    assert select_layers(30, strategy="uniform", num_layers=8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert select_layers(30, strategy="uniform", num_layers=1) == [0]
    assert select_layers(6, strategy="uniform", num_layers=6) == list(range(6))


def test_random_is_seeded():
    first = select_layers(30, strategy="random", num_layers=8, seed=1)
    assert first == select_layers(30, strategy="random", num_layers=8, seed=1)
    assert first != select_layers(30, strategy="random", num_layers=8, seed=2)
    assert len(set(first)) == 8 and first == sorted(first)


def test_explicit_layers_win_and_are_validated():
    assert select_layers(30, selected_layers=[29, 3], strategy="first", num_layers=8) == [3, 29]
    with pytest.raises(LayerSelError, match="out of range"):
        select_layers(30, selected_layers=[30])


@pytest.mark.parametrize("num_layers", [-1, 31, "8", None])
def test_bad_num_layers(num_layers):
    with pytest.raises(LayerSelError, match=f"num_layers={num_layers!r} must be an integer in 0..30"):
        select_layers(30, strategy="last", num_layers=num_layers)


class Proxy:
    """A proxy whose value depends only on how many layers are selected, counting its calls."""

    def __init__(self, values, delay=0.0):
        self.values, self.delay, self.calls = values, delay, 0

    def __call__(self, layers):
        self.calls += 1
        time.sleep(self.delay)
        return self.values[len(layers) - 1]


RANKING = [7, 2, 9, 0, 5, 1, 3, 4, 6, 8]


def test_greedy_stops_when_three_additions_in_a_row_gain_less_than_one_percent():
    proxy = Proxy([0.1, 0.5, 0.8, 0.805, 0.809, 0.81, 0.9, 0.95, 0.99, 1.0])
    result = greedy_select(RANKING, proxy, target_k=8)
    assert result.stop_reason == "saturated" and proxy.calls == 6
    assert result.selected == [2, 7, 9]  # the three flat additions are dropped again
    assert [step.added for step in result.trajectory] == RANKING[:6]
    assert result.trajectory[0].gain is None and result.trajectory[1].gain == pytest.approx(4.0)


def test_a_one_percent_gain_resets_the_saturation_count():
    proxy = Proxy([0.1, 0.5, 0.8, 0.805, 0.82, 0.821, 0.822, 0.823, 0.9, 1.0])
    result = greedy_select(RANKING, proxy, target_k=10)
    assert result.stop_reason == "saturated" and result.selected == sorted(RANKING[:5])


def test_greedy_stops_at_the_target():
    result = greedy_select(RANKING, Proxy([float(i + 1) for i in range(10)]), target_k=4)
    assert result.stop_reason == "target" and result.selected == sorted(RANKING[:4])
    assert len(result.trajectory) == 4


def test_greedy_stops_when_the_evaluation_budget_runs_out():
    proxy = Proxy([float(i + 1) for i in range(10)])
    result = greedy_select(RANKING, proxy, target_k=8, max_evaluations=2)
    assert result.stop_reason == "budget_evaluations" and proxy.calls == 2 and len(result.selected) == 2


def test_greedy_stops_when_the_time_budget_runs_out():
    proxy = Proxy([float(i + 1) for i in range(10)], delay=0.05)
    result = greedy_select(RANKING, proxy, target_k=8, max_seconds=0.12)
    assert result.stop_reason == "budget_seconds" and 1 <= len(result.selected) < 8


def test_greedy_may_use_every_layer():
    result = greedy_select([2, 0, 1], Proxy([1.0, 2.0, 3.0]), target_k=5)
    assert result.stop_reason == "all_layers" and result.selected == [0, 1, 2]


IMPORTANCE = SimpleNamespace(
    raw={"block_influence": [0.9, 0.1, 0.2, 0.05, 0.5, 0.8]},
    weight_magnitude=[1.0, 3.0, 2.0, 0.5, 4.0, 0.1],
    ranking=[5, 0, 4, 2, 1, 3],
    # D[i][j]: angular distance between the input of layer i and the output of layer j
    angular_distance_matrix=[[0.1 * (j - i + 1) if j >= i else 0.0 for j in range(6)] for i in range(6)],
)
IMPORTANCE.angular_distance_matrix[2][3] = 0.01  # dropping layers 2..3 changes the least


@pytest.mark.parametrize("strategy, expected", [
    ("block_influence", [0, 4, 5, 2]), ("magnitude", [4, 1, 2, 0]), ("contiguous", [0, 1, 4, 5]),
    ("importance", [5, 0, 4, 2])])
def test_importance_based_baselines(strategy, expected):
    assert select_layers(6, strategy=strategy, num_layers=4, importance=IMPORTANCE) == sorted(expected)
