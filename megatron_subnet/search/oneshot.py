"""One-shot baselines: one sub-network of a fixed kind, sized into the parameter budget, evaluated once.

- ``width_oneshot`` (Minitron's width-only pruning): every layer and the full hidden size; in every layer the
  same number of query groups (each with all its heads) and MLP neurons, the most important ones
  (``--importance``). Of the shapes inside the budget it takes the one whose kept fractions of query groups
  and of MLP neurons are closest to each other (then the one nearest the target, then the larger).
- ``depth_oneshot``: whole layers dropped, the least important first by the layer scores (drop loss unless
  ``--layer-metric`` says otherwise); every kept layer at full width. The layer count nearest the target
  (ties: more layers).
- ``first_k`` (the paper's own setting): the first ``k`` of every dimension, scaled by one fraction ``r``:
  layers, hidden channels, query groups (so heads: each group keeps all its heads) and MLP neurons, each the
  allowed value nearest ``r`` times the parent's; no importance. The ``r`` whose shape lands nearest the
  target (ties: the larger ``r``).

The shapes are genomes of the ``per_layer`` space (``SearchSpace``), so parameters are counted, and indices
chosen (``SubnetConfig.from_counts``, by importance or first-k), by the same code as the search; the grid,
``--divisible-by``, ``--min-layers``/``--max-layers`` and the llama rule "hidden a multiple of every kept
layer's heads" hold as they do there. ``oneshot_genome`` raises one ``SearchSpaceError`` line naming the mode
and the budget when no shape of its kind fits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from megatron_subnet.search.evolution import ONESHOT_MODES
from megatron_subnet.search.space import Budget, Genome, SearchSpace, SearchSpaceError

KINDS = {
    "width_oneshot": "width-only sub-network (every layer, the full hidden size; query groups and MLP neurons "
    "pruned by importance)",
    "depth_oneshot": "depth-only sub-network (whole layers dropped by importance, full width)",
    "first_k": "first-k sub-network (every dimension sliced by the same fraction)",
}
FRACTIONS = 2001  # first_k: fractions r tried, 1 down to 0


def _target(budget: Budget) -> tuple[int, int, float]:
    if budget.bins != 1:
        raise SearchSpaceError("one-shot modes fit one target: give --target-params (and --tolerance), not --bins")
    low, high = budget.window(0)
    return low, high, (low + high) / 2


def _nearest(values: list[int], x: float) -> int:
    """The allowed value nearest ``x`` (ties: the larger)."""
    return min(values, key=lambda v: (abs(v - x), -v))


def width_shapes(space: SearchSpace) -> list[tuple[tuple, Genome]]:
    """(preference key without the budget, genome) of every width-only shape."""
    L, d = space.parent.num_layers, space.divisible_by
    top_groups, top_ffn = max(space.max_groups), max(space.p_ffn)
    out = []
    for groups in range(d, top_groups + 1, d):
        for ffn in range(space.ffn_step, top_ffn + 1, space.ffn_step):
            g = {
                "layers": L,
                "hidden": space.parent.hidden_size,
                "groups": [min(groups, space.max_groups[p]) for p in range(L)],
                "hpg": list(space.p_hpg),
                "ffn": [min(ffn, space.p_ffn[p]) for p in range(L)],
            }
            out.append(((abs(groups / top_groups - ffn / top_ffn),), g))
    return out


def depth_shapes(space: SearchSpace) -> list[tuple[tuple, Genome]]:
    L, d = space.parent.num_layers, space.divisible_by
    full = {
        "hidden": space.parent.hidden_size,
        "groups": list(space.max_groups),
        "hpg": list(space.p_hpg),
        "ffn": [space.parent.layer_ffn(p) // d * d for p in range(L)],
    }
    return [((), {"layers": n, **{k: list(v) if isinstance(v, list) else v for k, v in full.items()}})
            for n in range(space.max_layers, space.min_layers - 1, -1)]  # fmt: skip


def first_k_shapes(space: SearchSpace) -> list[tuple[tuple, Genome]]:
    parent, L, d = space.parent, space.parent.num_layers, space.divisible_by
    out, seen = [], set()
    for r in np.linspace(1.0, 0.0, FRACTIONS)[:-1]:
        r = float(r)
        groups = [_nearest(list(range(d, space.max_groups[p] + 1, d)), r * space.p_groups[p]) for p in range(L)]
        ffn = [_nearest(list(range(space.ffn_step, space.p_ffn[p] + 1, space.ffn_step)), r * parent.layer_ffn(p))
               for p in range(L)]  # fmt: skip
        g = {
            "layers": _nearest(list(range(space.min_layers, space.max_layers + 1)), r * L),
            "hidden": parent.hidden_size,
            "groups": groups,
            "hpg": list(space.p_hpg),
            "ffn": ffn,
        }
        allowed = space.values(g, ("hidden", None))  # multiples of the grid (and of the kept heads)
        if not allowed:
            continue
        g["hidden"] = _nearest(allowed, r * parent.hidden_size)
        key = space.key(g)
        if key not in seen:
            seen.add(key)
            out.append(((), g))  # r descends: among equals the first is the larger fraction
    return out


SHAPES = {"width_oneshot": width_shapes, "depth_oneshot": depth_shapes, "first_k": first_k_shapes}


def oneshot_genome(space: SearchSpace, mode: str, budget: Budget) -> Genome:
    """The ``mode`` shape inside the budget (``space``: a ``per_layer`` space, with importance unless
    ``first_k``); SearchSpaceError naming the mode and the budget when none of its shapes fits."""
    if mode not in ONESHOT_MODES:
        raise SearchSpaceError(f"--mode {mode!r}: not a one-shot mode ({', '.join(ONESHOT_MODES)})")
    if space.kind != "per_layer":
        raise SearchSpaceError(f"--mode {mode}: one-shot shapes live in the per_layer space, not {space.kind!r}")
    low, high, target = _target(budget)
    best, best_rank, nearest = None, None, None
    for order, (prefer, g) in enumerate(SHAPES[mode](space)):
        if not space.hidden_ok(g):
            continue
        params = space.params(g)
        if nearest is None or abs(params - target) < abs(nearest[0] - target):
            nearest = (params, g)
        if not low <= params <= high:
            continue
        rank = (*prefer, abs(params - target), -params, order)
        if best_rank is None or rank < best_rank:
            best, best_rank = g, rank
    if best is None:
        metric = "total" if space.config.include_embeddings else "non-embedding"
        near = ""
        if nearest is not None:
            s = space.summary(nearest[1])
            near = (f"; the nearest has {nearest[0]:,} ({s['num_layers']} layers, hidden {s['hidden_size']}, "
                    f"{s['num_query_groups']} query groups, MLP {s['ffn_hidden_size']})")  # fmt: skip
        raise SearchSpaceError(
            f"--mode {mode}: no {KINDS[mode]} has {low:,}..{high:,} {metric} parameters (the budget: "
            f"--target-params +- --tolerance){near}; change --target-params or --tolerance"
        )
    return best


def _in_space(space: SearchSpace, g: Genome) -> Genome | None:
    """A per_layer genome as a genome of ``space`` (uniform: every kept layer alike); None if it is not one."""
    if space.kind == "per_layer":
        return g
    if space.kind != "uniform":
        return None
    kept = space.kept_layers(g)
    sizes = {name: {g[name][p] for p in kept} for name in ("groups", "hpg", "ffn")}
    if any(len(v) != 1 for v in sizes.values()):
        return None
    return {"layers": g["layers"], "hidden": g["hidden"], **{name: v.pop() for name, v in sizes.items()}}


def seed_genomes(space: SearchSpace, budget: Budget) -> list[tuple[str, Genome]]:
    """The one-shot shapes (first-k, width-only, depth-only) sized into each bin, as ``(mode, genome)`` of
    ``space`` (uniform or per_layer; the index space has none): known points that open a search's first
    generation, as whittle seeds its search. Which units a shape keeps follows ``space``'s order (importance
    when it has scores). A shape with no fit in a bin, or not expressible in ``space``, is left out."""
    if space.kind not in ("uniform", "per_layer"):
        return []
    shapes = SearchSpace(space.parent, dataclasses.replace(space.config, kind="per_layer"), space.importance)
    out, seen = [], set()
    for b in range(budget.bins):
        one_bin = Budget(list(budget.window(b)))
        for mode in ("first_k", "width_oneshot", "depth_oneshot"):
            try:
                g = _in_space(space, oneshot_genome(shapes, mode, one_bin))
            except SearchSpaceError:
                continue
            if g is not None and space.hidden_ok(g) and budget.bin_of(space.params(g)) == b:
                key = space.key(g)
                if key not in seen:
                    seen.add(key)
                    out.append((mode, g))
    return out
