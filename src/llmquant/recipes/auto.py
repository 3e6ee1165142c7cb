"""The automatic mix: one type per tensor for a byte budget, from each (tensor, type)'s measured cost.

    groups = [TensorGroup(("blk.0.attn_v.weight",), (Option("Q4_K", 82944, 3.1), Option("Q6_K", 120960, 0.8)))]
    allocation = allocate(groups, budget_bytes=100_000_000)      # .types: {"blk.0.attn_v.weight": "Q6_K", …}

The problem is a multiple-choice knapsack: minimise Σ cost(tensor, type) with Σ bytes(tensor, type) ≤ budget.
As in rate-distortion bit allocation (Shoham & Gersho 1988), its Lagrangian relaxation min Σ cost + λ·bytes
splits into one choice per tensor, each on the lower convex hull of that tensor's (bytes, cost) points; the
smallest λ whose choices fit the budget is found by bisection over the hull's slopes (where the choices change).
That solution is optimal for the bytes it uses (Everett's theorem); the bytes left below the budget are then
filled greedily (most cost saved per byte first), and one pass of pairwise exchanges (one tensor down, another
up) takes what the greedy fill left. Small instances are finished exactly by a branch and bound that the
Lagrangian bound prunes.

Pure: names, byte counts and costs in, types out; nothing here reads a file or a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from llmquant.errors import InputError
from llmquant.recipes.file_types import block_size
from llmquant.recipes.mixes import Fallback, _fallback


@dataclass(frozen=True)
class Option:
    """One type a tensor group can take: its bytes in the file and its cost (a sensitivity: lower is better)."""

    type_name: str
    n_bytes: int
    cost: float


@dataclass(frozen=True)
class TensorGroup:
    """Tensors that must take one type together (one tensor, most often), and the types they can take."""

    names: tuple[str, ...]
    options: tuple[Option, ...]


@dataclass
class Allocation:
    types: dict[str, str]  # tensor name -> chosen type
    n_bytes: int  # Σ bytes of the chosen options
    cost: float  # Σ cost of the chosen options
    multiplier: float  # the Lagrange multiplier λ (cost per byte) of the relaxation's solution
    optimal: bool  # proven optimal (the branch and bound finished)


def candidate_types(name: str, shape: Sequence[int], types: Iterable[str]) -> list[str]:
    """The types ``types`` become for a tensor of ``shape`` (ggml order, ``shape[0]`` the row length): each one
    whose blocks do not fit the rows replaced by llama.cpp's fallback (``tensor_type_fallback``), duplicates and
    types without a fallback left out, in the order given."""
    out: list[str] = []
    for wanted in types:
        if int(shape[0]) % block_size(wanted) == 0:
            used = wanted
        else:
            try:
                used = _fallback(name, shape, wanted, list[Fallback]())
            except ValueError:
                continue
        if used not in out:
            out.append(used)
    return out


def group_options(names: Sequence[str], options: Mapping[str, Sequence[Option]]) -> TensorGroup:
    """Tensors ``names`` as one group: for each type every one of them can take, the sums of bytes and costs."""
    by_type = [{o.type_name: o for o in options[name]} for name in names]
    common = [t for t in by_type[0] if all(t in other for other in by_type[1:])]
    if not common:
        raise InputError(f"tensors {', '.join(names)} must share a type, but no candidate type fits all of them")
    return TensorGroup(tuple(names), tuple(
        Option(t, sum(b[t].n_bytes for b in by_type), float(sum(b[t].cost for b in by_type))) for t in common))


# branch and bound only where it is cheap; beyond this many search nodes the heuristic's answer stands
MAX_SEARCH_NODES = 200_000
MAX_SEARCH_DEPTH = 800  # one recursion level per group: far below Python's limit


def allocate(groups: Sequence[TensorGroup], budget_bytes: int, exact_nodes: int = MAX_SEARCH_NODES) -> Allocation:
    """One option per group with Σ bytes ≤ ``budget_bytes`` and Σ cost as small as found (see the module).

    Raises the input error when even the smallest option of every group does not fit the budget."""
    if not groups:
        return Allocation({}, 0, 0.0, 0.0, True)
    for g in groups:
        if not g.options:
            raise InputError(f"tensor {g.names[0]}: no candidate type fits its rows")
    n_options = max(len(g.options) for g in groups)
    size = np.full((len(groups), n_options), np.iinfo(np.int64).max // (4 * len(groups)), dtype=np.int64)
    cost = np.full((len(groups), n_options), np.inf)
    for i, g in enumerate(groups):
        size[i, : len(g.options)] = [o.n_bytes for o in g.options]
        cost[i, : len(g.options)] = [o.cost for o in g.options]
    smallest = int(size.min(axis=1).sum())
    if smallest > budget_bytes:
        raise InputError(f"a budget of {budget_bytes:,} bytes is too small: even the smallest candidate type of "
                         f"every tensor needs {smallest:,}; give a larger size or add smaller --candidates")

    choice, multiplier = _lagrangian(size, cost, budget_bytes)
    choice = _greedy_fill(size, cost, choice, budget_bytes)
    choice = _exchange(size, cost, choice, budget_bytes)
    choice, optimal = _branch_and_bound(size, cost, choice, budget_bytes, exact_nodes)
    rows = np.arange(len(groups))
    types = {name: groups[i].options[int(choice[i])].type_name for i in range(len(groups)) for name in groups[i].names}
    return Allocation(types, int(size[rows, choice].sum()), float(cost[rows, choice].sum()), multiplier, optimal)


def _lower_hull(size: np.ndarray, cost: np.ndarray) -> list[int]:
    """The options on the lower convex hull of one group's (bytes, cost) points, by bytes: each costs less than the
    one before, at a cost per byte saved that falls (Andrew's monotone chain over the non-dominated points)."""
    order = sorted((i for i in range(size.size) if np.isfinite(cost[i])), key=lambda i: (size[i], cost[i]))
    hull: list[int] = []
    for i in order:
        if hull and cost[i] >= cost[hull[-1]]:
            continue  # more bytes for no less cost: never chosen
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a -> i: drop it
            if (cost[b] - cost[a]) * (size[i] - size[a]) >= (cost[i] - cost[a]) * (size[b] - size[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _lagrangian(size: np.ndarray, cost: np.ndarray, budget: int) -> tuple[np.ndarray, float]:
    """Each group's hull option minimising cost + λ·bytes, for the smallest λ whose choices fit ``budget``: bisection
    over the hull segments' slopes, the only λ where a choice changes (ties go to the smaller option)."""
    hulls = [_lower_hull(size[i], cost[i]) for i in range(size.shape[0])]
    slopes = sorted({float((cost[i, a] - cost[i, b]) / (size[i, b] - size[i, a]))
                     for i, h in enumerate(hulls) for a, b in zip(h, h[1:], strict=False)})

    def choose(lam: float) -> np.ndarray:
        out = np.empty(size.shape[0], dtype=np.int64)
        for i, h in enumerate(hulls):
            # along the hull cost + λ·bytes falls while the segment's slope exceeds λ, then rises
            k = 0
            while k + 1 < len(h) and (cost[i, h[k]] - cost[i, h[k + 1]]) > lam * (size[i, h[k + 1]] - size[i, h[k]]):
                k += 1
            out[i] = h[k]
        return out

    def n_bytes(choice: np.ndarray) -> int:
        return int(size[np.arange(size.shape[0]), choice].sum())

    if n_bytes(best := choose(0.0)) <= budget:
        return best, 0.0
    lo, hi = 0, len(slopes) - 1  # choose(slopes[-1]) takes every group's smallest hull option: it fits
    while lo < hi:
        mid = (lo + hi) // 2
        if n_bytes(choose(slopes[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return choose(slopes[lo]), slopes[lo]


def _greedy_fill(size: np.ndarray, cost: np.ndarray, choice: np.ndarray, budget: int) -> np.ndarray:
    """Spend the bytes left: repeatedly the move to a larger option of one group that fits and saves the most cost
    per extra byte."""
    choice = choice.copy()
    rows = np.arange(size.shape[0])
    while True:
        left = budget - int(size[rows, choice].sum())
        extra = size - size[rows, choice][:, None]
        saved = cost[rows, choice][:, None] - cost
        ok = (extra > 0) & (extra <= left) & (saved > 0)
        if not ok.any():
            return choice
        ratio = np.where(ok, saved / np.maximum(extra, 1), -np.inf)
        i, k = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        choice[i] = k


def _exchange(size: np.ndarray, cost: np.ndarray, choice: np.ndarray, budget: int, rounds: int = 50) -> np.ndarray:
    """Pairwise exchanges: one group to another option and a second group to another, where the pair fits and
    lowers the cost; the best pair each round, then the greedy fill again."""
    choice = choice.copy()
    rows = np.arange(size.shape[0])
    for _ in range(rounds):
        left = budget - int(size[rows, choice].sum())
        d_size = (size - size[rows, choice][:, None]).reshape(-1)  # every single move: bytes and cost change
        d_cost = (cost - cost[rows, choice][:, None]).reshape(-1)
        group = np.repeat(rows, size.shape[1])
        finite = np.isfinite(d_cost) & (d_size != 0)
        d_size, d_cost, group, flat = d_size[finite], d_cost[finite], group[finite], np.flatnonzero(finite)
        if d_size.size < 2:
            return choice
        total_size = d_size[:, None] + d_size[None, :]
        total_cost = d_cost[:, None] + d_cost[None, :]
        ok = (total_size <= left) & (group[:, None] != group[None, :])
        total_cost = np.where(ok, total_cost, np.inf)
        a, b = np.unravel_index(int(np.argmin(total_cost)), total_cost.shape)
        if not total_cost[a, b] < -1e-12 * max(1.0, abs(float(cost[rows, choice].sum()))):
            return choice
        for move in (flat[a], flat[b]):
            i, k = divmod(int(move), size.shape[1])
            choice[i] = k
        choice = _greedy_fill(size, cost, choice, budget)
    return choice


def _branch_and_bound(size: np.ndarray, cost: np.ndarray, incumbent: np.ndarray, budget: int,
                      max_nodes: int) -> tuple[np.ndarray, bool]:
    """The exact optimum by depth-first search over the groups, pruned by the bound Σ min cost of the groups left
    and by the bytes they need at least; gives up (keeping ``incumbent``) after ``max_nodes`` nodes."""
    n_groups = size.shape[0]
    rows = np.arange(n_groups)
    best_cost = float(cost[rows, incumbent].sum())
    best = incumbent.copy()
    if max_nodes <= 0 or n_groups > MAX_SEARCH_DEPTH:
        return best, False
    # the most constrained groups (widest spread of cost) first, so that the bound bites early
    finite = np.where(np.isfinite(cost), cost, np.nan)
    order = np.argsort(np.nanmin(finite, axis=1) - np.nanmax(finite, axis=1), kind="stable")
    min_cost_after = np.concatenate([np.cumsum(cost[order].min(axis=1)[::-1])[::-1], [0.0]])
    min_size_after = np.concatenate([np.cumsum(size[order].min(axis=1)[::-1])[::-1], [0]])
    current = np.empty(n_groups, dtype=np.int64)
    nodes = 0
    tolerance = 1e-12 * max(1.0, abs(best_cost))

    def search(depth: int, used: int, spent: float) -> bool:
        nonlocal best_cost, nodes
        if depth == n_groups:
            if spent < best_cost - tolerance:
                best_cost = spent
                best[order] = current
            return True
        g = order[depth]
        for k in np.argsort(cost[g]):
            if not np.isfinite(cost[g, k]):
                break
            nodes += 1
            if nodes > max_nodes:
                return False
            if used + size[g, k] + min_size_after[depth + 1] > budget:
                continue
            if spent + cost[g, k] + min_cost_after[depth + 1] >= best_cost - tolerance:
                break  # options by cost: every later one is bound to be worse too
            current[depth] = k
            if not search(depth + 1, used + int(size[g, k]), spent + float(cost[g, k])):
                return False
        return True

    finished = search(0, 0, 0.0)
    return best, finished


__all__ = ["Allocation", "Option", "TensorGroup", "allocate", "candidate_types", "group_options"]
