"""Small grids from command-line options, built into the same grid model as a file.

``mlpq submit --dataset moons --optimizer backprop --lr 0.1,0.01 --hidden 16,32x16
--seeds 3``: a comma makes a list (an axis), ``x`` separates layer sizes. The
options become a grid mapping that goes through ``parse_grid`` and
``expand_grid`` like a file, so there is one validation and one expansion path;
errors name the option (``--lr: must be > 0, got -0.1``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.exceptions import GridError
from service.grids.loader import Grid, Progress, expand_grid, parse_grid
from service.grids.spec import BACKPROP_KEYS, RANDOM_WALK_KEYS

#: Option name -> (section of the grid mapping, key). Section "optimizer" = its block.
INLINE_OPTIONS: dict[str, tuple[str, str]] = {
    "dataset": ("datasets", "datasets"),
    "hidden": ("model", "hidden"),
    "activation": ("model", "activation"),
    "init": ("model", "init"),
    "dtype": ("training", "dtype"),
    "val_fraction": ("training", "val_fraction"),
    "log_every": ("training", "log_every"),
    "target_loss": ("training", "target_loss"),
    "patience": ("training", "patience"),
    "epochs": ("budget", "epochs"),
    "iterations": ("budget", "iterations"),
    "time_limit": ("budget", "time_limit"),
    "evaluations": ("budget", "evaluations"),
    "learning_rate": ("optimizer", "learning_rate"),
    "batch_size": ("optimizer", "batch_size"),
    "momentum": ("optimizer", "momentum"),
    "weight_decay": ("optimizer", "weight_decay"),
    "lr_decay": ("optimizer", "lr_decay"),
    "step_size": ("optimizer", "step_size"),
    "temperature": ("optimizer", "temperature"),
    "cooling": ("optimizer", "cooling"),
    "adapt_step": ("optimizer", "adapt_step"),
    "target_acceptance": ("optimizer", "target_acceptance"),
    "candidates": ("optimizer", "candidates"),
    "quantize": ("optimizer", "quantize"),
}
#: How the command line spells an option, when not ``--`` + the key with dashes.
FLAGS: dict[str, str] = {"learning_rate": "--lr"}


def flag(option: str) -> str:
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def _axis(text: str) -> str | list[str]:
    parts = [p.strip() for p in text.split(",")]
    return parts if len(parts) > 1 else parts[0]


def inline_data(
    options: Mapping[str, str | None],
    *,
    optimizers: str | None = None,
    seeds: str | None = None,
    seed: str | None = None,
    target: str | None = None,
    task: str | None = None,
    name: str | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The grid mapping for ``options`` (option -> text) and the path -> flag aliases."""
    unknown = set(options) - set(INLINE_OPTIONS)
    if unknown:
        raise GridError(f"inline grid: unknown option(s) {sorted(unknown)}")
    given = {k: v for k, v in options.items() if v is not None and str(v).strip() != ""}
    data: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    if name:
        data["name"] = name
        aliases["name"] = "--name"

    if "dataset" not in given:
        raise GridError("--dataset: required (a built-in name such as moons, or a CSV file)")
    entries: list[Any] = []
    for part in (p.strip() for p in given["dataset"].split(",")):
        if part.lower().endswith(".csv"):
            if not target:
                raise GridError(f"--target: required with the CSV dataset {part}")
            entry: dict[str, Any] = {"csv": part, "target": target}
            if task:
                entry["task"] = task
            entries.append(entry)
        else:
            entries.append(part)
    if not any(isinstance(e, dict) for e in entries):
        for option, value in (("--target", target), ("--task", task)):
            if value:
                raise GridError(f"{option}: only for a CSV --dataset (a file ending in .csv)")
    data["datasets"] = entries if len(entries) > 1 else entries[0]
    aliases["datasets"] = "--dataset"

    for option, text in given.items():
        section, key = INLINE_OPTIONS[option]
        if section in ("model", "training", "budget"):
            value: Any = _axis(text)
            if option in ("time_limit", "evaluations"):
                value = text.strip()
            data.setdefault(section, {})[key] = value
            aliases[f"{section}.{key}"] = flag(option)

    if seeds and seed:
        raise GridError(
            "--seeds, --seed: give a count (--seeds 3) or a list (--seed 0,7), not both"
        )
    if seeds:
        data["seeds"] = seeds.strip()
        aliases["seeds"] = "--seeds"
    elif seed:
        data["seeds"] = [s.strip() for s in seed.split(",")]
        aliases["seeds"] = "--seed"

    own = {
        "backprop": [o for o in given if o in BACKPROP_KEYS],
        "random_walk": [o for o in given if o in RANDOM_WALK_KEYS],
    }
    if optimizers:
        names = [n.strip() for n in optimizers.split(",")]
        for n in names:
            if n not in own:
                raise GridError(f"--optimizer: expected backprop or random_walk, got {n!r}")
        for other, opts in own.items():
            if opts and other not in names:
                raise GridError(
                    f"{flag(opts[0])}: a {other} option, but --optimizer is {optimizers}"
                )
    else:
        # No --optimizer: the options given say which (backprop when none does).
        names = [n for n, opts in own.items() if opts] or ["backprop"]
    blocks = []
    for i, n in enumerate(dict.fromkeys(names)):
        block: dict[str, Any] = {"optimizer": n}
        for option in own[n]:
            block[option] = _axis(given[option])
            aliases[f"optimizers[{i}].{option}"] = flag(option)
        aliases[f"optimizers[{i}].optimizer"] = "--optimizer"
        blocks.append(block)
    data["optimizers"] = blocks
    return data, aliases


def inline_grid(
    options: Mapping[str, str | None],
    *,
    optimizers: str | None = None,
    seeds: str | None = None,
    seed: str | None = None,
    target: str | None = None,
    task: str | None = None,
    name: str | None = None,
    base_dir: Path | None = None,
    max_runs: int | None = None,
    yes: bool = False,
    progress: Progress | None = None,
    lazy: bool = False,
) -> Grid:
    """Validate and expand an inline grid; its default name is stable for the same options.

    ``lazy``: see ``expand_grid``.
    """
    data, aliases = inline_data(
        options, optimizers=optimizers, seeds=seeds, seed=seed, target=target, task=task, name=name
    )
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
    parsed = parse_grid(
        data,
        source="command line",
        base_dir=base_dir or Path.cwd(),
        default_name=f"inline-{digest}",
        aliases=aliases,
    )
    return expand_grid(parsed, max_runs=max_runs, yes=yes, progress=progress, lazy=lazy)
