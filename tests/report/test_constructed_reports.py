"""Reports from runs logged by hand with MlflowClient: every captioning table and figure (SCST rows, retention runs
and per-item scores that the demo recipes do not make yet), the generic table, targets, and the report run."""

import csv
import io
import json

import numpy as np
import pytest
from mlflow import MlflowClient
from report_runs import FakeSource, load_entrypoint, log_run, make_spec, read_folder, record

from avlm.report import build_report, select_runs
from avlm.report.context import ReportContext
from avlm.stats import bootstrap_ci, format_mean_std, paired_bootstrap, paired_test
from avlm.tracking.run_table import RunReader

METRICS = ["BLEU_4", "METEOR", "ROUGE_L", "CIDEr_D", "SPICE", "SPIDEr"]
ITEMS = 12
SYSTEMS = {"additive": 1, "cross_attention": 2}
REASON = "Stanford CoreNLP 3.6.0 not found: /nowhere has no stanford-corenlp-3.6.0.jar. Unpack it"


def caption_run(
    client, experiment, *, fusion, seed, dataset="audiocaps", training=None, spice=True, items=True, retention=None
):
    """A captioning run shaped like the recipe's: final/test_* metrics, per-epoch val curves and gates, params."""
    rng = np.random.default_rng([SYSTEMS[fusion], seed, len(dataset), training is not None])
    quality = {"additive": 0.5, "cross_attention": 0.4}[fusion] + (0.05 if training else 0.0) + 0.01 * seed
    item_spider = np.clip(quality + 0.1 * rng.standard_normal(ITEMS), 0, None)
    metrics = {f"final/test_{m}": float(quality * (i + 1) / 4) for i, m in enumerate(METRICS[:4])}
    if spice:
        metrics |= {"final/test_SPICE": quality / 3, "final/test_SPIDEr": float(item_spider.mean())}
    metrics |= {
        "params/trainable": 147_074 if fusion == "additive" else 151_000,
        "params/ratio_to_additive": 1.0 if fusion == "additive" else 1.0267,
        "best_epoch": 3,
    }
    metrics["epoch"] = [(10 * e, e) for e in (1, 2, 3)]
    metrics["val/SPIDEr" if spice else "val/CIDEr_D"] = [(10 * e, quality * e / 3 - 0.01 * seed) for e in (1, 2, 3)]
    if fusion == "additive":
        metrics |= {
            "fusion_gate/layer_1": [(10 * e, 0.05 + 0.01 * e) for e in (1, 2, 3)],
            "fusion_gate/layer_3": [(10 * e, -0.05 - 0.02 * e * seed) for e in (1, 2, 3)],
        }
    if retention is not None:
        metrics["retention/vl_accuracy"] = retention - 0.001 * seed
    tags = {"recipe": "caption", "fusion": fusion, "dataset": dataset}
    tags |= {} if spice else {"spice": "unavailable", "spice_unavailable_reason": REASON}
    tags |= {"training": training, "lineage.parent_run_id": "0" * 32} if training else {}
    predictions = [
        {
            "id": f"clip{i:02d}",
            "prediction": "p",
            "references": ["r"],
            "scores": {"SPIDEr": float(s), "CIDEr_D": float(2 * s)},
        }
        for i, s in enumerate(item_spider)
    ]
    run_id = log_run(
        client,
        experiment,
        name=f"caption-{fusion}-seed{seed}",
        metrics=metrics,
        tags=tags,
        params={"cfg.seed": seed, "cfg.model.fusion": fusion, "cfg.data.dataset": dataset, "cfg.output_dir": "o"},
        artifacts={"predictions/test_predictions.json": predictions} if items else {},
    )
    return run_id, metrics, item_spider


@pytest.fixture(scope="module")
def caption_runs(module_store):
    """AudioCaps: additive and cross-attention × seeds 1, 2 (XE), additive +SCST × 1, 2, with retention and per-item
    scores; Clotho: both systems × 1, 2 without SPICE."""
    client = MlflowClient()
    experiment = client.create_experiment("avlm-caption")
    runs = {}
    for fusion, retention in (("additive", 0.80), ("cross_attention", 0.78)):
        for seed in (1, 2):
            runs[(fusion, "xe", seed)] = caption_run(client, experiment, fusion=fusion, seed=seed, retention=retention)
            runs[(fusion, "clotho", seed)] = caption_run(
                client, experiment, fusion=fusion, seed=seed, dataset="clotho", spice=False
            )
    for seed in (1, 2):
        runs[("additive", "scst", seed)] = caption_run(
            client, experiment, fusion="additive", seed=seed, training="xe+scst", retention=0.795
        )
    return runs


