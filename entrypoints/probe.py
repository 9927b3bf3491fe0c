"""Entry point `probe`: argv → ProbeConfig → avlm.recipes.probe.main.

python entrypoints/probe.py                                       # demo: pretext-trained tiny backbone, PASS
python entrypoints/probe.py --config examples/probe/demo_fail.yaml  # demo without pretext: FAIL
python entrypoints/probe.py --config examples/probe/vjepa2_manifest.yaml --manifest /data/clips.csv
python entrypoints/probe.py grid.seeds=[1,2,3,4,5] gate.required_delta=0.02   # any config key
mlflow run . -e probe --env-manager local -P required_delta=0.02
"""

from __future__ import annotations

import sys

from avlm.cli import run_recipe
from avlm.recipes import probe

# MLproject parameters → config keys. An empty value keeps what the config file says.
SHORTCUTS = {
    "manifest": "data.manifest",
    "backbone": "backbone.spec",
    "checkpoint": "backbone.checkpoint",
    "pretext_steps": "backbone.pretext.steps",
    "seeds": "grid.seeds",
    "required_delta": "gate.required_delta",
    "epochs": "train.epochs",
    "register_as": "registry.name",
}


def main(argv: list[str] | None = None) -> int:
    return run_recipe(
        prog="probe",
        description=__doc__,
        default_config="examples/probe/demo.yaml",
        shortcuts=SHORTCUTS,
        load_config=probe.load_probe_config,
        run=probe.main,
        argv=argv,
        summarize=probe.probe_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
