"""Budgeted allocation: exact MCKP against brute force; exact cost formulas against the built layers."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from sigma_core import CPConv, LowRank1x1Conv, LowRankLinear, Tucker2Conv, count_macs, count_params
from sigma_core.allocate import Allocation, Candidate, LayerCandidates, allocate, pareto_prune, reachable_cost
from sigma_core.costs import LayerGeometry, dense_cost, factorized_cost, layer_geometry

pytestmark = pytest.mark.usefixtures("single_thread")


def _instance(rng, n_layers, n_cands, max_cost=50):
    layers = []
    for l in range(n_layers):
        cands = [Candidate((j + 1,), int(rng.integers(0, max_cost)), float(rng.random())) for j in range(n_cands)]
        layers.append(LayerCandidates(f"l{l}", tuple(cands)))
    return layers


def _brute(layers, budget):
    best = (math.inf, None)
    for combo in itertools.product(*(l.candidates for l in layers)):
        cost = sum(c.cost for c in combo)
        err = sum(c.error for c in combo)
        if cost <= budget and (err < best[0] - 1e-12 or (abs(err - best[0]) <= 1e-12 and cost < best[1][0])):
            best = (err, (cost, combo))
    return best


@pytest.mark.parametrize("seed", range(25))
def test_allocate_exact_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    layers = _instance(rng, int(rng.integers(1, 5)), int(rng.integers(1, 6)))
    lo, hi = reachable_cost(layers)
    budget = int(rng.integers(lo, hi + 1))
    alloc = allocate(layers, budget)
    err, (cost, combo) = _brute(layers, budget)
    assert alloc.predicted_error == pytest.approx(err, abs=1e-12)
    assert alloc.cost <= budget and alloc.slack == budget - alloc.cost >= 0
    assert alloc.cost == sum(c.cost for c in alloc.choices)
    assert alloc.predicted_error == pytest.approx(sum(c.error for c in alloc.choices), abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_quantized_allocation_never_exceeds_budget(seed):
    rng = np.random.default_rng(100 + seed)
    layers = _instance(rng, 4, 5, max_cost=1000)
    lo, hi = reachable_cost(layers)
    budget = int(rng.integers(lo + 200, hi + 400))
    exact = allocate(layers, budget)
    try:
        coarse = allocate(layers, budget, quantum=37)
    except ValueError:
        return  # rounding up made the cheapest choice exceed the budget: refused, not exceeded
    assert coarse.cost <= budget
    assert coarse.predicted_error >= exact.predicted_error - 1e-12


@pytest.mark.parametrize("seed", range(10))
def test_budget_of_a_reference_choice_never_predicts_worse(seed):
    """A budget equal to the cost of any choice (e.g. the alpha rule's ranks) gives an error <= that choice's."""
    rng = np.random.default_rng(200 + seed)
    layers = _instance(rng, 6, 8, max_cost=10_000)
    reference = [l.candidates[int(rng.integers(len(l.candidates)))] for l in layers]
    alloc = allocate(layers, sum(c.cost for c in reference))
    assert alloc.predicted_error <= sum(c.error for c in reference) + 1e-12


def test_large_costs_are_exact():
    """Costs in the millions need no grid: the front stays small for real-looking monotone curves."""
    layers = []
    for l in range(12):
        ranks = range(1, 129)
        layers.append(LayerCandidates(f"l{l}", tuple(Candidate((r,), 9000 * r + 17 * l, (1 - r / 128) ** 2 * (l + 1))
                                                      for r in ranks)))
    budget = 9000 * 600
    alloc = allocate(layers, budget)
    assert alloc.cost <= budget
    # Greedy marginal analysis is optimal for convex separable curves: compare with it.
    ranks = [1] * 12
    while True:
        gains = [((1 - ranks[l] / 128) ** 2 - (1 - (ranks[l] + 1) / 128) ** 2) * (l + 1) if ranks[l] < 128 else -1
                 for l in range(12)]
        l = int(np.argmax(gains))
        if sum(9000 * r + 17 * i for i, r in enumerate(ranks)) + 9000 > budget or gains[l] <= 0:
            break
        ranks[l] += 1
    greedy = sum((1 - r / 128) ** 2 * (i + 1) for i, r in enumerate(ranks))
    assert alloc.predicted_error <= greedy + 1e-9


def test_allocate_errors():
    layers = [LayerCandidates("a", (Candidate((1,), 10, 1.0), Candidate((2,), 20, 0.5)))]
    with pytest.raises(ValueError, match=r"reachable total costs: \[10, 20\]"):
        allocate(layers, 9)
    with pytest.raises(ValueError, match="at least one layer"):
        allocate([], 9)
    with pytest.raises(ValueError, match="budget"):
        allocate(layers, -1)
    with pytest.raises(ValueError, match="no candidate"):
        LayerCandidates("x", ())
    with pytest.raises(ValueError, match="finite"):
        Candidate((1,), 1, float("nan"))
    with pytest.raises(ValueError, match="max_front"):
        allocate({f"l{i}": [Candidate((j,), j * 7 + i, 1 / (j + 1)) for j in range(1, 60)] for i in range(6)},
                 10**9, max_front=1000)
    alloc = allocate({"a": layers[0].candidates}, 25)
    assert isinstance(alloc, Allocation) and alloc.ranks == {"a": (2,)} and alloc.slack == 5


def test_pareto_prune():
    c = [Candidate((1,), 5, 1.0), Candidate((2,), 5, 0.9), Candidate((3,), 6, 0.95), Candidate((4,), 7, 0.1)]
    assert [x.ranks for x in pareto_prune(c)] == [(2,), (4,)]


# ------------------------------------------------------------------------------------------------ cost formulas


def _conv_cases():
    return [
        dict(s=8, t=12, k=3, stride=1, padding=1, bias=True, hw=(9, 11)),
        dict(s=6, t=10, k=3, stride=2, padding=1, bias=False, hw=(10, 7)),
        dict(s=5, t=7, k=(3, 5), stride=(2, 1), padding=(0, 2), bias=True, hw=(12, 13)),
        dict(s=4, t=9, k=3, stride=1, padding="same", bias=True, hw=(8, 8), dilation=2),
    ]


@pytest.mark.parametrize("case", _conv_cases())
def test_conv_cost_formulas_match_the_built_layers(case):
    conv = nn.Conv2d(case["s"], case["t"], case["k"], stride=case["stride"], padding=case["padding"],
                     bias=case["bias"], dilation=case.get("dilation", 1))
    shape = (case["s"], *case["hw"])
    geom = layer_geometry(conv, shape)
    assert conv(torch.zeros(1, *shape)).shape[2:] == geom.out_hw
    assert dense_cost(geom, "params") == count_params(conv)
    assert dense_cost(geom, "macs") == count_macs(conv, (1, *shape))
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, bias=case["bias"])
    for ranks in [(1, 1), (3, 2), (case["t"], case["s"])]:
        layer = Tucker2Conv(case["s"], case["t"], conv.kernel_size, ranks, **kw)
        assert factorized_cost(geom, "tucker2", ranks, "params") == count_params(layer)
        assert factorized_cost(geom, "tucker2", ranks, "macs") == count_macs(layer, (1, *shape))
    for r in (1, 4, 17):
        layer = CPConv(case["s"], case["t"], conv.kernel_size, r, **kw)
        assert factorized_cost(geom, "cp", (r,), "params") == count_params(layer)
        assert factorized_cost(geom, "cp", (r,), "macs") == count_macs(layer, (1, *shape))


def test_svd_cost_formulas_match_the_built_layers():
    conv = nn.Conv2d(6, 10, 1, stride=2, bias=True)
    geom = layer_geometry(conv, (6, 9, 9))
    for r in (1, 3, 6):
        layer = LowRank1x1Conv(6, 10, r, stride=2)
        assert factorized_cost(geom, "svd", (r,), "params") == count_params(layer)
        assert factorized_cost(geom, "svd", (r,), "macs") == count_macs(layer, (1, 6, 9, 9))
    lin = nn.Linear(20, 7)
    geom = layer_geometry(lin, (20,))
    assert dense_cost(geom, "macs") == count_macs(lin, (1, 20)) and dense_cost(geom, "params") == count_params(lin)
    for r in (1, 5):
        layer = LowRankLinear(20, 7, r)
        assert factorized_cost(geom, "svd", (r,), "params") == count_params(layer)
        assert factorized_cost(geom, "svd", (r,), "macs") == count_macs(layer, (1, 20))


def test_cost_errors():
    geom = LayerGeometry("conv", (4, 4, 3, 3), (5, 5), (5, 5), True)
    with pytest.raises(ValueError, match="no cost formula for rank family 'tt'"):
        factorized_cost(geom, "tt", (1,), "params")
    with pytest.raises(ValueError, match="metric"):
        factorized_cost(geom, "cp", (1,), "flops")
    with pytest.raises(ValueError, match="2 entries"):
        factorized_cost(geom, "tucker2", (1,), "params")
    with pytest.raises(ValueError, match="SVD factorizes"):
        factorized_cost(geom, "svd", (1,), "params")
    with pytest.raises(ValueError, match="grouped"):
        layer_geometry(nn.Conv2d(4, 4, 3, groups=2), (4, 5, 5))
