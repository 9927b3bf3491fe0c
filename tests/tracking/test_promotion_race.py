"""Several processes promote versions of one model at the same moment; the gate must behave as if they queued."""

import multiprocessing
import random
import warnings

import pytest
from mlflow import MlflowClient
from mlflow_server import MlflowServer
from postgres import postgres_fixture, registry_store_fixture  # noqa: F401  (sqlite and PostgreSQL stores)
from test_registry import add_version, stage

PROCESSES = 4
TRIALS = 3
START_TIMEOUT_S = 120  # spawning a child and importing mlflow takes seconds on a loaded 2-core machine
RACE_TIMEOUT_S = 120


def promote_in_child(uri: str, barrier, jobs: list[tuple[str, str]]) -> None:
    """Child process: for each trial, wait until every child is ready, then promote its version at once."""
    import mlflow

    from avlm.tracking.registry import RegistryConfig, promote_if_better

    mlflow.set_tracking_uri(uri)
    for name, version in jobs:
        barrier.wait(timeout=START_TIMEOUT_S)
        promote_if_better(RegistryConfig(name=name), version)


def race(uri: str, jobs_per_child: list[list[tuple[str, str]]]) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(jobs_per_child))
    children = [context.Process(target=promote_in_child, args=(uri, barrier, jobs)) for jobs in jobs_per_child]
    for child in children:
        child.start()
    try:
        for child in children:
            child.join(START_TIMEOUT_S + RACE_TIMEOUT_S)
        assert [child.exitcode for child in children] == [0] * len(children)
    finally:
        for child in children:
            if child.is_alive():
                child.kill()


def assert_one_promotion_chain(name: str, initial: str, values: dict[str, float]) -> None:
    """The registry reads as a serial history: one chain of promotions from ``initial`` up to the best version."""
    client = MlflowClient()
    tags = {version: client.get_model_version(name, version).tags for version in values if version != initial}
    best = max(values, key=values.get)
    assert str(client.get_model_version_by_alias(name, "champion").version) == best

    promoted = {v: t["promotion.champion_version"] for v, t in tags.items() if t["promotion.decision"] == "promoted"}
    # Each champion is superseded at most once, and each promotion beat the champion it read.
    assert len(set(promoted.values())) == len(promoted), promoted
    chain, version = [initial], initial
    while version in promoted.values():
        version = next(v for v, previous in promoted.items() if previous == version)
        assert values[version] > values[chain[-1]]
        assert client.get_model_version(name, chain[-1]).tags["promotion.superseded_by"] == version
        chain.append(version)
    assert chain[-1] == best and set(chain[1:]) == set(promoted)
    # A rejected version lost to the champion it read, which is on the chain.
    for version, version_tags in tags.items():
        if version_tags["promotion.decision"] == "rejected":
            assert version_tags["promotion.champion_version"] in chain
            assert float(version_tags["promotion.champion_value"]) >= values[version]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert stage(name, best) == "Production"
        assert {stage(name, v) for v in chain[:-1]} <= {"Archived"}
        assert {stage(name, v) for v in values if v not in chain} <= {"None"}


def race_and_check(uri: str) -> None:
    """TRIALS models, each with a champion and PROCESSES better-or-worse versions that PROCESSES children promote
    at the same moment; then the registry of each must read as a serial history."""
    from avlm.tracking.registry import RegistryConfig, promote_if_better

    rng = random.Random(0)
    jobs_per_child: list[list[tuple[str, str]]] = [[] for _ in range(PROCESSES)]
    trials = {}
    for trial in range(TRIALS):
        name = f"race-{trial}"
        initial, _ = add_version(name, 0.05)
        promote_if_better(RegistryConfig(name=name), initial)
        scores = [round(0.1 + 0.1 * i, 2) for i in range(PROCESSES)]
        rng.shuffle(scores)  # the best version is not always the last registered
        values = {initial: 0.05}
        for child, score in enumerate(scores):
            version, _ = add_version(name, score)
            values[version] = score
            jobs_per_child[child].append((name, version))
        trials[name] = (initial, values)

    race(uri, jobs_per_child)

    for name, (initial, values) in trials.items():
        assert_one_promotion_chain(name, initial, values)


@pytest.mark.slow
def test_concurrent_promotions_leave_the_best_version_champion(registry_store):
    race_and_check(registry_store)


@pytest.mark.slow
def test_concurrent_promotions_through_an_mlflow_server_leave_the_best_version_champion(
    mlflow_store, tmp_path, monkeypatch
):
    """Over HTTP the clients cannot lock the database: the lock is a registered model only one can create."""
    import mlflow

    with MlflowServer(tmp_path / "server") as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        mlflow.set_tracking_uri(server.url)
        race_and_check(server.url)
        assert not [m.name for m in MlflowClient().search_registered_models() if m.name.endswith(".promotion-lock")]