def caption_spec(tmp_path, **captioning):
    return make_spec(
        kind="captioning",
        runs={"experiments": ["avlm-caption"], "filter": "tags.recipe = 'caption'"},
        group={"ignore": ["cfg.output_dir"]},
        captioning={
            "tables": [
                {"name": "T1", "where": {"cfg.data.dataset": "audiocaps"}},
                {"name": "T2", "where": {"tags.dataset": "clotho"}},
            ],
            **captioning,
        },
        stats={"n_resamples": 2000},
        targets=[
            "test/SPIDEr >= 0.4 @ additive xe",
            "test/SPIDEr >= 0.9",
            "test/SPIDEr >= 0.1 @ cross_attention xe",
            "final/test_SPICE >= 0.1 @ nobody",
            "test/CIDEr_D >= 0.1 @ additive xe in T2",
            "test/SPIDEr >= 0.1 in T2",
            "test/SPIDEr >= 0.1 in T9",
        ],
        output_dir=str(tmp_path),
    )


def build(spec):
    reader = RunReader()
    return build_report(spec, reader.find_runs(spec.runs.experiments, spec.runs.filter), reader, spec.output_dir + "/r")


@pytest.fixture(scope="module")
def caption_report(caption_runs, tmp_path_factory):
    """The captioning report of ``caption_runs``, built once for the module's tests that only read it."""
    return build(caption_spec(tmp_path_factory.mktemp("caption_report")))


def test_caption_tables_show_mean_std_scst_rows_params_and_na_for_missing_spice(caption_runs, caption_report):
    built = caption_report
    t1, t2 = built.tables["T1"], built.tables["T2"]
    assert [row[0].text for row in t1.rows] == ["additive xe", "additive xe+scst", "cross_attention xe"]
    assert [row[1].text for row in t1.rows] == ["xe", "xe+scst", "xe"]
    # a cell is the mean ± sample std of the runs' own final/test_SPIDEr
    values = [caption_runs[("additive", "xe", s)][1]["final/test_SPIDEr"] for s in (1, 2)]
    assert t1.cell(0, "SPIDEr").text == format_mean_std(np.mean(values), np.std(values, ddof=1), 4)
    assert t1.cell(2, "trainable params").text == "151,000" and t1.cell(2, "param ratio").text == "1.027"
    # Clotho runs could not run SPICE: n/a with the runs' reason, never a number
    assert [t2.cell(i, "SPICE").text for i in range(2)] == ["n/a [2]", "n/a [2]"]
    assert t2.cell(0, "SPIDEr").text == "n/a [2]" and REASON in t2.notes[1]
    assert t2.cell(0, "CIDEr-D").text != "n/a"
    csv_rows = list(csv.DictReader(io.StringIO((built.folder / "tables/T1.csv").read_text())))
    assert float(csv_rows[0]["SPIDEr mean"]) == pytest.approx(np.mean(values))


def test_f2_is_a_paired_bootstrap_over_items_against_the_best_baseline(caption_runs, caption_report):
    built = caption_report
    f2 = built.tables["F2"]
    assert f2.title == "F2: test SPIDEr, additive xe vs cross_attention xe"
    candidate = np.mean([caption_runs[("additive", "xe", s)][2] for s in (1, 2)], axis=0)
    baseline = np.mean([caption_runs[("cross_attention", "xe", s)][2] for s in (1, 2)], axis=0)
    expected = paired_bootstrap(candidate, baseline, n_resamples=2000, seed=0)
    assert dict(f2.rows[2][1].data)["estimate"] == pytest.approx(candidate.mean() - baseline.mean())
    assert dict(f2.rows[2][1].data)["low"] == pytest.approx(expected.delta.low)
    assert dict(f2.rows[2][2].data)[""] == pytest.approx(expected.p_value)
    assert dict(f2.rows[0][1].data)["high"] == pytest.approx(
        bootstrap_ci(candidate, method="percentile", n_resamples=2000).high
    )
    assert f"paired bootstrap over {ITEMS} test items" in f2.notes[0]
    assert {"figures/F2.png", "figures/F2.svg"} <= set(built.files)


