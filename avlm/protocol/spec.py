"""The sweep spec: which recipe, which base config, which cells and seeds, how the winner is chosen, the budget.

A spec is YAML (``examples/sweeps/*.yaml``), typed and validated with :mod:`avlm.config`, so an unknown key or a
wrong type is refused with the key and the file named::

    name: cvs-demo-lr
    recipe: train_cvs                      # train_cvs | train_caption | probe | train_ave (entrypoints/<recipe>.py)
    base_config: examples/cvs/demo.yaml    # relative to the repository root, or absolute
    overrides: {train.epochs: 2}           # every cell
    grid: {train.lr: [0.001, 0.003]}       # cells = the product of the grid's values ...
    # cells: [{name: uniform, overrides: {...}}, {name: anchored, overrides: {...}}]   # ... or listed cells
    seeds: [0, 1]
    objective: {metric: best/val/mAP, mode: max, aggregate: mean, baseline: "", test: wilcoxon}
    tie_breaks: [{metric: time/epoch_s, mode: min}]
    budget: {max_cells: 8}
    register: false
    num_processes: 1

Neither ``grid`` nor ``cells`` = one cell, ``base``: a run of one config over the seeds (a test stage of a chain).
Override values are YAML values (numbers, strings, lists); a nested mapping is read as dotted keys. Each cell's
overrides are checked against the recipe's own config class by :func:`resolve_cells`, which loads the config of
every cell before any run exists, so a typo'd key fails at once and names the cell and the spec.

A spec's identity is :func:`spec_sha256`: the canonical JSON of the spec (defaults included) together with the
bytes of its base config and accelerate config, so editing the base config makes a new sweep rather than
resuming an old one with different settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from avlm.config import config_from_dict, config_to_dict, load_config
from avlm.errors import ConfigError
from avlm.stats import PAIRED_TESTS

# The repository checkout avlm runs from: entry point scripts and the example configs live there.
REPO_ROOT = Path(__file__).resolve().parents[2]

# recipe (the entry point's name) -> (module, config loader); each loader is load_config for its config class.
RECIPES: dict[str, tuple[str, str]] = {
    "train_cvs": ("avlm.recipes.cvs", "load_cvs_config"),
    "train_caption": ("avlm.recipes.caption", "load_caption_config"),
    "probe": ("avlm.recipes.probe", "load_probe_config"),
    "train_ave": ("avlm.recipes.ave", "load_ave_config"),
}

# Keys the sweep sets on every child itself; a spec that sets them would be silently overruled.
_SWEEP_OWNED_KEYS = ("seed", "resume", "tracking.run_name", "tracking.tracking_uri", "registry.register")


@dataclasses.dataclass
class ObjectiveSpec:
    """How cells are ranked.

    Attributes:
        metric: the MLflow metric of each child, as logged (its split is in its name: ``best/val/mAP``,
            ``final/test_mAP``); the child's final value of it is used.
        mode: max (higher is better) or min.
        aggregate: over seeds: mean or median. With a baseline, of the paired (cell - baseline) differences.
        baseline: a cell name: rank by the paired difference to that cell (seeds pair by seed), and report the
            paired test's p; the baseline is the reference, reported but never the winner. Empty = rank by value.
        test: the paired test reported against the baseline (one of ``avlm.stats.PAIRED_TESTS``), two-sided.
        tie_tolerance: aggregates this close to the best one tie, and the tie-breaks decide.
        require_all_seeds: a cell missing a seed's value (failed child, metric not logged) cannot win.
    """

    metric: str = ""
    mode: Literal["max", "min"] = "max"
    aggregate: Literal["mean", "median"] = "mean"
    baseline: str = ""
    test: str = "wilcoxon"
    tie_tolerance: float = 0.0
    require_all_seeds: bool = True

    def __post_init__(self) -> None:
        if self.test not in PAIRED_TESTS:
            raise ConfigError(
                f"config key 'objective.test': expected one of {', '.join(PAIRED_TESTS)}, got {self.test!r}"
            )
        if self.tie_tolerance < 0:
            raise ConfigError(f"config key 'objective.tie_tolerance' must be >= 0, got {self.tie_tolerance}")


@dataclasses.dataclass
class TieBreak:
    """Among cells tied on the objective, the better mean of ``metric`` over seeds wins (``mode`` min: lower)."""

    metric: str = ""
    mode: Literal["max", "min"] = "min"

    def __post_init__(self) -> None:
        if not self.metric.strip():
            raise ConfigError("config key 'tie_breaks[].metric' is required")


@dataclasses.dataclass
class CellSpec:
    """One listed cell: a name and the overrides it adds to the spec's ``overrides``."""

    name: str = ""
    overrides: Any = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BudgetSpec:
    """Attributes:
    max_cells: a spec with more cells (grid points or listed cells) is refused before anything runs.
    """

    max_cells: int = 16

    def __post_init__(self) -> None:
        if self.max_cells < 1:
            raise ConfigError(f"config key 'budget.max_cells' must be >= 1, got {self.max_cells}")


