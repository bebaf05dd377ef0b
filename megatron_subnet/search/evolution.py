"""Evolutionary search (and random search at the same cost) for the best sub-network under a parameter budget.

Generation 0 samples ``population`` candidates, spread round-robin over the budget's bins. Each later
generation keeps the ``elite`` best of every bin and breeds ``population - elite * bins`` new candidates:
tournament selection, uniform crossover (probability ``crossover_prob``), per-gene mutation
(``mutation_prob``), then repair into the child's bin (bins again round-robin). Random search samples
the same number of new candidates per generation, so both spend exactly
``population + (generations - 1) * (population - elite * bins)`` fitness evaluations.

Fitness values are cached by the sub-network's key. A candidate already evaluated is bred again (up to
``max_tries``, the second half of the tries sampling fresh candidates), so every evaluation counted is a
new sub-network; only when the space around a bin is exhausted is a duplicate taken from the cache,
marked ``cached`` in ``results.jsonl`` and not counted. Everything is driven by one numpy Generator; its
state, the population, the cache and the best per bin are written to ``state.json`` (atomically) after
every generation, so a killed search resumes where it stopped and ends with the same result as an
uninterrupted one. Under data parallelism every rank runs the same search (same RNG), only the fitness
evaluations are split (``fitness.py``), and rank 0 writes the files.

A fresh run writes ``state.json`` for generation 0 before the first evaluation, so an output directory
with search results always holds the state they came from. A search in which no candidate got a finite
loss raises ``SearchSpaceError`` and writes no best sub-network.

Accounting: a fitness may return ``(loss, seconds, flops)``; every results.jsonl row carries its ``flops``
(0 for a cached duplicate), its ``params`` in the budget's metric and both ``total_params`` and
``non_embedding_params``; ``state.json`` and ``summary.json`` carry the cumulative ``search_flops`` of the
committed generations (a resumed search keeps counting; a generation cut short by a kill is evaluated, and
counted, again). With ``rescore_top = K`` the search keeps each bin's K best candidates (``top`` in the
state), and ``rescore`` scores them once more on held-out batches (a second fitness): ``rescored.json``
holds both losses side by side, and a killed re-scoring resumes with the candidates it has not scored yet.

The one-shot modes (``ONESHOT_MODES``, ``oneshot.py``) run as a search of one generation whose only
candidates are ``fixed`` genomes: one evaluation, the same outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_subnet.model.subnet import SubnetConfig
from megatron_subnet.outputs import write_file_atomically, write_text_atomically
from megatron_subnet.parallel import state
from megatron_subnet.search.space import Budget, SearchSpace, SearchSpaceError, check_budget

SEARCH_MODES = ("evolution", "random")
ONESHOT_MODES = ("width_oneshot", "depth_oneshot", "first_k")  # one fixed candidate each (oneshot.py)
MODES = SEARCH_MODES + ONESHOT_MODES
STATE_VERSION = 1
STATE_NAME = "state.json"
OUTPUT_NAMES = (  # beside state.json
    "results.jsonl",
    "best_subnet.json",
    "best_per_bin.json",
    "pareto.png",
    "summary.json",
    "rescored.json",
)

SELECT_BY = ("heldout", "selection")
# candidates -> [(validation loss, seconds)] or [(validation loss, seconds, FLOPs)] in the same order
Fitness = Callable[[list[SubnetConfig]], list[tuple]]


@dataclass
class EvolutionConfig:
    population: int = 16
    generations: int = 10
    mutation_prob: float = 0.2  # per gene
    crossover_prob: float = 0.5
    tournament_size: int = 3
    elite: int = 2  # per bin
    mode: str = "evolution"
    seed: int = 0
    max_tries: int = 100  # per new candidate, before a duplicate is accepted or the bin is declared unreachable

    def validate(self, bins: int) -> None:
        if self.mode not in MODES:
            raise SearchSpaceError(f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        for flag, value in (
            ("--population", self.population),
            ("--generations", self.generations),
            ("--tournament-size", self.tournament_size),
            ("--max-tries", self.max_tries),
        ):
            if value < 1:
                raise SearchSpaceError(f"{flag} {value}: must be at least 1")
        for flag, value in (("--mutation-prob", self.mutation_prob), ("--crossover-prob", self.crossover_prob)):
            if not 0 <= value <= 1:
                raise SearchSpaceError(f"{flag} {value}: must be in [0, 1]")
        if self.population < bins:
            raise SearchSpaceError(f"--population {self.population}: needs at least one candidate per bin ({bins})")
        if self.elite < 0 or self.elite * bins >= self.population:
            raise SearchSpaceError(
                f"--elite {self.elite}: {self.elite} per bin x {bins} bins must stay below "
                f"--population {self.population}"
            )

    def new_per_generation(self, generation: int, bins: int) -> int:
        return self.population if generation == 0 else self.population - self.elite * bins

    def total_evaluations(self, bins: int) -> int:
        return sum(self.new_per_generation(g, bins) for g in range(self.generations))


def _write_json(path: Path, obj, indent: int | None = None) -> None:
    write_text_atomically(path, json.dumps(obj, indent=indent) + "\n")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _sort_key(member: dict) -> tuple[float, str]:
    loss = member["loss"]
    return (loss if math.isfinite(loss) else math.inf, member["key"])


class Search:
    """One search run: ``run()`` goes from the saved generation (or 0) to ``config.generations``."""

    def __init__(
        self,
        space: SearchSpace,
        budget: Budget,
        config: EvolutionConfig,
        fitness: Fitness | None,
        output: str | os.PathLike | None = None,
        settings: dict | None = None,
        progress: bool | None = None,
        restart: bool = False,
        fixed: list[dict] | None = None,
        rescore_top: int = 0,
        select_by: str = "selection",
        seeds: list[tuple[str, dict]] | None = None,
    ):
        """``fitness`` may be set later (before ``run``): constructing checks a saved state against the
        settings without it. ``restart``: ignore and replace a saved state (``--overwrite``). ``fixed``: the
        genomes of a one-shot mode (its only generation evaluates exactly them). ``rescore_top``: keep each
        bin's that many best candidates for ``rescore``. ``select_by``: ``"selection"`` picks each bin's winner
        by the loss the search ranked on, ``"heldout"`` by the re-scored loss of its ``rescore_top`` best.
        ``seeds``: ``(name, genome)`` known points (the one-shot shapes) that open generation 0."""
        config.validate(budget.bins)
        if (fixed is not None) != (config.mode in ONESHOT_MODES):
            raise SearchSpaceError(f"--mode {config.mode}: one-shot modes, and only they, evaluate fixed candidates")
        if fixed is not None and (config.generations != 1 or config.population != len(fixed) or config.elite):
            raise SearchSpaceError(f"--mode {config.mode}: one generation of {len(fixed)} candidates, no elite")
        if rescore_top < 0:
            raise SearchSpaceError(f"--rescore-top {rescore_top}: must be >= 0")
        if select_by not in SELECT_BY:
            raise SearchSpaceError(f"--select-by {select_by!r}: expected one of {', '.join(SELECT_BY)}")
        if select_by == "heldout" and not rescore_top:
            raise SearchSpaceError(
                "--select-by heldout picks each bin's winner among its re-scored candidates: give --rescore-top "
                ">= 1, or --select-by selection to pick by the search's own loss"
            )
        self.fixed, self.rescore_top, self.select_by = fixed, rescore_top, select_by
        self.seeds = [] if fixed is not None else list(seeds or [])
        self.space, self.budget, self.config, self.fitness = space, budget, config, fitness
        self.output = Path(output) if output is not None else None
        self.writer = self.output is not None and state.get_rank() == 0
        self.progress = progress
        run_settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "generations"}
        self.settings = json.loads(
            json.dumps(
                {
                    "space": space.config.to_dict(),
                    "budget": budget.to_dict(),
                    "search": run_settings,
                    "parent": space.parent.to_dict(),
                    **(settings or {}),
                }
            )
        )
        self.rng = np.random.default_rng(config.seed)
        self.generation = 0
        self.evaluations = 0
        self.population: list[dict] = []  # {genome, key, params, bin, loss}
        self.cache: dict[str, dict] = {}  # key -> {loss, params, bin, generation, seconds}
        self.best: list[dict | None] = [None] * budget.bins  # {key, params, loss, generation, genome}
        self.top: list[list[dict]] = [[] for _ in range(budget.bins)]  # the rescore_top best per bin, like best
        self.search_flops = 0  # FLOPs of the committed evaluations
        self.rescored: dict[str, dict] = {}  # key -> {loss, seconds, flops} on the held-out batches
        self.records: list[dict] = []  # results.jsonl lines
        self._counts: dict[str, dict[str, int]] = {}  # key -> both parameter counts
        self.restart = restart
        self.resumed = False
        self._resume()

    # ------------------------------------------------------------------ state

    def _resume(self) -> None:
        saved = None
        if self.output is not None and state.get_rank() == 0 and not self.restart:
            path = self.output / STATE_NAME
            if path.is_file():
                try:
                    saved = json.loads(path.read_text())
                except json.JSONDecodeError as e:
                    saved = {"error": f"{path}: unreadable search state ({e})"}
        saved = state.broadcast_object(saved)
        if saved is None:
            return  # run() starts the output
        if "error" in saved:
            raise SearchSpaceError(saved["error"])
        expected = self.settings
        if isinstance(saved.get("settings"), dict) and "rescore" not in saved["settings"] and "top" not in saved:
            # written before held-out re-scoring existed: resumes, its top lists rebuilt from the best per bin
            expected = {k: v for k, v in self.settings.items() if k != "rescore"}
        if saved.get("version") != STATE_VERSION or saved.get("settings") != expected:
            old, new = _flatten(saved.get("settings") or {}), _flatten(expected)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise SearchSpaceError(
                f"{self.output}/state.json: written by a search with other settings ({', '.join(diff) or 'version'}); "
                "use the same flags to resume (only --generations may grow) or a new --output"
            )
        self.rng.bit_generator.state = saved["rng"]
        self.generation, self.evaluations = saved["generation"], saved["evaluations"]
        self.population, self.cache, self.best = saved["population"], saved["cache"], saved["best"]
        if "top" in saved:
            self.top = saved["top"]
        else:
            self.top = [[copy.deepcopy(b)] if b is not None and self.rescore_top else [] for b in self.best]
        self.search_flops = saved.get("search_flops", 0)
        self.rescored = saved.get("rescored", {})
        self.resumed = True

    def _start_output(self) -> None:
        """A fresh output: the previous search's files gone (``restart``), state.json for generation 0."""
        self.output.mkdir(parents=True, exist_ok=True)
        for name in (STATE_NAME, *OUTPUT_NAMES):  # only there with restart, or a run killed in generation 0
            (self.output / name).unlink(missing_ok=True)
        self._save([])

    def _trim_results(self) -> None:
        if self.writer:
            results = self.output / "results.jsonl"
            lines = results.read_text().splitlines() if results.is_file() else []
            self.records = [r for r in map(json.loads, lines) if r["generation"] < self.generation]
            # drop a generation that was written but not committed to state.json
            write_text_atomically(results, "".join(json.dumps(r) + "\n" for r in self.records))

    def _save(self, new_records: list[dict]) -> None:
        if not self.writer:
            return
        with open(self.output / "results.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in new_records)
        self._write_state()
        self._write_best()

    def _write_state(self) -> None:
        if not self.writer:
            return
        state = {
            "version": STATE_VERSION,
            "settings": self.settings,
            "generation": self.generation,
            "evaluations": self.evaluations,
            "rng": self.rng.bit_generator.state,
            "population": self.population,
            "cache": self.cache,
            "best": self.best,
            "top": self.top,
            "search_flops": self.search_flops,
            "rescored": self.rescored,
        }
        _write_json(self.output / STATE_NAME, state)

    # ------------------------------------------------------------------ loop

    def run(self) -> list[dict | None]:
        """Run the remaining generations; returns the best per bin ({key, params, loss, generation, genome})."""
        check_budget(self.space, self.budget)
        if self.fitness is None:
            raise TypeError("Search.run: no fitness function set")
        if self.writer:
            if self.resumed:
                self._trim_results()
            else:
                self._start_output()
        total = self.config.total_evaluations(self.budget.bins)
        disable = (not self.progress if self.progress is not None else None) if state.get_rank() == 0 else True
        bar = tqdm(
            total=total,
            initial=self.evaluations,
            desc=f"search ({self.config.mode})",
            unit="eval",
            disable=disable,
            dynamic_ncols=True,
        )
        while self.generation < self.config.generations:
            new_records = self._step(self.generation, bar)
            self.generation += 1
            self._save(new_records)
        bar.close()
        best = self.overall_best()
        if best is None or not math.isfinite(best["loss"]):
            raise SearchSpaceError(
                f"every one of the {self.evaluations} candidates got a non-finite validation loss (NaN or "
                "infinity: the parent's weights hold NaN/inf or its activations overflow); no best sub-network "
                "was written"
            )
        if self.writer:
            self._write_best()
            plot_pareto(self.output / "pareto.png", {self.config.mode: self.records})
        return self.best

    def _step(self, generation: int, bar: tqdm) -> list[dict]:
        """Make, evaluate and select one generation; returns its results.jsonl records."""
        cfg = self.config
        evolve = cfg.mode == "evolution" and generation > 0
        kept = self._elites() if evolve else []
        children = self._children(generation, evolve)
        todo, keys = [], set()
        for c in children:
            if c["key"] not in self.cache and c["key"] not in keys:
                todo.append(c)
                keys.add(c["key"])
        # one candidate per data-parallel replica at a time: the bar moves as they finish
        results, chunk = [], state.get_data_parallel_world_size()
        for i in range(0, len(todo), chunk):
            results += self.fitness([self.space.to_subnet(c["genome"]) for c in todo[i : i + chunk]])
            prior = self.overall_best()
            best = min([r[0] for r in results] + ([prior["loss"]] if prior else []))
            bar.update(len(todo[i : i + chunk]))
            bar.set_postfix(gen=generation, best=f"{best:.4f}")
        for c, result in zip(todo, results):
            loss, seconds = result[0], result[1]
            loss = float(loss) if math.isfinite(loss) else math.inf
            flops = int(result[2]) if len(result) > 2 else 0
            self.cache[c["key"]] = {
                "loss": loss,
                "params": c["params"],
                "bin": self.budget.bin_of(c["params"]),
                "generation": generation,
                "seconds": seconds,
                "flops": flops,
            }
            self.search_flops += flops
        self.evaluations += len(todo)
        records, fresh = [], set(keys)
        for c in children:
            entry = self.cache[c["key"]]
            c["loss"], c["bin"] = entry["loss"], entry["bin"]
            records.append(
                {
                    "generation": generation,
                    "mode": cfg.mode,
                    "key": c["key"],
                    "bin": c["bin"],
                    "params": c["params"],
                    **self.param_counts(c["key"], c["genome"]),
                    "loss": c["loss"],
                    "seconds": entry["seconds"] if c["key"] in fresh else 0.0,
                    "flops": entry.get("flops", 0) if c["key"] in fresh else 0,
                    "cached": c["key"] not in fresh,
                    "config": self.space.summary(c["genome"]),
                    **({"seeded_from": c["origin"]} if c["origin"] else {}),
                }
            )
            fresh.discard(c["key"])
            member = {
                "key": c["key"],
                "params": c["params"],
                "loss": c["loss"],
                "generation": generation,
                "genome": c["genome"],
            }
            best = self.best[c["bin"]]
            if best is None or _sort_key(c) < _sort_key(best):
                self.best[c["bin"]] = copy.deepcopy(member)
            top = self.top[c["bin"]]
            if self.rescore_top and all(m["key"] != c["key"] for m in top):
                top.append(copy.deepcopy(member))
                top.sort(key=_sort_key)
                del top[self.rescore_top :]
        self.population = kept + children
        self.records += records
        return records

    def _children(self, generation: int, evolve: bool) -> list[dict]:
        """The new candidates of a generation: a one-shot mode's fixed genomes, else the seeds (generation 0)
        and then bred (evolution) or sampled ones, each unseen if at all possible."""
        seen, children = set(self.cache), []
        seeds = self.seeds if generation == 0 else []
        for k in range(self.config.new_per_generation(generation, self.budget.bins)):
            origin = None
            if self.fixed is not None:
                genome = copy.deepcopy(self.fixed[k])
                key = self.space.key(genome)
            elif k < len(seeds):
                origin, genome = seeds[k][0], copy.deepcopy(seeds[k][1])
                key = self.space.key(genome)
            else:
                genome, key = self._make((generation + k) % self.budget.bins, seen, evolve)
            seen.add(key)
            children.append({"genome": genome, "key": key, "params": self.space.params(genome), "origin": origin})
        return children

    def _elites(self) -> list[dict]:
        kept = []
        for b in range(self.budget.bins):
            members = sorted((m for m in self.population if m["bin"] == b), key=_sort_key)
            kept += members[: self.config.elite]
        return kept

    def _make(self, b: int, seen: set[str], evolve: bool) -> tuple[dict, str]:
        """A new candidate repaired into bin ``b``: bred (evolution) or sampled; unseen if at all possible."""
        low, high = self.budget.window(b)
        last = None
        for t in range(self.config.max_tries):
            if evolve and t < self.config.max_tries // 2:
                genome = self._breed()
                genome = None if genome is None else self.space.repair(genome, self.rng, low, high)
            else:
                genome = self.space.sample(self.rng, low, high)
            if genome is None:
                continue
            last = genome, self.space.key(genome)
            if last[1] not in seen:
                return last
        if last is None:
            metric = "total" if self.space.config.include_embeddings else "non-embedding"
            raise SearchSpaceError(
                f"parameter budget: no sub-network of the {self.space.kind} space found with {low:,}..{high:,} "
                f"{metric} parameters in {self.config.max_tries} tries; widen --tolerance, use fewer --bins, "
                "or a finer --grid"
            )
        return last

    def _breed(self) -> dict | None:
        child = self._tournament()
        if self.rng.random() < self.config.crossover_prob:
            child = self.space.crossover(child, self._tournament(), self.rng)
        return None if child is None else self.space.mutate(child, self.rng, self.config.mutation_prob)  # copies

    def _tournament(self) -> dict:
        size = min(self.config.tournament_size, len(self.population))
        picks = self.rng.choice(len(self.population), size=size, replace=False)
        return min((self.population[int(i)] for i in picks), key=_sort_key)["genome"]

    # ------------------------------------------------------------------ results

    def overall_best(self) -> dict | None:
        """The best candidate by the search's own loss."""
        found = [b for b in self.best if b is not None]
        return min(found, key=_sort_key) if found else None

    def selected_by(self) -> str:
        """How the winners were picked: ``"heldout"`` once re-scored with ``select_by="heldout"``."""
        return "heldout" if self.select_by == "heldout" and self.rescored else "selection"

    def winners(self) -> list[dict | None]:
        """Each bin's winner: by the held-out loss among its re-scored candidates (``select_by="heldout"``, once
        ``rescore`` ran; ties by key), else by the search's own loss."""
        if self.selected_by() != "heldout":
            return self.best
        out = []
        def heldout(m: dict) -> float:
            return self.rescored.get(m["key"], {}).get("loss", math.inf)

        for b, top in enumerate(self.top):
            scored = [m for m in top[: self.rescore_top] if math.isfinite(heldout(m))]
            out.append(min(scored, key=lambda m: (heldout(m), m["key"])) if scored else self.best[b])
        return out

    def overall_winner(self) -> dict | None:
        """The winner over all bins, by the loss it was picked by."""
        found = [w for w in self.winners() if w is not None]
        if not found:
            return None
        heldout = [(self.rescored.get(m["key"], {}).get("loss", math.inf), m["key"], i) for i, m in enumerate(found)]
        if self.selected_by() == "heldout" and any(math.isfinite(h[0]) for h in heldout):
            return found[min(heldout)[2]]
        return min(found, key=_sort_key)

    def param_counts(self, key: str, genome: dict) -> dict[str, int]:
        """``total_params`` and ``non_embedding_params`` of a candidate (cached by key)."""
        if key not in self._counts:
            self._counts[key] = self.space.param_counts(genome)
        return dict(self._counts[key])

    def best_per_bin(self) -> list[dict]:
        """One entry per bin: window, and the best candidate's params (the budget's metric, total and
        non-embedding), loss, summary and explicit sub-network."""
        out = []
        for b, best in enumerate(self.winners()):
            entry = {"bin": b, "window": list(self.budget.window(b))}
            if best is not None:
                entry.update(
                    key=best["key"],
                    params=best["params"],
                    **self.param_counts(best["key"], best["genome"]),
                    loss=best["loss"],
                    **({"heldout_loss": self.rescored[best["key"]]["loss"]} if best["key"] in self.rescored else {}),
                    selected_by=self.selected_by(),
                    generation=best["generation"],
                    config=self.space.summary(best["genome"]),
                    subnet=self.space.to_subnet(best["genome"]).to_dict(),
                )
            out.append(entry)
        return out

    def _write_best(self) -> None:
        best = self.overall_winner()
        if best is None or not math.isfinite(best["loss"]):
            return
        self.space.to_subnet(best["genome"]).save(self.output / "best_subnet.json")
        _write_json(self.output / "best_per_bin.json", self.best_per_bin(), indent=1)
        _write_json(self.output / "summary.json", self.summary(), indent=1)

    def summary(self) -> dict:
        """The search at a glance: mode, evaluations, FLOPs spent, the parent's and the best's parameters."""
        best = self.overall_winner()
        out = {
            "mode": self.config.mode,
            "selected_by": self.selected_by(),
            "generation": self.generation,
            "evaluations": self.evaluations,
            "search_flops": self.search_flops,
            "rescore_flops": sum(r.get("flops", 0) for r in self.rescored.values()),
            "budget_metric": "total" if self.space.config.include_embeddings else "non-embedding",
            "parent": self.space.parent_param_counts(),
            "best": None,
        }
        if best is not None:
            out["best"] = {
                "key": best["key"],
                "loss": best["loss"],
                "params": best["params"],
                **self.param_counts(best["key"], best["genome"]),
                "generation": best["generation"],
                "config": self.space.summary(best["genome"]),
            }
            if best["key"] in self.rescored:
                out["best"]["heldout_loss"] = self.rescored[best["key"]]["loss"]
        return out

    # ------------------------------------------------------------------ held-out re-scoring

    def rescore_candidates(self) -> list[tuple[int, int, dict]]:
        """(bin, rank in the bin, member) of every bin's ``rescore_top`` best candidates with a finite loss."""
        return [
            (b, rank, m)
            for b, top in enumerate(self.top)
            for rank, m in enumerate(top[: self.rescore_top])
            if math.isfinite(m["loss"])
        ]

    def rescore(self, fitness: Fitness, heldout: dict) -> dict:
        """Score each bin's ``rescore_top`` best once more with ``fitness`` (on held-out batches, described by
        ``heldout``: split, samples, tokens, ...); writes ``rescored.json`` and returns its content.

        Every scored candidate is committed to ``state.json`` at once, so a killed re-scoring resumes where it
        stopped; candidates scored before (same held-out batches: they are part of the settings) are not
        scored again.
        """
        members = self.rescore_candidates()
        todo = [m for _, _, m in members if m["key"] not in self.rescored]
        chunk = state.get_data_parallel_world_size()
        for i in range(0, len(todo), chunk):
            part = todo[i : i + chunk]
            results = fitness([self.space.to_subnet(m["genome"]) for m in part])
            for m, result in zip(part, results):
                loss = float(result[0]) if math.isfinite(result[0]) else math.inf
                self.rescored[m["key"]] = {
                    "loss": loss,
                    "seconds": result[1],
                    "flops": int(result[2]) if len(result) > 2 else 0,
                }
            self._write_state()
        rows = []
        for b, rank, m in members:
            scored = self.rescored[m["key"]]
            rows.append(
                {
                    "bin": b,
                    "rank": rank,
                    "key": m["key"],
                    "params": m["params"],
                    **self.param_counts(m["key"], m["genome"]),
                    "selection_loss": m["loss"],
                    "heldout_loss": scored["loss"],
                    "generation": m["generation"],
                    "flops": scored["flops"],
                    "config": self.space.summary(m["genome"]),
                }
            )
        report = {
            **heldout,
            "rescore_top": self.rescore_top,
            "rescore_flops": sum(r.get("flops", 0) for r in self.rescored.values()),
            "search_flops": self.search_flops,
            "candidates": rows,
        }
        if self.writer:
            _write_json(self.output / "rescored.json", report, indent=1)
            self._write_best()  # with select_by="heldout" the winners may change now
        return report


def read_results(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (params, loss) points no other point beats on both (fewer or equal params and lower loss)."""
    front, best = [], math.inf
    for params, loss in sorted(points):
        if loss < best:
            front.append((params, loss))
            best = loss
    return front


def plot_pareto(
    path: str | os.PathLike,
    runs: dict[str, list[dict]],
    references: dict[str, tuple[float, float]] | None = None,
    title: str = "sub-network search: parameters vs validation loss",
) -> None:
    """Scatter every evaluated candidate (one colour per run), each run's Pareto front, and reference points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, records) in enumerate(runs.items()):
        points = [(r["params"], r["loss"]) for r in records if not r.get("cached") and math.isfinite(r["loss"])]
        if not points:
            continue
        color = f"C{i}"
        ax.scatter(
            [p / 1e6 for p, _ in points],
            [v for _, v in points],
            s=12,
            alpha=0.35,
            color=color,
            label=f"{label} ({len(points)} evaluated)",
        )
        front = pareto_front(points)
        ax.step([p / 1e6 for p, _ in front], [v for _, v in front], where="post", color=color, lw=1.5)
        ax.scatter([p / 1e6 for p, _ in front], [v for _, v in front], s=30, color=color, edgecolor="black")
    for j, (label, (params, loss)) in enumerate((references or {}).items()):
        ax.scatter(
            [params / 1e6],
            [loss],
            marker="*",
            s=140,
            color=f"C{len(runs) + j}",
            edgecolor="black",
            label=label,
            zorder=5,
        )
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png"))
    finally:
        plt.close(fig)
