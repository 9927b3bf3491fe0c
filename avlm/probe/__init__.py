"""Probe evaluation pieces: sanity checks, the declared PASS/FAIL gate, and the report.

Pure functions of arrays, callables and results: the probe recipe trains the probes and logs to MLflow, and calls
these for everything that decides or reports.
"""

from avlm.probe.gate import AblationRow, CellResult, GateConfig, GateDecision, RunRow, ablation_table, decide, run_table
from avlm.probe.report import ProbeReport, render_markdown, report_json
from avlm.probe.sanity import (
    SanityResult,
    label_checksum,
    label_provenance,
    shuffled_label_control,
    split_hygiene,
    tiny_subset_overfit,
)

__all__ = [
    "AblationRow",
    "CellResult",
    "GateConfig",
    "GateDecision",
    "ProbeReport",
    "RunRow",
    "SanityResult",
    "ablation_table",
    "decide",
    "label_checksum",
    "label_provenance",
    "render_markdown",
    "report_json",
    "run_table",
    "shuffled_label_control",
    "split_hygiene",
    "tiny_subset_overfit",
]
