"""The probe recipe's own parts: the config's validation, and bad data refused before an MLflow run exists."""

import csv

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType
from PIL import Image

from avlm.errors import ConfigError, DataError
from avlm.recipes import probe


@pytest.mark.parametrize(
    "override, key",
    [
        ("grid.poolings=[mean_max]", "grid.poolings"),
        ("grid.poolings=[mean_all,mean_all]", "grid.poolings"),
        ("grid.optimizers=[lbfgs]", "grid.optimizers"),
        ("grid.seeds=[]", "grid.seeds"),
        ("data.input_mask_ratio=1.0", "data.input_mask_ratio"),
        ("gate.select_on=test", "gate.select_on"),
        ("gate.required_delta=.nan", "gate.required_delta"),
        ("sanity.tiny_clips=1", "sanity.tiny_clips"),
        ("backbone.pretext.steps=-1", "pretext.steps"),
        ("grid.colour=red", "grid.colour"),
    ],
)
def test_bad_config_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        probe.load_probe_config(None, [override])


def tiny_manifest(path, *, label="1", frames=None):
    """``path``: two train and two val clips of four 8×8 frames; the first clip's ``label:a`` and frames can be set."""
    rng = np.random.default_rng(0)
    rows = []
    for i, split in enumerate(["train", "train", "val", "val"]):
        clip = path.parent / f"clip{i}"
        clip.mkdir(exist_ok=True)
        for t in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(clip / f"{t}.png")
        rows.append({"sample_id": f"c{i}", "split": split, "group": f"g{i}", "frames": clip.name, "label:a": i % 2})
    rows[0]["label:a"] = label
    rows[0]["frames"] = frames or rows[0]["frames"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


BAD_DATA = [  # (manifest, its fault, gate override, error, message)
    ("bad_label.csv", {"label": "2"}, "gate.evaluate_on=val", DataError, r"bad_label\.csv.*label:a"),
    ("no_frames.csv", {"frames": "missing_clip"}, "gate.evaluate_on=val", DataError, r"no_frames\.csv.*missing_clip"),
    ("no_test.csv", {}, "gate.evaluate_on=test", ConfigError, r"gate\.evaluate_on.*no_test\.csv has no such split"),
]


def test_bad_data_fails_before_an_mlflow_run_exists(mlflow_store, tmp_path):
    for name, fault, override, error, match in BAD_DATA:
        manifest = tiny_manifest(tmp_path / name, **fault)
        overrides = [f"data.manifest={manifest}", override, "tracking.system_metrics=false"]
        with pytest.raises(error, match=match):
            probe.main(probe.load_probe_config(None, [*overrides, f"output_dir={tmp_path / 'outputs'}"]))
    # One store for the three faults: creating a sqlite store takes seconds.
    client = MlflowClient(mlflow_store)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    assert client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL) == []
    assert [e.name for e in experiments] == ["Default"]  # not even the recipe's experiment was made
    assert not (tmp_path / "outputs").exists()
