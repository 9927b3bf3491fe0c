"""Reading runs back from MLflow: experiments, filters, statuses, histories, JSON artifacts."""

import pytest
from mlflow import MlflowClient
from report_runs import log_run

from avlm.errors import ConfigError
from avlm.tracking.run_table import RunReader, find_runs, metric_history


def test_find_runs_reads_params_metrics_tags_in_a_stable_order(mlflow_store):
    client = MlflowClient()
    first, second = client.create_experiment("one"), client.create_experiment("two")
    a = log_run(client, first, name="a", params={"cfg.seed": 1}, metrics={"m": [(1, 0.2), (2, 0.4)]}, tags={"t": "x"})
    b = log_run(client, second, name="b", params={"cfg.seed": 2}, metrics={"m": 0.9}, tags={"t": "y"})
    c = log_run(client, second, name="c", params={"cfg.seed": 3}, status="FAILED")

    runs = find_runs(["two", "one"])
    assert [r.run_id for r in runs] == [a, b, c]  # by experiment name, then start time
    assert (runs[0].experiment, runs[0].run_name, runs[0].status) == ("one", "a", "FINISHED")
    assert runs[0].params == {"cfg.seed": "1"} and runs[0].metrics == {"m": 0.4} and runs[0].tags["t"] == "x"
    assert [r.run_id for r in find_runs(["one", "two"], "tags.t = 'y'")] == [b]
    assert [r.run_id for r in RunReader().find_runs(["two"], statuses=["FINISHED"])] == [b]


def test_find_runs_refuses_an_unknown_experiment_and_a_bad_filter(mlflow_store):
    MlflowClient().create_experiment("one")
    with pytest.raises(ConfigError, match="no MLflow experiment named 'nope'.*known: \\['Default', 'one'\\]"):
        find_runs(["nope"])
    with pytest.raises(ConfigError, match="refused the run filter"):
        find_runs(["one"], "tags.t ~~ 'y'")
    with pytest.raises(ConfigError, match="at least one experiment"):
        find_runs([])


def test_history_keeps_the_last_point_of_a_step_and_json_artifacts_read_back(mlflow_store):
    client = MlflowClient()
    experiment = client.create_experiment("one")
    # a resumed run logs an epoch again at the same step: the later point is what the run ended with
    run_id = log_run(
        client,
        experiment,
        name="a",
        metrics={"m": [(2, 0.5), (1, 0.1), (2, 0.7)]},
        artifacts={"predictions/test_predictions.json": [{"id": "x", "scores": {"CIDEr_D": 1.5}}]},
    )
    assert metric_history(run_id, "m") == [(1, 0.1), (2, 0.7)]
    assert metric_history(run_id, "never") == []
    reader = RunReader()
    assert reader.load_json_artifact(run_id, "predictions/test_predictions.json") == [
        {"id": "x", "scores": {"CIDEr_D": 1.5}}
    ]
    assert reader.load_json_artifact(run_id, "predictions/val_predictions.json") is None
