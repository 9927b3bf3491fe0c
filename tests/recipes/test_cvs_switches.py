"""train_cvs's training switches: layer-wise lr decay, drop path, test-time augmentation, frame selection.

Each is off by default and then leaves the recipe as it was; the model-level behaviour is tested in tests/models/
(test_layer_decay, test_drop_path, test_tta).
"""

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from avlm.data import CVS_CRITERIA
from avlm.errors import ConfigError
from avlm.models import parameter_groups
from avlm.recipes import cvs

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "cvs"


def config(*overrides: str, path: str = "demo.yaml") -> cvs.CVSConfig:
    return cvs.load_cvs_config(EXAMPLES / path, list(overrides))


def group_summary(groups: list[dict]) -> list[tuple[str, float, list[int]]]:
    return [(g["name"], g["lr"], [id(p) for p in g["params"]]) for g in groups]


@pytest.mark.parametrize("adaptation", ["unfreeze", "lora"])
def test_layer_decay_off_keeps_the_head_and_backbone_groups(adaptation):
    cfg = config(f"model.adaptation={adaptation}", "model.unfreeze_last_n=2")
    assert cfg.train.layer_decay == 1.0
    torch.manual_seed(0)
    model = cvs.build_cvs_model(cfg.model, num_frames=cfg.data.clip_frames)
    before = parameter_groups(
        model,
        [("head", model.head, cfg.train.lr), ("backbone", model.backbone, cfg.train.backbone_lr)],
        weight_decay=cfg.train.weight_decay,
    )
    after = parameter_groups(model, cvs.optimizer_parts(model, cfg.train), weight_decay=cfg.train.weight_decay)
    assert group_summary(after) == group_summary(before)


def test_layer_decay_gives_each_block_its_documented_lr():
    cfg = config(
        "model.adaptation=unfreeze", "model.unfreeze_last_n=2", "train.backbone_lr=1e-3", "train.layer_decay=0.5"
    )
    model = cvs.build_cvs_model(cfg.model, num_frames=cfg.data.clip_frames)
    groups = parameter_groups(model, cvs.optimizer_parts(model, cfg.train), weight_decay=0.05)
    lrs = {g["name"]: g["lr"] for g in groups if not g["name"].endswith("_no_decay")}
    assert lrs == {"head": cfg.train.lr, "backbone_block_0": 1e-3 * 0.5**2, "backbone_block_1": 1e-3 * 0.5}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.layer_decay=0", r"'train.layer_decay' must be in \(0, 1\]"),
        ("train.layer_decay=1.5", r"'train.layer_decay' must be in \(0, 1\]"),
        ("model.drop_path=0.1", r"'model.drop_path' needs a backbone that trains"),
        ("eval.tta=[hflip,vflip]", r"'eval.tta' takes distinct names from \['hflip', 'temporal_shift'\]"),
        ("eval.tta=[hflip,hflip]", r"'eval.tta' takes distinct names"),
        ("data.clip_window=50", r"'data.clip_window' applies to data.frame_selection=uniform only"),
        ("data.frame_selection=random", r"data.frame_selection"),
    ],
)
def test_bad_switch_values_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config(override)


def test_drop_path_reaches_the_vjepa2_layers():
    cfg = config("model.adaptation=lora", "model.drop_path=0.2")
    layers = cvs.build_cvs_model(cfg.model, num_frames=4).backbone.blocks()
    # transformers' VJEPA2 rule: 0 at the first layer, rising linearly to the rate at the last
    assert [layer.drop_path.drop_prob for layer in layers] == [0.0, 0.2]


# -- frame selection -----------------------------------------------------------------------------------------------
def write_video(root: Path, split: str, video: int, frames: list[int], labelled: int) -> None:
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    for n in frames:
        Image.new("RGB", (8, 8), (n % 256, 0, 0)).save(split_dir / f"{video}_{n}.jpg")
    images = [{"id": 1, "file_name": f"{video}_{labelled}.jpg", "ds": [1.0, 0.0, 0.0]}]
    (split_dir / "annotation_ds_coco.json").write_text(json.dumps({"images": images}))


def frame_numbers(record) -> list[int]:
    return [int(Path(p).stem.split("_")[1]) for p in record.frame_paths]


def test_uniform_frames_spread_over_the_window_and_stride_stays_as_it_was(tmp_path):
    write_video(tmp_path, "train", 1, list(range(0, 275, 25)), labelled=250)  # 1 fps, frames 0..250
    write_video(tmp_path, "val", 2, [0, 25], labelled=25)  # the labelled frame is the video's second

    def clips(*overrides):
        splits, _ = cvs.load_cvs_splits(config(f"data.data_dir={tmp_path}", *overrides).data)
        return frame_numbers(splits["train"][0]), frame_numbers(splits["val"][0])

    assert clips() == ([175, 200, 225, 250], [0, 0, 0, 25])  # stride: every 25, padded at the video start
    assert clips("data.frame_selection=uniform") == clips()  # the stride clip's own window, nothing missing
    # window 100 over 4 frames: places 150, 183.3, 216.7, 250 → the latest frame on disk at or before each
    assert clips("data.frame_selection=uniform", "data.clip_window=100") == ([150, 175, 200, 250], [0, 0, 0, 25])
    assert clips("data.frame_selection=uniform", "data.clip_window=150", "data.clip_frames=2") == (
        [100, 250],
        [0, 25],
    )


# -- the whole recipe with every switch on ---------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_with_every_switch_trains_and_registers_the_tta_predictor(mlflow_store):
    cfg = config(
        "tracking.system_metrics=false",
        "train.epochs=2",
        "train.batch_size=8",
        "data.limit_clips=32",
        "model.head_hidden=32",
        "data.entropy_clips=4",
        path="demo_llrd_tta.yaml",
    )
    result = cvs.main(cfg)
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.params["cfg.train.layer_decay"] == "0.75"
    assert run.data.params["cfg.eval.tta"] == '["hflip", "temporal_shift"]'
    metrics = run.data.metrics
    assert {"final/val_mAP", "final/val_mAP_without_tta", "final/test_mAP"} <= set(metrics)

    # the logged val predictions are the TTA probabilities, and the registered predictor applies the same TTA
    local = Path(client.download_artifacts(result.run_id, "predictions/val_predictions.csv"))
    with local.open() as f:
        rows = list(csv.DictReader(f))
    logged = np.array([[float(r[f"prob_{c}"]) for c in CVS_CRITERIA] for r in rows])
    splits, _ = cvs.load_cvs_splits(cfg.data)
    predictor = cvs.load_predictor(result.output_dir / "checkpoints" / "best")
    model, _ = cvs.load_classifier(result.output_dir / "checkpoints" / "best")
    dataset = cvs.ClipDataset(splits["val"], model.backbone.image_size, model.backbone.mean, model.backbone.std)
    clips = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))]).numpy()
    np.testing.assert_allclose(predictor(clips).to_numpy(), logged, atol=1e-6)
    with torch.no_grad():
        plain = torch.sigmoid(model(pixel_values=torch.as_tensor(clips)).logits).numpy()
    assert not np.allclose(plain, logged, atol=1e-6)  # TTA did change the probabilities
