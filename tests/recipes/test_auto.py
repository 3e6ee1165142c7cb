"""The automatic mix's allocator: within the budget, the optimum where brute force can find it, llama.cpp's row
constraints."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from llmquant.errors import InputError
from llmquant.recipes.arch import ArchInfo
from llmquant.recipes.auto import Option, TensorGroup, allocate, candidate_types, group_options
from llmquant.recipes.file_types import block_size
from llmquant.recipes.mixes import MixOptions, plan_mix


def _random_groups(rng: np.random.Generator, n_groups: int, n_types: int) -> list[TensorGroup]:
    groups = []
    for g in range(n_groups):
        sizes = np.sort(rng.choice(np.arange(10, 400), n_types, replace=False))
        costs = np.sort(rng.random(n_types) * 10)[::-1]
        if rng.random() < 0.3:  # some tensors with costs that do not fall with size (dominated, non-convex)
            costs = rng.random(n_types) * 10
        groups.append(TensorGroup((f"t{g}",), tuple(Option(f"T{k}", int(s), float(c))
                                                    for k, (s, c) in enumerate(zip(sizes, costs, strict=True)))))
    return groups


def _brute_force(groups: list[TensorGroup], budget: int) -> float:
    fits = [sum(o.cost for o in combo) for combo in itertools.product(*(g.options for g in groups))
            if sum(o.n_bytes for o in combo) <= budget]
    return min(fits)


def _budget_range(groups: list[TensorGroup]) -> tuple[int, int]:
    return (sum(min(o.n_bytes for o in g.options) for g in groups),
            sum(max(o.n_bytes for o in g.options) for g in groups))


def test_the_allocation_is_the_brute_force_optimum_on_small_cases():
    rng = np.random.default_rng(18)
    for _ in range(300):
        groups = _random_groups(rng, n_groups=5, n_types=4)
        low, high = _budget_range(groups)
        budget = int(rng.integers(low, high + 50))
        allocation = allocate(groups, budget)
        assert allocation.n_bytes <= budget
        assert allocation.optimal
        assert allocation.cost == pytest.approx(_brute_force(groups, budget), rel=1e-12, abs=1e-12)


def test_the_relaxation_and_greedy_fill_alone_never_exceed_the_budget_and_stay_near_the_optimum():
    rng = np.random.default_rng(7)
    gaps = []
    for _ in range(200):
        groups = _random_groups(rng, n_groups=5, n_types=4)
        low, high = _budget_range(groups)
        budget = int(rng.integers(low, high + 1))
        allocation = allocate(groups, budget, exact_nodes=0)
        assert allocation.n_bytes <= budget
        optimum = _brute_force(groups, budget)
        assert allocation.cost >= optimum - 1e-9
        gaps.append(allocation.cost - optimum)
    assert np.mean(np.array(gaps) < 1e-9) > 0.8  # optimal in most cases without the exact search


def test_the_chosen_types_and_reported_totals_agree():
    groups = _random_groups(np.random.default_rng(3), n_groups=6, n_types=5)
    allocation = allocate(groups, sum(_budget_range(groups)) // 2)
    chosen = [next(o for o in g.options if o.type_name == allocation.types[g.names[0]]) for g in groups]
    assert allocation.n_bytes == sum(o.n_bytes for o in chosen)
    assert allocation.cost == pytest.approx(sum(o.cost for o in chosen))


def test_a_large_instance_fills_the_budget_from_below():
    rng = np.random.default_rng(5)
    groups = []
    for g in range(200):  # SmolLM2's size: 200 tensors of ~0.1-5 MB, 8 types with falling costs
        n_weights = int(rng.integers(1, 20)) * 256 * 256
        bits = np.array([2.625, 3.4375, 4.25, 4.5, 5.5, 6.5625, 8.5, 16.0])
        sizes = (n_weights * bits / 8).astype(int)
        costs = rng.random() * n_weights * 4.0 ** (-bits)
        groups.append(TensorGroup((f"t{g}",), tuple(Option(f"T{k}", int(s), float(c))
                                                    for k, (s, c) in enumerate(zip(sizes, costs, strict=True)))))
    low, high = _budget_range(groups)
    for fraction in (0.1, 0.4, 0.7):
        budget = int(low + fraction * (high - low))
        allocation = allocate(groups, budget)
        assert budget - min(o.n_bytes for g in groups for o in g.options) < allocation.n_bytes <= budget


def test_a_budget_that_fits_exactly_is_met_exactly():
    groups = [TensorGroup(("a",), (Option("Q4_K", 100, 5.0), Option("Q6_K", 150, 1.0))),
              TensorGroup(("b",), (Option("Q4_K", 200, 4.0), Option("Q6_K", 300, 2.0)))]
    assert allocate(groups, 450).n_bytes == 450
    assert allocate(groups, 449).types == {"a": "Q6_K", "b": "Q4_K"}
    assert allocate(groups, 300).types == {"a": "Q4_K", "b": "Q4_K"}


def test_a_budget_below_the_smallest_types_is_a_clear_error():
    groups = [TensorGroup(("blk.0.attn_q.weight",), (Option("Q2_K", 100, 5.0), Option("Q8_0", 400, 0.1)))]
    with pytest.raises(InputError, match="too small.*100"):
        allocate(groups, 99)


def test_a_tensor_whose_rows_fit_no_candidate_is_a_clear_error():
    with pytest.raises(InputError, match="no candidate type"):
        allocate([TensorGroup(("x",), ())], 10)


@pytest.mark.parametrize("row_length", [576, 1536, 256, 100, 49152])
def test_candidate_types_take_llama_cpps_fallbacks_for_rows_that_do_not_fit(row_length):
    wanted = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q4_0", "Q8_0"]
    name, shape = "blk.0.ffn_down.weight", (row_length, 64)
    candidates = candidate_types(name, shape, wanted)
    # what llama.cpp's mix code (checked against llama-quantize in test_mixes) gives each wanted type
    arch = ArchInfo(arch="llama", n_layer=1, n_head=1, n_head_kv=1, n_expert=0)
    expected = []
    for type_name in wanted:
        options = MixOptions(tensor_types=((name, type_name),))
        used = plan_mix([(name, shape, "F32")], arch, "Q4_K_M", options).types[name]
        if used not in expected:
            expected.append(used)
    assert candidates == expected
    assert all(row_length % block_size(t) == 0 for t in candidates)


def test_the_allocator_never_gives_a_type_outside_each_tensors_candidates():
    rng = np.random.default_rng(11)
    shapes = {"a": (576, 8), "b": (1536, 8), "c": (100, 8)}
    bits = {"Q2_K": 2.625, "Q4_K": 4.5, "Q6_K": 6.5625, "Q4_0": 4.5, "Q5_0": 5.5, "Q8_0": 8.5, "F16": 16.0}
    options = {name: [Option(t, int(np.prod(shape) * bits[t] / 8), float(rng.random()))
                      for t in candidate_types(name, shape, ["Q2_K", "Q4_K", "Q6_K"])]
               for name, shape in shapes.items()}
    groups = [group_options([name], options) for name in shapes]
    allocation = allocate(groups, 10**9)
    for name, shape in shapes.items():
        assert allocation.types[name] in candidate_types(name, shape, ["Q2_K", "Q4_K", "Q6_K"])
    assert candidate_types("c", shapes["c"], ["Q2_K", "Q4_K", "Q6_K"]) == ["F16"]


def test_grouped_tensors_take_one_type():
    options = {"blk.0.ffn_up.weight": [Option("Q4_K", 100, 9.0), Option("Q6_K", 150, 1.0)],
               "blk.0.ffn_gate.weight": [Option("Q4_K", 100, 0.1), Option("Q6_K", 150, 0.0), Option("Q8_0", 200, 0.0)]}
    group = group_options(list(options), options)
    assert [o.type_name for o in group.options] == ["Q4_K", "Q6_K"]
    allocation = allocate([group], 300)
    assert allocation.types == {"blk.0.ffn_up.weight": "Q6_K", "blk.0.ffn_gate.weight": "Q6_K"}
    assert allocate([group], 299).types == {"blk.0.ffn_up.weight": "Q4_K", "blk.0.ffn_gate.weight": "Q4_K"}