def test_f2_falls_back_to_a_paired_test_over_seeds_without_per_item_scores(module_store, tmp_path):
    client = MlflowClient()
    experiment = client.create_experiment("no-items")
    seeds = (1, 2, 3)
    for fusion in ("additive", "cross_attention"):
        for seed in seeds:
            caption_run(client, experiment, fusion=fusion, seed=seed, items=False)
    spec = make_spec(
        kind="captioning",
        runs={"experiments": ["no-items"]},
        group={"ignore": ["cfg.output_dir"]},
        captioning={"figures": ["F2"]},
        stats={"n_resamples": 500},
        output_dir=str(tmp_path),
    )
    built = build(spec)
    runs = RunReader().find_runs(["no-items"])
    value = {(r.params["cfg.model.fusion"], r.params["cfg.seed"]): r.metrics["final/test_SPIDEr"] for r in runs}
    expected = paired_test(
        [value[("additive", str(s))] for s in seeds],
        [value[("cross_attention", str(s))] for s in seeds],
        test="wilcoxon",
    )
    f2 = built.tables["F2"]
    assert dict(f2.rows[2][2].data)[""] == pytest.approx(expected.p_value)
    assert f2.notes[0].startswith("over 3 seeds paired by seed (1, 2, 3)") and "wilcoxon" in f2.notes[0]


def test_gates_stability_and_curves_from_histories(caption_runs, caption_report):
    built = caption_report
    gates = built.tables["gate_magnitudes"]
    assert [row[0].text for row in gates.rows] == ["additive xe", "additive xe+scst"]
    last = [abs(-0.05 - 0.02 * 3 * s) for s in (1, 2)]  # |alpha| of layer 3 at the last epoch, seeds 1 and 2
    assert gates.cell(0, "layer 3").text == format_mean_std(np.mean(last), np.std(last, ddof=1), 4)
    stability = built.tables["stability"]
    assert stability.columns[2] == "retention/vl_accuracy"
    assert [row[0].text for row in stability.rows] == ["additive xe", "additive xe+scst", "cross_attention xe"]
    assert stability.cell(0, "retention/vl_accuracy").text == format_mean_std(0.7985, np.std([0.799, 0.798], ddof=1), 4)
    for name in ("F1", "F2", "pareto", "gate_heatmap", "stability"):
        assert {f"figures/{name}.png", f"figures/{name}.svg"} <= set(built.files), name


def test_targets_are_met_not_met_or_na(caption_report):
    outcomes = caption_report.targets
    assert [(o.status, o.group) for o in outcomes] == [
        ("met", "additive xe"),
        ("not met", "additive xe+scst"),
        ("met", "cross_attention xe"),
        ("n/a", None),
        ("met", "additive xe"),
        ("n/a", None),
        ("n/a", None),
    ]
    assert outcomes[0].metric == "final/test_SPIDEr" and outcomes[0].n == 2
    assert "no group labelled 'nobody'" in outcomes[3].reason
    # T2's runs could not run SPICE: its SPIDEr target is n/a, with their reason (T1's runs do log SPIDEr)
    assert outcomes[5].measured is None and "SPICE could not run" in outcomes[5].reason
    assert outcomes[6].reason == "no table named 'T9' (T1, T2)"


def test_two_builds_of_the_same_runs_are_byte_equal(caption_report):
    spec = caption_spec(caption_report.folder.parent)
    reader = RunReader()
    runs = reader.find_runs(["avlm-caption"], "tags.recipe = 'caption'")
    first = read_folder(caption_report.folder)
    # the runs in another order, read by another reader, into the same folder (a report folder is replaced)
    second = read_folder(build_report(spec, list(reversed(runs)), RunReader(), caption_report.folder).folder)
    assert first == second and len(first) > 30
    assert any(name.endswith(".svg") for name in first) and any(name.endswith(".png") for name in first)
    assert b"<dc:date>" not in first["figures/F1.svg"] and b"Matplotlib" not in first["figures/F1.png"]


