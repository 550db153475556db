"""Layer selection: data-free strategies, importance-based baselines and the greedy search."""

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
    """A proxy: the sum of the kept layers' values (none: ``empty``), counting its calls."""

    def __init__(self, values, empty=0.1, delay=0.0):
        self.values, self.empty, self.delay, self.calls = values, empty, delay, 0

    def __call__(self, layers):
        self.calls += 1
        time.sleep(self.delay)
        return self.empty + sum(self.values[layer] for layer in layers)


RANKING = [7, 2, 9, 0, 5, 1, 3, 4, 6, 8]
#         layer: 0    1    2    3    4    5    6    7    8    9
VALUES = [0.30, 0.01, 0.20, 0.02, 0.0, 0.05, 0.0, 0.10, 0.0, 0.40]


def test_each_step_keeps_the_best_scoring_candidate_not_the_top_ranked_one():
    proxy = Proxy(VALUES)
    result = greedy_select(RANKING, proxy, target_k=3, candidates=3)
    first = result.trajectory[1]
    assert [c.layers for c in first.candidates] == [[9], [2], [7]]  # all three logged, best first
    assert first.beam[0].layers == [9] and first.gain == pytest.approx(4.0)
    assert result.selected == [0, 2, 9] and result.stop_reason == "target"
    assert result.trajectory[0].beam[0].layers == [] and proxy.calls == result.evaluations == 1 + 3 + 3 + 3


def test_one_candidate_a_step_follows_the_ranking():
    result = greedy_select(RANKING, Proxy(VALUES), target_k=3, candidates=1)
    assert result.selected == sorted(RANKING[:3]) and result.evaluations == 4


def test_greedy_stops_when_three_additions_in_a_row_gain_less_than_one_percent():
    proxy = Proxy(VALUES)
    result = greedy_select(RANKING, proxy, target_k=10, candidates=2)
    # 2, 9, 0, 7, 5 and 3 (+1.7 %) gain; 1 (+0.85 %) and then two layers of value 0 do not: dropped again.
    assert result.stop_reason == "saturated" and result.selected == [0, 2, 3, 5, 7, 9]
    assert [step.gain < 0.01 for step in result.trajectory[1:]] == [False] * 6 + [True] * 3


def test_a_one_percent_gain_resets_the_saturation_count():
    values = [0.001, 0.001, 0.5, 0.001, 0.001, 0.0, 0.0, 0.0, 0.0, 0.0]
    result = greedy_select(list(range(10)), Proxy(values, empty=1.0), target_k=10, candidates=1)
    # 0 and 1 gain 0.1 % each, 2 gains 50 % (the count starts again), then 3, 4 and 5 gain < 1 %.
    assert result.stop_reason == "saturated" and result.selected == [0, 1, 2]


def test_a_wider_beam_finds_a_pair_that_greedy_misses():
    pairs = {(0,): 1.0, (1,): 0.9, (1, 2): 2.0}

    def proxy(layers):
        return pairs.get(tuple(layers), 1.1 if 0 in layers else 0.0)

    assert greedy_select([0, 1, 2], proxy, target_k=2, candidates=3).selected[0] == 0
    assert greedy_select([0, 1, 2], proxy, target_k=2, candidates=3, beam_width=2).selected == [1, 2]


def test_on_beam_is_told_every_beam_the_next_step_extends():
    beams = []
    result = greedy_select(RANKING, Proxy(VALUES), target_k=3, candidates=3, beam_width=2,
                           on_beam=beams.append)
    assert beams == [[kept.layers for kept in step.beam] for step in result.trajectory[1:]]
    assert beams[0] == [[9], [2]]


def test_greedy_stops_before_a_step_that_would_exceed_the_evaluation_budget():
    proxy = Proxy(VALUES)
    result = greedy_select(RANKING, proxy, target_k=8, candidates=3, max_evaluations=9)
    assert result.stop_reason == "budget_evaluations" and proxy.calls == 7 and result.selected == [0, 9]


def test_greedy_stops_when_the_time_budget_runs_out():
    proxy = Proxy(VALUES, delay=0.05)
    result = greedy_select(RANKING, proxy, target_k=8, candidates=1, max_seconds=0.12)
    assert result.stop_reason == "budget_seconds" and 1 <= len(result.selected) < 8


def test_additions_that_did_not_pay_are_dropped_whatever_stopped_the_search():
    values = [0.5, 0.0, -0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # layer 0 gains, 1 and 2 do not
    result = greedy_select(list(range(10)), Proxy(values, empty=1.0), target_k=3, candidates=1)
    assert result.stop_reason == "target" and result.selected == [0]


def test_without_patience_the_search_grows_to_the_target_and_keeps_every_step():
    values = [0.5, 0.0, -0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # as above: 1 and 2 do not gain
    result = greedy_select(list(range(10)), Proxy(values, empty=1.0), target_k=6, candidates=1, patience=None)
    assert result.stop_reason == "target" and result.selected == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("patience", [0, -1, "~"])
def test_a_patience_below_one_is_refused(patience):
    with pytest.raises(LayerSelError, match=rf"selection_patience {patience!r} .* use 1 or more, or None"):
        greedy_select(RANKING, Proxy(VALUES), target_k=3, patience=patience)


def test_at_least_one_layer_is_kept_even_when_none_gains():
    result = greedy_select(RANKING, Proxy([0.0] * 10, empty=1.0), target_k=8, candidates=2, max_evaluations=2)
    assert result.stop_reason == "budget_evaluations" and result.selected == [2]  # step 1's best (a tie)
    assert greedy_select(RANKING, Proxy(VALUES), target_k=0).selected == []


def test_greedy_may_use_every_layer():
    result = greedy_select([2, 0, 1], Proxy(VALUES), target_k=5)
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
