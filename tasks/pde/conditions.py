"""Conditions as data: the train / validation / test condition sets of `deepzero-task pde`.

A solver declares which of its parameters are *conditions* (`Solver.condition_defaults`: Burgers' ``nu``,
the wake's ``re``) and the config holds one condition set per split under ``solver.conditions``:

    solver.conditions.train.re:      {range: [100, 1000], scale: log}   # drawn per simulation
    solver.conditions.test.re:       [{range: [1500, 3000], scale: log}, {range: [40, 90], scale: log}]
    solver.conditions.validation.nu: 0.1                               # one value for every simulation

A value is one value for every simulation of the split; a list is cycled over the split's simulations
(simulation i gets item i mod n, itself a value or a range); a range ``{range: [low, high], scale:
linear|log}`` is drawn per simulation from its seed (condition k of the declaration order draws from
``numpy.random.default_rng([seed, 2 + k])``; streams 0 and 1 are the initial state and the forcing), so a
simulation is the same whichever run, split or method asks for it. The drawn values are passed to the
solver's ``conditions`` and every ``step``, recorded in eval.json and part of the reference-cache key.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepzero_apps.config import ConfigError
from deepzero_apps.solvers.registry import CONDITION_SPLITS

SPLITS = CONDITION_SPLITS  # train, validation, test
SCALES = ("linear", "log")


@dataclass(frozen=True)
class Split:
    """The simulations of one split: their seeds and drawn condition values (one dict per simulation)."""

    name: str
    seeds: list[int]
    values: list[dict[str, Any]]

    def simulations(self) -> list[dict[str, Any]]:
        """``[{"seed": s, **values}]``, as eval.json records them."""
        return [{"seed": s, **v} for s, v in zip(self.seeds, self.values)]


def _check_item(where: str, item: Any) -> None:
    if isinstance(item, Mapping):
        keys = set(item)
        if "range" not in keys or not keys <= {"range", "scale"}:
            raise ConfigError(f"{where}={dict(item)} must be a value, a list or {{range: [low, high], scale: linear|log}}")
        low_high, scale = item["range"], item.get("scale", "linear")
        ok = (
            isinstance(low_high, Sequence) and not isinstance(low_high, str) and len(low_high) == 2
            and all(isinstance(v, numbers.Real) and math.isfinite(v) for v in low_high)
            and low_high[0] <= low_high[1]
        )
        if not ok:
            raise ConfigError(f"{where}.range={list(low_high) if isinstance(low_high, Sequence) else low_high} must be [low, high] with finite low <= high")
        if scale not in SCALES:
            raise ConfigError(f"{where}.scale={scale!r} must be one of {', '.join(SCALES)}")
        if scale == "log" and low_high[0] <= 0:
            raise ConfigError(f"{where}.range={list(low_high)} must be positive for scale=log")
    elif not isinstance(item, (numbers.Real, str)) or isinstance(item, bool):
        raise ConfigError(f"{where}={item!r} must be a number, a string, a list or a range")


def resolve_conditions(solver: str, declared: Mapping[str, Any], sets: Mapping[str, Any] | None) -> dict[str, dict]:
    """The three condition sets, every declared condition filled from `declared` where unset; a
    ConfigError (one line, naming the bad key and value) for an unknown split or condition or a bad set."""
    sets = dict(sets or {})
    for split in sets:
        if split not in SPLITS:
            raise ConfigError(f"solver.conditions.{split}: unknown split; use {', '.join(SPLITS)}")
    out: dict[str, dict] = {}
    for split in SPLITS:
        given = dict(sets.get(split) or {})
        for name in given:
            if name not in declared:
                have = ", ".join(declared) or "none"
                raise ConfigError(
                    f"solver.conditions.{split}.{name}: solver '{solver}' has no condition '{name}' (its conditions: {have})"
                )
        out[split] = {name: given.get(name, default) for name, default in declared.items()}
        for name, spec in out[split].items():
            where = f"solver.conditions.{split}.{name}"
            items = spec if isinstance(spec, Sequence) and not isinstance(spec, str) else [spec]
            if not items:
                raise ConfigError(f"{where}=[] must hold at least one value")
            for item in items:
                _check_item(where, item)
    return out


def draw(spec: Any, seed: int, index: int, stream: int) -> Any:
    """The value of one condition for the simulation at position `index` of its split, with `seed`."""
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        spec = spec[index % len(spec)]
    if not isinstance(spec, Mapping):
        return spec
    low, high = (float(v) for v in spec["range"])
    u = np.random.default_rng([int(seed), 2 + stream]).uniform()
    if spec.get("scale", "linear") == "log":
        return float(math.exp(math.log(low) + u * (math.log(high) - math.log(low))))
    return float(low + u * (high - low))


def make_split(name: str, seeds: Sequence[int], sets: Mapping[str, Any]) -> Split:
    """The split's simulations with their condition values drawn from `sets` (declaration order)."""
    values = [{c: draw(spec, s, i, k) for k, (c, spec) in enumerate(sets.items())} for i, s in enumerate(seeds)]
    return Split(name, [int(s) for s in seeds], values)