def test_the_report_run_holds_the_report_and_is_never_read_as_a_run(caption_runs, tmp_path):
    entrypoints_report = load_entrypoint("report")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        f"name: captions\nkind: captioning\noutput_dir: {tmp_path}\nstats: {{n_resamples: 500}}\n"
        "captioning: {figures: [F1]}\ntargets: ['test/SPIDEr >= 0.3']\n"
    )
    assert entrypoints_report.main(["--spec", str(spec_file), "tracking.experiment=avlm-caption"]) == 0
    client = MlflowClient()
    (report,) = client.search_runs(
        [client.get_experiment_by_name("avlm-caption").experiment_id], "tags.recipe = 'report'"
    )
    assert report.info.run_name == "report-captions" and report.data.tags["report.targets"] == "1/1"
    assert report.data.tags["report.kind"] == "captioning" and report.data.params["spec.name"] == "captions"
    paths = {a.path for a in client.list_artifacts(report.info.run_id)}
    assert {"report.md", "report.html", "summary.json", "spec.yaml", "tables", "figures"} <= paths
    summary = json.loads((tmp_path / "captions/summary.json").read_text())
    assert summary["targets"][0]["status"] == "met" and len(summary["groups"]) == 5
    # the report run sits in the experiment it reads: a second report leaves it out
    reader = RunReader()
    kept, left_out = select_runs(reader.find_runs(["avlm-caption"]))
    assert left_out == {report.info.run_id: "a report run"} and len(kept) == 10
    assert entrypoints_report.main(["--spec", str(tmp_path / "missing.yaml")]) == 2


def test_generic_table_has_bootstrap_cis_over_seeds(tmp_path):
    runs = [
        record(f"r{s}{lr}", seed=s, params={"cfg.lr": lr}, metrics={"acc": 0.5 + 0.1 * s + float(lr)})
        for s in (1, 2, 3)
        for lr in ("0.1", "0.2")
    ] + [record("lonely", params={"cfg.lr": "0.3"}, metrics={"acc": 0.9})]
    spec = make_spec(
        generic={"metrics": ["acc", "missing"]},
        stats={"n_resamples": 1000, "seed": 3},
        targets=["acc < 0.8"],
        output_dir=str(tmp_path),
    )
    built = build_report(spec, runs, FakeSource(), tmp_path / "g")
    table = built.tables["metrics_by_group"]
    assert [row[0].text for row in table.rows] == ["lr=0.1", "lr=0.2", "lr=0.3"]
    ci = bootstrap_ci([0.7, 0.8, 0.9], method="percentile", n_resamples=1000, seed=3)
    assert table.cell(0, "acc").text == f"{ci.estimate:.4f} [{ci.low:.4f}, {ci.high:.4f}]"
    assert table.cell(2, "acc").text == "0.9000 [n/a]" and table.cell(0, "missing").text == "n/a"
    assert built.targets[0].status == "met" and built.targets[0].group == "lr=0.1"  # lowest mean for '<'


def test_split_metric_names_mean_the_best_checkpoint():
    run = record("a", metrics={"val/mAP": 0.1, "final/val_mAP": 0.3, "time/epoch_s": 2.0, "best/val/mAP": 0.3})
    context = ReportContext(make_spec(), [run], FakeSource())
    assert context.resolve("val/mAP") == "final/val_mAP"  # not the last epoch's val/mAP
    assert context.resolve("time/epoch_s") == "time/epoch_s" and context.resolve("best/val/mAP") == "best/val/mAP"
    assert context.resolve("test/mAP") == "test/mAP"  # nothing logs final/test_mAP: left as written (n/a)


def test_values_at_the_best_epoch_come_from_the_history_by_the_epoch_logged_at_the_same_step():
    run = record("a", metrics={"best_epoch": 2.0, "epoch": 3.0, "gap": 0.3})
    histories = {("a", "epoch"): [(10, 1.0), (20, 2.0), (30, 3.0)], ("a", "gap"): [(10, 0.1), (20, 0.2), (30, 0.3)]}
    context = ReportContext(make_spec(), [run], FakeSource(histories))
    assert context.by_epoch(run, "gap") == {1: 0.1, 2: 0.2, 3: 0.3}
    assert context.at_best_epoch(run, "gap") == 0.2
    assert context.at_best_epoch(record("b", metrics={"gap": 0.5}), "gap") == 0.5  # no best_epoch: the latest
