"""Fixtures of the metric tests: the coco-caption demo, the oracle every caption metric is checked against."""

import json
from collections import defaultdict
from pathlib import Path

import pytest

# <repo root>/../shared: beside this checkout here, and beside CI's clone too.
COCO_CAPTION_DEMO_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "oracles" / "coco_caption_demo"


@pytest.fixture(scope="session")
def coco_caption_demo_dir() -> Path:
    """The demo's folder: candidates.json, references.json (coco-caption style) and expected.json."""
    folder = COCO_CAPTION_DEMO_DIR
    assert folder.is_dir(), f"oracle folder {folder} is missing (shared/ must sit beside the repo)"
    return folder


@pytest.fixture(scope="session")
def coco_caption_demo(coco_caption_demo_dir) -> tuple[dict[int, str], dict[int, list[str]], dict]:
    """(predictions, references, expected) of the coco-caption demo: image id -> candidate caption, image id ->
    its reference captions in file order, and expected.json as read."""
    folder = coco_caption_demo_dir
    predictions = {c["image_id"]: c["caption"] for c in json.loads((folder / "candidates.json").read_text())}
    references = defaultdict(list)
    for reference in json.loads((folder / "references.json").read_text()):
        references[reference["image_id"]].append(reference["caption"])
    return predictions, dict(references), json.loads((folder / "expected.json").read_text())
