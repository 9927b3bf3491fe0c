"""Runs → groups: configuration minus seed and ignored params, tags in the key, labels, duplicate seeds."""

import pytest
from report_runs import record

from avlm.report.grouping import Summary, configuration_key, group_runs, summarize


def test_runs_group_by_config_minus_seed_and_ignored_params_in_seed_order():
    runs = [
        record("a10", seed=10, params={"cfg.train.lr": "0.001", "cfg.output_dir": "x"}),
        record("a2", seed=2, params={"cfg.train.lr": "0.001", "cfg.output_dir": "y", "cfg.tracking.run_name": "r"}),
        record("b1", seed=1, params={"cfg.train.lr": "0.003", "cfg.output_dir": "z", "lr": "ignored: not cfg."}),
    ]
    groups = group_runs(runs, ignore=["cfg.output_dir", "cfg.tracking.*"])
    assert [g.label for g in groups] == ["train.lr=0.001", "train.lr=0.003"]
    assert [r.run_id for r in groups[0].runs] == ["a2", "a10"] and groups[0].seeds == ("2", "10")  # numeric order
    assert groups[0].key == (("cfg.train.lr", "0.001"),) and groups[0].get("cfg.train.lr") == "0.001"
    # without the ignore patterns the output folder splits every run into its own group
    assert len(group_runs(runs)) == 3


def test_tags_join_the_key_with_their_default_and_split_scst_rows():
    runs = [
        record("x1", seed=1, params={"cfg.model.fusion": "additive"}),
        record("s1", seed=1, params={"cfg.model.fusion": "additive"}, tags={"training": "xe+scst"}),
        record("c1", seed=1, params={"cfg.model.fusion": "cross_attention"}, tags={"training": "xe"}),
    ]
    key = configuration_key(runs[0], tag_defaults={"training": "xe"})
    assert key == (("cfg.model.fusion", "additive"), ("tags.training", "xe"))
    groups = group_runs(runs, tag_defaults={"training": "xe"}, label=["cfg.model.fusion", "tags.training"])
    assert [(g.label, [r.run_id for r in g.runs]) for g in groups] == [
        ("additive xe", ["x1"]),
        ("additive xe+scst", ["s1"]),
        ("cross_attention xe", ["c1"]),
    ]
    # a tag without a default: runs lacking it say n/a
    assert configuration_key(runs[0], tag_defaults={"training": None})[-1] == ("tags.training", "n/a")


def test_a_later_run_of_a_seed_replaces_the_earlier_one():
    runs = [record("old", seed=1, start=5), record("new", seed=1, start=9), record("other", seed=2, start=1)]
    (group,) = group_runs(runs)
    assert [r.run_id for r in group.runs] == ["new", "other"] and group.duplicates == ("old",)


def test_labels_that_coincide_get_what_tells_them_apart():
    runs = [
        record("a", params={"cfg.model.fusion": "additive", "cfg.train.lr": "0.1"}),
        record("b", params={"cfg.model.fusion": "additive", "cfg.train.lr": "0.2"}),
    ]
    labels = [g.label for g in group_runs(runs, label=["cfg.model.fusion"])]
    assert labels == ["additive (train.lr=0.1)", "additive (train.lr=0.2)"]


def test_one_group_is_named_after_its_runs_without_the_seed():
    runs = [record("a", seed=1, name="cvs-tiny-seed1"), record("b", seed=2, name="cvs-tiny-seed2")]
    assert [g.label for g in group_runs(runs)] == ["cvs-tiny"]


def test_summary_is_the_mean_and_sample_std_over_the_seeds_that_log_the_metric():
    runs = [record("a", seed=1, metrics={"m": 0.5}), record("b", seed=2, metrics={"m": 0.7}), record("c", seed=3)]
    (group,) = group_runs(runs)
    summary = summarize(group, "m")
    assert (summary.mean, summary.n, summary.of) == (pytest.approx(0.6), 2, 3)
    assert summary.std == pytest.approx(0.1414213562)  # ddof=1: sqrt(0.02)
    assert Summary.of_values([], 2) == Summary(None, None, 0, 2)
    assert group.values("m") == {"1": 0.5, "2": 0.7}
