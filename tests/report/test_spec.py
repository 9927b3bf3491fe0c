"""The report spec: typed and validated, errors naming the key and the file; targets in two forms."""

from pathlib import Path

import pytest
from report_runs import make_spec

from avlm.errors import ConfigError
from avlm.report import Target, load_report_spec, parse_target, spec_sha256

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "examples/reports").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_loads(path):
    spec = load_report_spec(path)
    assert spec.runs.experiments and spec.targets
    assert path.read_text().startswith(
        f"# mlflow run . -e report --env-manager local -P spec=examples/reports/{path.name}"
    )


@pytest.mark.parametrize(
    "text, key",
    [
        ("name: r\nkind: cvs\ncolour: red\n", "colour"),
        ("name: r\nkind: captioning\ncaptioning: {figurez: [F1]}\n", "captioning.figurez"),
        ("name: r\nkind: cvs\nruns: {experiment: [avlm-cvs]}\n", "runs.experiment"),
    ],
)
def test_an_unknown_key_is_refused_naming_it_and_the_file(tmp_path, text, key):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}'.*{path}"):
        load_report_spec(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: r\nkind: pie\n", "kind"),
        ("name: r\nkind: generic\nruns: {experiments: [e]}\n", "generic.metrics"),
        ("name: r\nkind: generic\ngeneric: {metrics: [m]}\n", "runs.experiments"),
        ("name: r\nkind: cvs\ntargets: ['val/mAP => 0.5']\n", "targets\\[0\\]"),
        ("name: r\nkind: cvs\ntargets: [{metric: m, thresold: 1}]\n", "targets\\[0\\].*thresold"),
        ("name: r\nkind: captioning\ncaptioning: {figures: [F9]}\n", "captioning.figures"),
        ("name: r\nkind: captioning\ncaptioning: {tables: []}\n", "captioning.tables"),
        ("name: r\nkind: cvs\nruns: {statuses: [DONE]}\n", "runs.statuses"),
        ("name: ../r\nkind: cvs\n", "name"),
    ],
)
def test_bad_values_are_refused_naming_the_key_and_the_file(tmp_path, text, message):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{message}.*{path}"):
        load_report_spec(path)


def test_targets_parse_from_strings_and_mappings():
    assert parse_target("test/SPIDEr >= 0.50") == Target("test/SPIDEr", ">=", 0.5, "")
    assert parse_target(" m<1e-3 @ additive xe+scst ") == Target("m", "<", 0.001, "additive xe+scst")
    assert parse_target("m >= 0.33 @ additive xe in T2") == Target("m", ">=", 0.33, "additive xe", "T2")
    assert parse_target("m >= 0.33 in T2").text == "m >= 0.33 in T2"
    assert parse_target({"metric": "m", "op": ">", "threshold": 2}) == Target("m", ">", 2.0)
    with pytest.raises(ConfigError, match="targets\\[3\\].*not a target"):
        parse_target("m >= high", "targets[3]")


def test_kind_defaults_and_a_stable_hash():
    cvs = make_spec(kind="cvs", runs={})
    assert cvs.runs.experiments == ["avlm-cvs"] and cvs.group.tags == []
    caption = make_spec(kind="captioning", runs={})
    assert caption.runs.experiments == ["avlm-caption"] and caption.group_tag_defaults() == {"training": "xe"}
    assert spec_sha256(make_spec()) == spec_sha256(make_spec()) != spec_sha256(make_spec(digits=3))