@dataclasses.dataclass(frozen=True)
class Cell:
    """A cell of the sweep: its name and its own overrides (dotted key -> value), in the spec's order."""

    name: str
    overrides: dict[str, Any]


@dataclasses.dataclass
class SweepSpec:
    """A sweep: the cells × seeds runs of one recipe, and the rule that picks the winner (see the module docstring).

    Attributes:
        name: the sweep's name (tags, run names, the Optuna study).
        recipe: the entry point each child runs: train_cvs, train_caption, probe or train_ave.
        base_config: the recipe config every cell starts from; relative to the repository root, or absolute.
        overrides: dotted key -> value applied to every cell.
        grid: dotted key -> list of values; the cells are their product, named ``key=value,key=value``.
        cells: listed cells instead of a grid.
        seeds: each cell runs once per seed (the config's ``seed``).
        objective: how cells are ranked.
        tie_breaks: in order, among cells tied on the objective; then the first cell in spec order wins.
        budget: the most cells a spec may hold.
        register: let children register their model (off by default: a sweep's children are not candidates).
        num_processes: processes per child (``accelerate launch``).
        accelerate_config: accelerate config file for the children; relative to the repository root.
        experiment: MLflow experiment of a new parent run; empty = ``avlm-sweep-<name>``. A parent made by
            ``mlflow run`` or given by a chain keeps its own experiment.
        source: where the spec came from (its file), for messages; not part of the spec or its hash.
    """

    name: str = ""
    recipe: str = ""
    base_config: str = ""
    overrides: Any = dataclasses.field(default_factory=dict)
    grid: Any = dataclasses.field(default_factory=dict)
    cells: list[CellSpec] = dataclasses.field(default_factory=list)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    objective: ObjectiveSpec = dataclasses.field(default_factory=ObjectiveSpec)
    tie_breaks: list[TieBreak] = dataclasses.field(default_factory=list)
    budget: BudgetSpec = dataclasses.field(default_factory=BudgetSpec)
    register: bool = False
    num_processes: int = 1
    accelerate_config: str = ""
    experiment: str = ""
    source: str = dataclasses.field(default="sweep spec", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ConfigError("config key 'name' is required: the sweep's name")
        if self.recipe not in RECIPES:
            raise ConfigError(f"config key 'recipe': expected one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if not self.base_config:
            raise ConfigError("config key 'base_config' is required: the recipe config every cell starts from")
        if not self.seeds:
            raise ConfigError("config key 'seeds' must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"config key 'seeds' lists a seed twice: {self.seeds}")
        if self.num_processes < 1:
            raise ConfigError(f"config key 'num_processes' must be >= 1, got {self.num_processes}")
        if not self.objective.metric.strip():
            raise ConfigError("config key 'objective.metric' is required: the metric cells are ranked by")
        _override_map(self.overrides, "overrides")  # raises on a malformed mapping
        cells = self.cell_list()
        if len(cells) > self.budget.max_cells:
            raise ConfigError(
                f"config key 'budget.max_cells': the spec holds {len(cells)} cells "
                f"({_cell_count_text(self)}), over its budget of {self.budget.max_cells}; "
                "shrink the grid or raise budget.max_cells"
            )
        names = [cell.name for cell in cells]
        if self.objective.baseline and self.objective.baseline not in names:
            raise ConfigError(
                f"config key 'objective.baseline': {self.objective.baseline!r} is not a cell "
                f"(cells: {', '.join(names)})"
            )
        if self.objective.baseline and len(cells) < 2:
            raise ConfigError("config key 'objective.baseline': a baseline needs at least one other cell to compare")

    def cell_list(self) -> list[Cell]:
        """The cells in spec order: the grid's product (first key slowest), the listed cells, or one ``base``.

        Raises:
            ConfigError: both a grid and cells, an empty grid value list, a cell named twice, or a key the sweep
                sets itself (seed, registry.register, ...).
        """
        if self.grid and self.cells:
            raise ConfigError("config keys 'grid' and 'cells': give one of them (a grid, or a list of cells)")
        if self.grid:
            grid = _override_map(self.grid, "grid", lists=True)
            keys = list(grid)
            cells = [
                Cell(
                    ",".join(f"{k}={_text(v)}" for k, v in zip(keys, values, strict=True)),
                    dict(zip(keys, values, strict=True)),
                )
                for values in itertools.product(*grid.values())
            ]
        elif self.cells:
            cells = []
            for i, cell in enumerate(self.cells):
                overrides = _override_map(cell.overrides, f"cells[{i}].overrides")
                name = cell.name.strip() or ",".join(f"{k}={_text(v)}" for k, v in overrides.items()) or f"cell{i}"
                cells.append(Cell(name, overrides))
        else:
            cells = [Cell("base", {})]
        seen: set[str] = set()
        for cell in cells:
            if cell.name in seen:
                raise ConfigError(f"config key 'cells': two cells are named {cell.name!r}")
            seen.add(cell.name)
        return cells

    def cell(self, name: str) -> Cell:
        """The cell named ``name``.

        Raises:
            KeyError: no such cell.
        """
        for cell in self.cell_list():
            if cell.name == name:
                return cell
        raise KeyError(name)

    def cell_overrides(self, name: str) -> dict[str, Any]:
        """The spec's overrides with the cell's on top: what the cell changes in the base config."""
        return {**_override_map(self.overrides, "overrides"), **self.cell(name).overrides}

    def base_config_path(self) -> Path:
        """The base config file, resolved against the repository root."""
        return resolve_repo_path(self.base_config)

    def accelerate_config_path(self) -> Path | None:
        return resolve_repo_path(self.accelerate_config) if self.accelerate_config else None


def resolve_repo_path(path: str) -> Path:
    """``path`` as is when absolute, else relative to the repository root (as the MLproject commands see it)."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else REPO_ROOT / candidate


def _cell_count_text(spec: SweepSpec) -> str:
    if spec.grid and isinstance(spec.grid, Mapping):
        sizes = [f"{len(v) if isinstance(v, list) else 1} {k}" for k, v in spec.grid.items()]
        return "grid " + " × ".join(sizes)
    return f"{len(spec.cells)} listed cells"


def _text(value: Any) -> str:
    """An override value as ``key=value`` text: strings verbatim, the rest as compact YAML-readable JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _override_map(values: Any, where: str, *, lists: bool = False) -> dict[str, Any]:
    """``values`` as a flat ``{dotted key: value}`` dict; nested mappings become dotted keys.

    Raises:
        ConfigError: not a mapping, a key that is not a string, a key the sweep owns, or (``lists``) a value that is
            not a non-empty list.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"config key '{where}': expected a mapping of config keys to values, got {values!r}")
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"config key '{where}': keys must be dotted config keys, got {key!r}")
        if isinstance(value, Mapping):
            for sub, sub_value in _override_map(value, f"{where}.{key}", lists=lists).items():
                flat[f"{key}.{sub}"] = sub_value
            continue
        if key in _SWEEP_OWNED_KEYS:
            raise ConfigError(
                f"config key '{where}.{key}': the sweep sets {key} on every child itself "
                f"(seeds: the spec's 'seeds'; registration: its 'register')"
            )
        if lists and (not isinstance(value, list) or not value):
            raise ConfigError(f"config key '{where}.{key}': expected a non-empty list of values, got {value!r}")
        flat[key] = value
    return flat


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """``key=value`` arguments, as the recipe's command line and :func:`avlm.config.load_config` take them."""
    return [f"{key}={_text(value)}" for key, value in overrides.items()]


def sweep_spec_from_dict(values: Mapping[str, Any], where: str = "sweep spec") -> SweepSpec:
    """Build and validate a spec from a mapping (a chain's stage builds one this way).

    Raises:
        ConfigError: the message names the bad key and ``where``.
    """
    try:
        spec = config_from_dict(SweepSpec, values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err
    spec.source = where
    return spec


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """Load and validate a sweep spec file (structure, types, budget; the cells' config keys are checked by
    :func:`resolve_cells`, which imports the recipe).

    Raises:
        ConfigError: naming the key and the file.
    """
    spec = load_config(SweepSpec, path)
    spec.source = f"sweep spec {path}"
    return spec


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """The spec as a plain dict, defaults included (what is frozen into the parent run)."""
    values = config_to_dict(spec)
    values.pop("source")
    return values


def spec_yaml(spec: SweepSpec) -> str:
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False)


def _file_sha256(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        raise ConfigError(f"sweep spec: cannot read {path}: {err}") from err


def spec_sha256(spec: SweepSpec) -> str:
    """The spec's identity: sha256 of its canonical JSON and of the bytes of its base and accelerate configs."""
    canonical = {
        "spec": spec_to_dict(spec),
        "base_config_sha256": _file_sha256(spec.base_config_path()),
        "accelerate_config_sha256": _file_sha256(spec.accelerate_config_path()),
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def recipe_config_loader(recipe: str) -> Any:
    """The recipe's ``load_<recipe>_config(path, overrides)`` (imported here: recipes bring in torch)."""
    module, loader = RECIPES[recipe]
    return getattr(importlib.import_module(module), loader)


@dataclasses.dataclass(frozen=True)
class ResolvedCell:
    """A cell checked against its recipe.

    Attributes:
        cell: the cell.
        args: the ``key=value`` overrides a child of this cell passes (the spec's, then the cell's).
        config: the cell's full resolved config (base + overrides + cell overrides, as the recipe resolves it).
    """

    cell: Cell
    args: tuple[str, ...]
    config: dict[str, Any]


def resolve_cells(spec: SweepSpec, where: str | None = None) -> list[ResolvedCell]:
    """Load every cell's config with the recipe's own loader, before any run exists.

    Args:
        spec: the sweep.
        where: what to call the spec in messages; None = its source (its file).

    Raises:
        ConfigError: the base config is missing or a cell's override is unknown or ill-typed; the message names the
            cell, the key and ``where``.
    """
    where = spec.source if where is None else where
    base = spec.base_config_path()
    if not base.is_file():
        raise ConfigError(f"{where}: config key 'base_config': {base} does not exist")
    accelerate = spec.accelerate_config_path()
    if accelerate is not None and not accelerate.is_file():
        raise ConfigError(f"{where}: config key 'accelerate_config': {accelerate} does not exist")
    if not (REPO_ROOT / "entrypoints" / f"{spec.recipe}.py").is_file():
        raise ConfigError(
            f"{where}: entrypoints/{spec.recipe}.py is not in {REPO_ROOT}; sweeps run the recipes of a checkout "
            "(pip install -e .)"
        )
    load = recipe_config_loader(spec.recipe)
    resolved = []
    for cell in spec.cell_list():
        args = tuple(override_args(spec.cell_overrides(cell.name)))
        try:
            cfg = load(base, list(args))
        except ConfigError as err:
            raise ConfigError(f"{where}: cell {cell.name!r}: {err}") from err
        resolved.append(ResolvedCell(cell, args, config_to_dict(cfg)))
    return resolved
