"""Paper tables and figures from MLflow runs: ``mlflow run . -e report -P spec=examples/reports/<name>.yaml``.

A report spec (:mod:`avlm.report.spec`) names the runs (experiments, filter), how they group (configuration =
``cfg.*`` params minus the seed and ignored params), the kind's tables and figures (:mod:`avlm.report.cvs`,
:mod:`avlm.report.captioning`, :mod:`avlm.report.generic`, :mod:`avlm.report.ave`) and the targets of the
"publishable?" checklist.
:func:`run_report` reads the runs (``avlm.tracking.run_table``), builds the folder (:func:`build_report`:
Markdown, HTML and CSV tables, PNG and SVG figures, byte-stable) and logs it as a ``report`` run's artifacts.
"""

from avlm.report.build import BuiltReport, build_report, run_report, select_runs
from avlm.report.spec import ReportSpec, Target, load_report_spec, parse_target, spec_sha256
from avlm.report.targets import TargetOutcome

__all__ = [
    "BuiltReport",
    "ReportSpec",
    "Target",
    "TargetOutcome",
    "build_report",
    "load_report_spec",
    "parse_target",
    "run_report",
    "select_runs",
    "spec_sha256",
]
