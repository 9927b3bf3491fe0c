"""Sweep specs: typed and validated like recipe configs; every cell's config is loaded by its recipe before any run
exists, so a typo'd key, an unknown spec key or a grid over budget fails at once, naming the key and the file."""

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from avlm.errors import ConfigError
from avlm.protocol.spec import REPO_ROOT, load_sweep_spec, override_args, resolve_cells, spec_sha256
from avlm.protocol.sweep import run_sweep, sweep_spec_from_dict

BASE = {
    "name": "t",
    "recipe": "train_cvs",
    "base_config": "examples/cvs/demo.yaml",
    "grid": {"train.lr": [0.001, 0.003]},
    "seeds": [0, 1],
    "objective": {"metric": "best/val/mAP"},
}


def write_spec(path: Path, **changes) -> Path:
    values = {**BASE, **changes}
    path.write_text(yaml.safe_dump({k: v for k, v in values.items() if v is not None}))
    return path


def test_unknown_spec_key_names_the_key_and_the_file(tmp_path):
    path = write_spec(tmp_path / "spec.yaml", tiebreaks=[{"metric": "time/epoch_s"}])
    with pytest.raises(ConfigError, match=r"unknown config key 'tiebreaks'.*" + str(path)):
        load_sweep_spec(path)
    path = write_spec(tmp_path / "spec.yaml", objective={"metric": "m", "agregate": "mean"})
    with pytest.raises(ConfigError, match=r"'objective.agregate'.*valid keys under 'objective.'.*aggregate"):
        load_sweep_spec(path)


def test_a_grid_over_budget_is_refused_with_its_size(tmp_path):
    grid = {"train.lr": [1e-4, 3e-4, 1e-3], "train.weight_decay": [0.0, 0.01, 0.05]}
    path = write_spec(tmp_path / "spec.yaml", grid=grid, budget={"max_cells": 8})
    with pytest.raises(ConfigError, match=r"budget.max_cells.*9 cells \(grid 3 train.lr × 3 train.weight_decay\).*8"):
        load_sweep_spec(path)
    assert len(load_sweep_spec(write_spec(path, grid=grid, budget={"max_cells": 9})).cell_list()) == 9


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"objective": {"metric": ""}}, r"'objective.metric' is required"),
        ({"objective": {"metric": "m", "test": "sign"}}, r"'objective.test'.*ttest, wilcoxon, permutation"),
        ({"objective": {"metric": "m", "baseline": "uniform"}}, r"'objective.baseline': 'uniform' is not a cell"),
        ({"recipe": "train_cv"}, r"'recipe'.*train_cvs, train_caption, probe"),
        ({"seeds": [0, 0]}, r"'seeds' lists a seed twice"),
        ({"seeds": [-1]}, r"'seeds\[0\]': a seed must be >= 0"),
        ({"cells": [{"name": "a", "overrides": {"train.lr": 0.1}}]}, r"'grid' and 'cells': give one of them"),
        ({"overrides": {"seed": 3}}, r"'overrides.seed': the sweep sets seed on every child itself"),
        ({"grid": {"train.lr": 0.1}}, r"'grid.train.lr': expected a non-empty list"),
        ({"grid": None, "cells": [{"name": "a"}, {"name": "a"}]}, r"two cells are named 'a'"),
        ({"grid": None, "cells": [{"nme": "a"}]}, r"unknown config key 'cells\[0\].nme'"),
    ],
)
def test_malformed_specs_are_refused_naming_the_key(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep_spec(write_spec(tmp_path / "spec.yaml", **changes))


def test_cells_from_a_grid_a_list_or_neither():
    grid = sweep_spec_from_dict({**BASE, "grid": {"train.lr": [0.001, 0.01], "model.head_dropout": [0.0, 0.1]}})
    assert [c.name for c in grid.cell_list()] == [
        "train.lr=0.001,model.head_dropout=0.0",
        "train.lr=0.001,model.head_dropout=0.1",
        "train.lr=0.01,model.head_dropout=0.0",
        "train.lr=0.01,model.head_dropout=0.1",
    ]
    listed = sweep_spec_from_dict(
        {
            **BASE,
            "grid": {},
            "overrides": {"train": {"epochs": 2}},  # a nested mapping reads as dotted keys
            "cells": [{"name": "uniform", "overrides": {}}, {"overrides": {"loss.kind": "focal"}}],
            "objective": {"metric": "m", "baseline": "uniform"},
        }
    )
    assert [c.name for c in listed.cell_list()] == ["uniform", "loss.kind=focal"]
    assert listed.cell_overrides("loss.kind=focal") == {"train.epochs": 2, "loss.kind": "focal"}
    single = sweep_spec_from_dict({**BASE, "grid": {}})
    assert [(c.name, c.overrides) for c in single.cell_list()] == [("base", {})]
    assert override_args({"model.lora_targets": ["query", "value"], "loss.kind": "focal", "train.lr": 1e-3}) == [
        'model.lora_targets=["query","value"]',
        "loss.kind=focal",
        "train.lr=0.001",
    ]


def test_every_cell_resolves_through_its_recipe_config():
    spec = sweep_spec_from_dict({**BASE, "overrides": {"train.epochs": 2, "model.lora_targets": ["query"]}})
    resolved = resolve_cells(spec)
    assert [r.config["train"]["lr"] for r in resolved] == [0.001, 0.003]
    assert all(r.config["train"]["epochs"] == 2 and r.config["model"]["lora_targets"] == ["query"] for r in resolved)
    assert resolved[0].args == ("train.epochs=2", 'model.lora_targets=["query"]', "train.lr=0.001")


def test_a_typo_in_a_cell_override_fails_before_any_run_exists(tmp_path, mlflow_store):
    spec = sweep_spec_from_dict({**BASE, "grid": {"train.lrr": [0.001, 0.003]}}, where="spec.yaml")
    with pytest.raises(ConfigError, match=r"spec.yaml: cell 'train.lrr=0.001'.*unknown config key 'train.lrr'"):
        run_sweep(spec, workers=2)
    wrong_type = sweep_spec_from_dict({**BASE, "grid": {"train.epochs": ["two"]}})
    with pytest.raises(ConfigError, match=r"cell 'train.epochs=two'.*'train.epochs': expected an integer"):
        run_sweep(wrong_type)
    client = MlflowClient(mlflow_store)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert not (tmp_path / "optuna.db").exists()


def test_the_spec_hash_covers_the_spec_and_the_base_config_bytes(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text((REPO_ROOT / "examples/cvs/demo.yaml").read_text())
    spec = sweep_spec_from_dict({**BASE, "base_config": str(base)})
    same = sweep_spec_from_dict({**BASE, "base_config": str(base), "objective": {"metric": "best/val/mAP"}})
    assert spec_sha256(spec) == spec_sha256(same)  # defaults spelled out or not: one spec
    more_seeds = sweep_spec_from_dict({**BASE, "base_config": str(base), "seeds": [0, 1, 2]})
    assert spec_sha256(more_seeds) != spec_sha256(spec)
    before = spec_sha256(spec)
    base.write_text(base.read_text().replace("lr: 1.0e-3", "lr: 2.0e-3"))
    assert spec_sha256(spec) != before


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "examples" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_sweep_resolves(path):
    spec = load_sweep_spec(path)
    command = f"# mlflow run . -e sweep --env-manager local -P spec=examples/sweeps/{path.name}"
    assert path.read_text().startswith(command)
    assert len(resolve_cells(spec)) == len(spec.cell_list()) <= spec.budget.max_cells
