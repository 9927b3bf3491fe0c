"""Probe machinery: frozen features and their poolings, one probe's training, sanity checks, the declared PASS/FAIL
gate, and the report.

The sanity checks, the gate and the report are pure functions of arrays, callables and results; the features and
the probe's training run on an accelerator through the shared loop. The probe recipe composes them and logs to
MLflow.
"""

from avlm.probe.features import (
    POOLINGS,
    FrozenFeatures,
    available_poolings,
    extract_frozen_features,
    pooled_features,
    pooling_unavailable,
    seed_subset,
)
from avlm.probe.gate import AblationRow, CellResult, GateConfig, GateDecision, RunRow, ablation_table, decide, run_table
from avlm.probe.report import (
    ProbeReport,
    cell_metrics,
    evidence_tags,
    gate_metrics,
    render_markdown,
    report_json,
)
from avlm.probe.sanity import (
    SanityResult,
    label_provenance,
    shuffled_label_control,
    split_hygiene,
    tiny_subset_overfit,
)
from avlm.probe.train import ProbeFit, cell_result, train_probe

__all__ = [
    "POOLINGS",
    "AblationRow",
    "CellResult",
    "FrozenFeatures",
    "GateConfig",
    "GateDecision",
    "ProbeFit",
    "ProbeReport",
    "RunRow",
    "SanityResult",
    "ablation_table",
    "available_poolings",
    "cell_metrics",
    "cell_result",
    "decide",
    "evidence_tags",
    "extract_frozen_features",
    "gate_metrics",
    "label_provenance",
    "pooled_features",
    "pooling_unavailable",
    "render_markdown",
    "report_json",
    "run_table",
    "seed_subset",
    "shuffled_label_control",
    "split_hygiene",
    "tiny_subset_overfit",
    "train_probe",
]
