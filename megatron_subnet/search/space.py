"""Search spaces over a parent's sub-networks, exact parameter counts, and the parameter budget (bins).

Three spaces, coarse to fine:

- ``uniform``: one value each for the number of layers, hidden size, query groups, heads per group and
  MLP size (the same in every kept layer);
- ``per_layer``: number of layers and hidden size uniform; query groups, heads per group and MLP size per
  parent layer (expressed for the kept layers);
- ``index``: which layers, hidden channels, query groups, heads and MLP neurons.

A candidate ("genome") is a JSON-serialisable dict of counts: ``layers``, ``hidden``, ``groups``, ``hpg``
(heads per group) and ``ffn``; per-layer counts are lists over *all* parent layers, so a layer that is
dropped and later kept again finds its sizes. Which indices a count keeps follows a priority order: in
the count spaces the importance order when scores are given, else first-k (``SubnetConfig.from_counts``);
in the index space each genome carries its own priority orders (``order``), sampled from the importance
order (Gumbel top-k, so important indices tend to come first) or uniformly without scores, and mutated
by swapping a kept index with a dropped one. Hidden and MLP sizes lie on a grid (multiples of
``grid``); with ``hidden_divisible_by_heads`` (default on for llama parents, which transformers'
LlamaConfig needs for export) the hidden size is also a multiple of every kept layer's head count.
With ``divisible_by = N`` (``--divisible-by``) every candidate's query groups (hence heads) and MLP width
are multiples of N, so its extracted student splits into N tensor-parallel ranks; sampling, mutation,
crossover and repair all move within those values.

Repair moves a candidate into a parameter window one grid step at a time, each step on a gene drawn
from the RNG (deterministic for a seed); it returns None when it cannot (a cycle or too many steps).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.subnet import ImportanceScores, SubnetConfig

SPACES = ("uniform", "per_layer", "index")
GENES = ("groups", "hpg", "ffn")  # per-layer genes; "layers" and "hidden" are global
ORDER_OF = {"layers": "layers", "hidden": "hidden", "groups": "groups", "hpg": "heads", "ffn": "mlp"}
IMPORTANCE_BETA = 4.0  # index space: the most important index is e^4 ~ 55x likelier to be drawn first than the least

Genome = dict
Gene = tuple[str, int | None]  # (name, parent layer or None for a global gene)


class SearchSpaceError(ValueError):
    """A search space or budget that contradicts the parent, or that no sub-network can meet."""


@dataclass
class SpaceConfig:
    """Which space, its grid and bounds, and how parameters are counted."""

    kind: str = "uniform"
    grid: int = 8  # hidden and MLP sizes are multiples of this
    divisible_by: int = 1  # query groups (so heads) and MLP sizes are multiples of this (a TP=N student: N)
    min_layers: int = 1
    max_layers: int | None = None  # None: the parent's
    hidden_divisible_by_heads: bool | None = None  # None: on for llama parents (HF export needs it)
    include_embeddings: bool = False  # the parameter metric: non-embedding (default) or total

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["divisible_by"] == 1:  # the default: searches saved before the flag existed resume unchanged
            del d["divisible_by"]
        return d


def _order(scores, size: int) -> list[int]:
    """Indices by descending score (ties to the lower index), or 0..size-1 without scores."""
    if scores is None:
        return list(range(size))
    s = [float(x) for x in scores]
    if len(s) != size:
        raise SearchSpaceError(f"importance scores have {len(s)} entries, the parent has {size}")
    return sorted(range(size), key=lambda i: (-s[i], i))


class SearchSpace:
    """Sampling, mutation, crossover, repair and conversion to SubnetConfig for one parent."""

    def __init__(self, parent: ModelConfig, config: SpaceConfig, importance: ImportanceScores | None = None):
        self.parent, self.config, self.importance = parent, config, importance
        self.kind, self.grid, L = config.kind, config.grid, parent.num_layers
        if self.kind not in SPACES:
            raise SearchSpaceError(f"--space {self.kind!r}: expected one of {', '.join(SPACES)}")
        if self.grid < 1:
            raise SearchSpaceError(f"--grid {self.grid}: must be at least 1")
        if self.grid > parent.hidden_size:
            raise SearchSpaceError(f"--grid {self.grid}: larger than the parent's hidden size {parent.hidden_size}")
        self.max_layers = L if config.max_layers is None else config.max_layers
        if self.max_layers > L:
            raise SearchSpaceError(f"--max-layers {self.max_layers}: the parent has only {L} layers")
        if not 1 <= config.min_layers <= self.max_layers:
            raise SearchSpaceError(f"--min-layers {config.min_layers}: must be in 1..{self.max_layers} (--max-layers)")
        self.min_layers = config.min_layers
        self.divisible = (
            parent.arch == "llama"
            if config.hidden_divisible_by_heads is None
            else bool(config.hidden_divisible_by_heads)
        )
        self.divisible_by = config.divisible_by
        if self.divisible_by < 1:
            raise SearchSpaceError(f"--divisible-by {self.divisible_by}: must be at least 1")
        d = self.divisible_by
        self.ffn_step = math.lcm(self.grid, d)  # MLP sizes: multiples of the grid and of --divisible-by
        self.p_groups = [parent.layer_query_groups(p) for p in range(L)]
        self.max_groups = [groups // d * d for groups in self.p_groups]  # the most a candidate may keep
        self.p_hpg = [parent.layer_heads(p) // parent.layer_query_groups(p) for p in range(L)]
        self.p_ffn = [parent.layer_ffn(p) // self.ffn_step * self.ffn_step for p in range(L)]
        for p in range(L):
            if self.max_groups[p] < 1:
                raise SearchSpaceError(
                    f"--divisible-by {d}: layer {p} of the parent has only {self.p_groups[p]} query groups"
                )
            if self.p_ffn[p] < self.ffn_step:
                step = f"--grid {self.grid}" + (f" x --divisible-by {d}" if self.ffn_step != self.grid else "")
                raise SearchSpaceError(
                    f"{step}: larger than the parent's MLP size {parent.layer_ffn(p)} (layer {p})"
                )
        imp = importance
        self.layer_order = _order(imp.layers if imp else None, L)
        self.hidden_order = _order(imp.hidden if imp else None, parent.hidden_size)
        self._layer_cache: dict[tuple, int] = {}
        self._base_cache: dict[int, int] = {}

    # ------------------------------------------------------------------ genes and values

    def genes(self, g: Genome, active_only: bool = False) -> list[Gene]:
        """``layers``, ``hidden`` and the size genes (per parent layer, or only the kept layers' ones)."""
        out: list[Gene] = [("layers", None), ("hidden", None)]
        if self.kind == "uniform":
            return out + [(name, None) for name in GENES]
        layers = self.kept_layers(g) if active_only else range(self.parent.num_layers)
        return out + [(name, p) for p in layers for name in GENES]

    def get(self, g: Genome, gene: Gene) -> int:
        name, p = gene
        return g[name] if p is None else g[name][p]

    def _set(self, g: Genome, gene: Gene, value: int) -> None:
        name, p = gene
        if p is None:
            g[name] = value
        else:
            g[name][p] = value

    def values(self, g: Genome, gene: Gene) -> list[int]:
        """Allowed values of ``gene`` (ascending); the hidden size's depend on the kept layers' heads."""
        name, p = gene
        layers = range(self.parent.num_layers) if p is None else [p]
        if name == "layers":
            return list(range(self.min_layers, self.max_layers + 1))
        if name == "hidden":
            step = self.grid
            if self.divisible:
                for heads in self.kept_heads(g):
                    step = math.lcm(step, heads)
            return list(range(step, self.parent.hidden_size + 1, step))
        if name == "groups":
            d = self.divisible_by
            return list(range(d, min(self.max_groups[q] for q in layers) + 1, d))
        if name == "hpg":
            return list(range(1, min(self.p_hpg[q] for q in layers) + 1))
        return list(range(self.ffn_step, min(self.p_ffn[q] for q in layers) + 1, self.ffn_step))

    def layer_sizes(self, g: Genome, p: int) -> tuple[int, int, int]:
        """(query groups, heads per group, MLP size) of parent layer ``p`` in ``g``."""
        if self.kind == "uniform":
            return g["groups"], g["hpg"], g["ffn"]
        return g["groups"][p], g["hpg"][p], g["ffn"][p]

    def kept_layers(self, g: Genome) -> list[int]:
        order = g["order"]["layers"] if self.kind == "index" else self.layer_order
        return sorted(order[: g["layers"]])

    def kept_heads(self, g: Genome) -> set[int]:
        return {gr * k for gr, k, _ in (self.layer_sizes(g, p) for p in self.kept_layers(g))}

    def hidden_ok(self, g: Genome) -> bool:
        return not self.divisible or all(g["hidden"] % h == 0 for h in self.kept_heads(g))

    def fix_hidden(self, g: Genome) -> bool:
        """Move the hidden size to the nearest allowed value (ties downwards); False when none is allowed."""
        if self.hidden_ok(g):
            return True
        allowed = self.values(g, ("hidden", None))
        if not allowed:
            return False
        g["hidden"] = min(allowed, key=lambda v: (abs(v - g["hidden"]), v))
        return True

    # ------------------------------------------------------------------ parameter counts

    def _layer_params(self, hidden: int, groups: int, hpg: int, ffn: int) -> int:
        key = (hidden, groups, hpg, ffn)
        if key not in self._layer_cache:
            one = self._one_layer(hidden, groups, hpg, ffn)
            self._layer_cache[key] = one.layer_parameters(0)
        return self._layer_cache[key]

    def _base_params(self, hidden: int) -> int:
        """Final norm (and embeddings when counted): everything outside the transformer layers."""
        if hidden not in self._base_cache:
            one = self._one_layer(hidden, 1, 1, 1)
            self._base_cache[hidden] = one.num_parameters(self.config.include_embeddings) - one.layer_parameters(0)
        return self._base_cache[hidden]

    def _one_layer(self, hidden: int, groups: int, hpg: int, ffn: int) -> ModelConfig:
        return dataclasses.replace(
            self.parent,
            num_layers=1,
            hidden_size=hidden,
            num_attention_heads=groups * hpg,
            num_query_groups=groups,
            ffn_hidden_size=ffn,
            extra={},
        )

    def params(self, g: Genome) -> int:
        """Exact parameter count (the metric of ``SpaceConfig.include_embeddings``), from counts alone."""
        h = g["hidden"]
        return self._base_params(h) + sum(self._layer_params(h, *self.layer_sizes(g, p)) for p in self.kept_layers(g))

    def parent_params(self) -> int:
        return self.parent.num_parameters(self.config.include_embeddings)

    def param_counts(self, g: Genome) -> dict[str, int]:
        """Both parameter counts of ``g``'s sub-network (``SubnetConfig.num_parameters``), whatever the metric."""
        subnet = self.to_subnet(g)
        return {
            "total_params": subnet.num_parameters(self.parent, include_embeddings=True),
            "non_embedding_params": subnet.num_parameters(self.parent, include_embeddings=False),
        }

    def parent_param_counts(self) -> dict[str, int]:
        return {
            "total_params": self.parent.num_parameters(True),
            "non_embedding_params": self.parent.num_parameters(False),
        }

    def param_range(self) -> tuple[int, int]:
        """Smallest and (about) largest parameter count the space can reach."""
        smallest = self._base_params(self.grid) + self.min_layers * self._layer_params(
            self.grid, self.divisible_by, 1, self.ffn_step
        )
        g = self.full()
        g["layers"] = self.max_layers
        if self.kind != "uniform":  # keep the largest layers
            sizes = [self._layer_params(self.parent.hidden_size, *self.layer_sizes(g, p)) for p in range(len(g["ffn"]))]
            order = sorted(range(len(sizes)), key=lambda p: (-sizes[p], p))
            if self.kind == "index":
                g["order"]["layers"] = order
        largest = self.params(g) if self.fix_hidden(g) else 0
        return smallest, max(largest, smallest)

    # ------------------------------------------------------------------ genomes

    def full(self, rng: np.random.Generator | None = None) -> Genome:
        """The largest genome (index space: priority orders sampled from ``rng``, or importance / first-k)."""
        g = self._max_counts()
        if self.kind == "index":
            g["order"] = {"layers": self._sample_order(self.layer_order, rng), **self._index_orders(rng)}
        return g

    def _max_counts(self) -> Genome:
        hidden = self.parent.hidden_size // self.grid * self.grid
        if self.kind == "uniform":
            return {
                "layers": self.max_layers,
                "hidden": hidden,
                "groups": min(self.max_groups),
                "hpg": min(self.p_hpg),
                "ffn": min(self.p_ffn),
            }
        return {
            "layers": self.max_layers,
            "hidden": hidden,
            "groups": list(self.max_groups),
            "hpg": list(self.p_hpg),
            "ffn": list(self.p_ffn),
        }

    def _index_orders(self, rng: np.random.Generator | None) -> dict:
        """Priority orders of the hidden channels, and of every layer's query groups, heads and neurons."""
        imp, L = self.importance, self.parent.num_layers

        def order(scores, size: int) -> list[int]:
            return self._sample_order(_order(scores, size), rng)

        return {
            "hidden": self._sample_order(self.hidden_order, rng),
            "groups": [order(imp.query_groups[p] if imp else None, self.p_groups[p]) for p in range(L)],
            "heads": [
                [order(self._group_head_scores(p, gr), self.p_hpg[p]) for gr in range(self.p_groups[p])]
                for p in range(L)
            ],
            "mlp": [order(imp.mlp[p] if imp else None, self.parent.layer_ffn(p)) for p in range(L)],
        }

    def _group_head_scores(self, p: int, group: int):
        if self.importance is None:
            return None
        k = self.p_hpg[p]
        return self.importance.heads[p][group * k : (group + 1) * k]

    def _sample_order(self, base: list[int], rng: np.random.Generator | None) -> list[int]:
        """A priority order: ``base`` itself without an RNG, else Gumbel-perturbed importance or uniform."""
        if rng is None:
            return list(base)
        n = len(base)
        if self.importance is None:
            return [int(i) for i in rng.permutation(n)]
        keys = -IMPORTANCE_BETA * np.arange(n) / max(n, 1) + rng.gumbel(size=n)
        return [base[int(i)] for i in np.argsort(-keys, kind="stable")]

    def sample(
        self, rng: np.random.Generator, low: int | None = None, high: int | None = None, tries: int = 256
    ) -> Genome | None:
        """A random genome: each size uniform over its values (hidden last: it depends on the heads).

        With a window ``[low, high]``: the first of ``tries`` samples that falls inside it (uniform over
        the in-budget sub-networks), else the nearest one, repaired; None when that fails.
        """
        best, best_gap = None, None
        for _ in range(1 if low is None else tries):
            g = self._max_counts()
            if self.kind == "index":
                g["order"] = {"layers": self._sample_order(self.layer_order, rng)}
            if not self._random_counts(g, rng):
                continue
            p = self.params(g)
            gap = 0 if low is None else max(low - p, p - high, 0)
            if best_gap is None or gap < best_gap:
                best, best_gap = g, gap
            if gap == 0:
                break
        if best is None:
            return None
        if self.kind == "index":
            best["order"].update(self._index_orders(rng))
        return best if low is None else self.repair(best, rng, low, high)

    def _random_counts(self, g: Genome, rng: np.random.Generator) -> bool:
        for gene in self.genes(g)[2:] + [("layers", None), ("hidden", None)]:
            values = self.values(g, gene)
            if not values:
                return False
            self._set(g, gene, values[int(rng.integers(len(values)))])
        return True

    def mutate(self, g: Genome, rng: np.random.Generator, prob: float) -> Genome | None:
        """Each gene moves by one or two grid steps with probability ``prob``; index orders swap one index."""
        g = copy.deepcopy(g)
        for gene in self.genes(g):
            if rng.random() >= prob:
                continue
            values = self.values(g, gene)
            if not values:
                continue
            i = _nearest(values, self.get(g, gene))
            j = int(np.clip(i + int(rng.choice([-2, -1, 1, 2])), 0, len(values) - 1))
            self._set(g, gene, values[j])
        if self.kind == "index":
            for name, p, count, sub in self._orders(g):
                if rng.random() < prob:
                    order = g["order"][name] if p is None else g["order"][name][p]
                    if sub is not None:
                        order = order[sub]
                    if 0 < count < len(order):
                        i, j = int(rng.integers(count)), int(rng.integers(count, len(order)))
                        order[i], order[j] = order[j], order[i]
        return g if self.fix_hidden(g) else None

    def _orders(self, g: Genome) -> list[tuple[str, int | None, int, int | None]]:
        """(order name, parent layer, kept count, query group) for every priority order of an index genome."""
        out = [("layers", None, g["layers"], None), ("hidden", None, g["hidden"], None)]
        for p in range(self.parent.num_layers):
            out.append(("groups", p, g["groups"][p], None))
            out += [("heads", p, g["hpg"][p], gr) for gr in range(self.p_groups[p])]
            out.append(("mlp", p, g["ffn"][p], None))
        return out

    def crossover(self, a: Genome, b: Genome, rng: np.random.Generator) -> Genome | None:
        """Uniform crossover: each gene (with its priority order in the index space) from ``a`` or ``b``."""
        child = copy.deepcopy(a)
        for gene in self.genes(a):
            if rng.random() < 0.5:
                name, p = gene
                self._set(child, gene, self.get(b, gene))
                if self.kind == "index":
                    order = ORDER_OF[name]
                    if p is None:
                        child["order"][order] = copy.deepcopy(b["order"][order])
                    else:
                        child["order"][order][p] = copy.deepcopy(b["order"][order][p])
        return child if self.fix_hidden(child) else None

    def repair(self, g: Genome, rng: np.random.Generator, low: int, high: int, max_steps: int = 5000) -> Genome | None:
        """Grow or shrink ``g`` one grid step at a time until ``low <= params <= high``; None if it cannot.

        Each step tries the kept genes in an RNG-drawn order (each gene class -- layers, hidden, groups,
        heads per group, MLP -- equally likely first) and takes the first step that does not jump past the
        window, else the step that lands nearest to it; a revisited state means failure.
        """
        g = copy.deepcopy(g)
        if not self.fix_hidden(g):
            return None
        seen = set()
        for _ in range(max_steps):
            params = self.params(g)
            if low <= params <= high:
                return g
            state = json.dumps({k: v for k, v in g.items() if k != "order"})
            if state in seen:
                return None
            seen.add(state)
            down = params > high
            genes = self.genes(g, active_only=True)
            per_class = {name: sum(n == name for n, _ in genes) for name, _ in genes}
            weights = np.array([1.0 / per_class[name] for name, _ in genes])
            best, best_gap = None, None
            for i in rng.choice(len(genes), size=len(genes), replace=False, p=weights / weights.sum()):
                trial = self._step(g, genes[int(i)], down)
                if trial is None:
                    continue
                p = self.params(trial)
                if low <= p <= high or (down and p > high) or (not down and p < low):
                    best = trial
                    break
                gap = low - p if down else p - high
                if best_gap is None or gap < best_gap:
                    best, best_gap = trial, gap
            if best is None:
                return None
            g = best
        return None

    def _step(self, g: Genome, gene: Gene, down: bool) -> Genome | None:
        """``g`` with ``gene`` one allowed value smaller (or larger), or None when it cannot move."""
        values = self.values(g, gene)
        if not values:
            return None
        i = _nearest(values, self.get(g, gene)) + (-1 if down else 1)
        if not 0 <= i < len(values):
            return None
        trial = {k: (list(v) if isinstance(v, list) else v) for k, v in g.items()}  # orders are shared, unchanged
        self._set(trial, gene, values[i])
        return trial if self.hidden_ok(trial) else None

    # ------------------------------------------------------------------ output

    def to_subnet(self, g: Genome) -> SubnetConfig:
        """The SubnetConfig of ``g`` (counts through ``from_counts``, the index space explicitly)."""
        layers = self.kept_layers(g)
        sizes = [self.layer_sizes(g, p) for p in layers]
        if self.kind != "index":
            return SubnetConfig.from_counts(
                self.parent,
                len(layers),
                g["hidden"],
                [gr * k for gr, k, _ in sizes],
                [gr for gr, _, _ in sizes],
                [f for _, _, f in sizes],
                importance=self.importance,
            )
        o = g["order"]
        heads, groups, mlp = [], [], []
        for p, (n_groups, hpg, ffn) in zip(layers, sizes):
            kept = sorted(o["groups"][p][:n_groups])
            groups.append(kept)
            heads.append([gr * self.p_hpg[p] + h for gr in kept for h in sorted(o["heads"][p][gr][:hpg])])
            mlp.append(sorted(o["mlp"][p][:ffn]))
        subnet = SubnetConfig(layers, sorted(o["hidden"][: g["hidden"]]), heads, groups, mlp)
        subnet.validate(self.parent)
        return subnet

    def key(self, g: Genome) -> str:
        """Identity of the sub-network ``g`` expresses (dropped layers' genes do not count)."""
        if self.kind == "index":
            text = json.dumps(self.to_subnet(g).to_dict(), separators=(",", ":"))
        else:
            text = json.dumps([self.kind, g["hidden"], [(p, *self.layer_sizes(g, p)) for p in self.kept_layers(g)]])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def summary(self, g: Genome) -> dict:
        """A short description: kept layers and the sizes (one number when every kept layer agrees)."""
        layers = self.kept_layers(g)
        sizes = [self.layer_sizes(g, p) for p in layers]
        return {
            "num_layers": len(layers),
            "layers": layers,
            "hidden_size": g["hidden"],
            "num_query_groups": _collapse([gr for gr, _, _ in sizes]),
            "num_attention_heads": _collapse([gr * k for gr, k, _ in sizes]),
            "ffn_hidden_size": _collapse([f for _, _, f in sizes]),
        }


def _nearest(values: list[int], v: int) -> int:
    return min(range(len(values)), key=lambda i: (abs(values[i] - v), i))


def _collapse(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


# ---------------------------------------------------------------------- budget


@dataclass
class Budget:
    """Parameter bins: bin ``i`` holds counts in ``[edges[i], edges[i + 1])`` (the last bin includes its end)."""

    edges: list[int]

    @property
    def bins(self) -> int:
        return len(self.edges) - 1

    def window(self, i: int) -> tuple[int, int]:
        """Inclusive parameter range of bin ``i``."""
        return self.edges[i], self.edges[i + 1] - (0 if i == self.bins - 1 else 1)

    def bin_of(self, params: int) -> int | None:
        for i in range(self.bins):
            low, high = self.window(i)
            if low <= params <= high:
                return i
        return None

    def to_dict(self) -> dict:
        return {"edges": self.edges}


def make_budget(
    parent_params: int,
    target: float | None = None,
    tolerance: float = 0.05,
    bins: int | None = None,
    min_params: float | None = None,
    max_params: float | None = None,
) -> Budget:
    """A target with relative tolerance, or ``bins`` equal bins over ``[min_params, max_params]``.

    Values up to 1 are fractions of ``parent_params``; larger values are absolute parameter counts.
    """

    def absolute(value: float, flag: str) -> float:
        if not (math.isfinite(value) and value > 0):
            raise SearchSpaceError(f"{flag} {value}: must be a positive finite number")
        return value * parent_params if value <= 1 else value

    if target is not None:
        if bins is not None or min_params is not None or max_params is not None:
            raise SearchSpaceError("--target-params: give either a target or --bins/--min-params/--max-params")
        if not 0 <= tolerance < 1:
            raise SearchSpaceError(f"--tolerance {tolerance}: must be in [0, 1)")
        t = absolute(target, "--target-params")
        low, high = math.ceil(t * (1 - tolerance)), math.floor(t * (1 + tolerance))
        if low > high:
            raise SearchSpaceError(f"--tolerance {tolerance}: leaves no integer parameter count around {t:.1f}")
        return Budget([low, high])
    if bins is None or min_params is None or max_params is None:
        raise SearchSpaceError("no budget: give --target-params, or --bins with --min-params and --max-params")
    if bins < 1:
        raise SearchSpaceError(f"--bins {bins}: must be at least 1")
    low, high = absolute(min_params, "--min-params"), absolute(max_params, "--max-params")
    if low >= high:
        raise SearchSpaceError(f"--min-params {min_params} must be below --max-params {max_params}")
    edges = [round(e) for e in np.linspace(low, high, bins + 1)]
    if len(set(edges)) != len(edges):
        raise SearchSpaceError(f"--bins {bins}: bins over [{low:.0f}, {high:.0f}] parameters would be empty")
    return Budget(edges)


def check_budget(space: SearchSpace, budget: Budget) -> None:
    """Raise SearchSpaceError when a bin lies outside everything the space can reach."""
    smallest, largest = space.param_range()
    metric = "total" if space.config.include_embeddings else "non-embedding"
    for i in range(budget.bins):
        low, high = budget.window(i)
        if high < smallest or low > largest:
            where = "target" if budget.bins == 1 else f"bin {i}"
            raise SearchSpaceError(
                f"parameter budget: the {where} [{low:,}, {high:,}] {metric} parameters is outside what the "
                f"{space.kind} space can reach ([{smallest:,}, {largest:,}] of the parent's "
                f"{space.parent_params():,}); change --target-params/--tolerance or --bins/--min-params/--max-params"
            )
