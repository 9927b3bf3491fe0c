"""MLflow side of promotion chains (:mod:`avlm.protocol.chain`): the chain run, its stage runs, their records, and
the count of a push's ideas.

A chain run carries tag ``avlm.chain.role = chain`` with its name, idea hash and push; each stage run is a child of
it (``mlflow.parentRunId``) with ``avlm.chain.role = stage`` and ``avlm.chain.stage``. Writes go straight to the
store with the client: a chain writes a few dozen records between sweeps, and a store that is away fails the sweeps
anyway (the trainings' own metrics go through their outbox).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from avlm.tracking.children import SweepRuns

ROLE_TAG = "avlm.chain.role"  # chain | stage
NAME_TAG = "avlm.chain.name"
SHA_TAG = "avlm.chain.spec_sha256"
PUSH_TAG = "avlm.chain.push"
MAX_IDEAS_TAG = "avlm.chain.max_ideas"
STAGE_TAG = "avlm.chain.stage"
RULE_SHA_TAG = "avlm.chain.rule_sha256"
OUTCOME_TAG = "avlm.chain.outcome"  # running | passed | stopped | failed
STOPPED_AT_TAG = "avlm.chain.stopped_at"
RESUMED_INTO_TAG = "avlm.chain.resumed_into"
REGISTERED_TAG = "avlm.chain.registered_version"
PARENT_ID_TAG = "mlflow.parentRunId"
SPEC_ARTIFACT = "chain_spec.json"
_TAG_LIMIT = 5000  # MLflow allows 8000; a tag is for reading, the JSON artifacts hold everything


@dataclasses.dataclass
class ChainRunRecord:
    """A chain run as the stop rule counts it.

    Attributes:
        run_id: the chain run.
        run_name: its name.
        experiment: its experiment's name.
        chain_sha256: the idea it ran (tag ``avlm.chain.spec_sha256``).
        status: RUNNING | FINISHED | FAILED | KILLED.
        outcome: passed | stopped | failed | running ("" when never recorded).
        deleted: the run was deleted (it still counts).
        start_time: milliseconds since the epoch.
    """

    run_id: str
    run_name: str
    experiment: str
    chain_sha256: str
    status: str
    outcome: str
    deleted: bool
    start_time: int


def _search_all(client: Any, experiment_ids: list[str], filter_string: str, *, deleted_too: bool = False) -> list[Any]:
    from mlflow.entities import ViewType

    view_type = ViewType.ALL if deleted_too else ViewType.ACTIVE_ONLY
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string, run_view_type=view_type, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _oldest(runs: list[Any]) -> str:
    return min(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)).info.run_id


@dataclasses.dataclass
class OpenedChainRun:
    """The run a chain records into.

    Attributes:
        run_id: the chain run.
        experiment_id: its experiment (the stage and sweep runs go there too).
        resumed: it held this idea already (a re-run of the same spec continues in it).
        launcher_run_id: the run ``mlflow run`` made, when it is not the chain run (it points at it instead).
    """

    run_id: str
    experiment_id: str
    resumed: bool
    launcher_run_id: str | None = None


class ChainRuns(SweepRuns):
    """The chain runs of one tracking store (an MLflow client bound to its URI, which also becomes the fluent API's
    URI, so that the registry calls of a promotion reach the same store). Tags and metrics are written as the
    sweep's runs are."""

    tag_limit = _TAG_LIMIT

    def __init__(self, tracking_uri: str):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        super().__init__(tracking_uri)

    def of_push(self, push: str) -> list[ChainRunRecord]:
        """Every chain run tagged with ``push``, in every experiment of the store, deleted ones included, oldest
        first. ``push`` must be a plain name (letters, digits, ``_.-``): it goes into an MLflow filter string."""
        from mlflow.entities import ViewType

        experiments = {e.experiment_id: e.name for e in self.client.search_experiments(view_type=ViewType.ALL)}
        if not experiments:
            return []
        runs = _search_all(
            self.client,
            list(experiments),
            f"tags.`{ROLE_TAG}` = 'chain' and tags.`{PUSH_TAG}` = '{push}'",
            deleted_too=True,
        )
        records = [
            ChainRunRecord(
                run_id=run.info.run_id,
                run_name=run.info.run_name or "",
                experiment=experiments.get(run.info.experiment_id, run.info.experiment_id),
                chain_sha256=run.data.tags.get(SHA_TAG, ""),
                status=run.info.status,
                outcome=run.data.tags.get(OUTCOME_TAG, ""),
                deleted=run.info.lifecycle_stage == "deleted",
                start_time=run.info.start_time or 0,
            )
            for run in runs
        ]
        return sorted(records, key=lambda r: (r.start_time, r.run_id))

    def open_chain_run(
        self, *, experiment: str, run_name: str, chain_sha256: str, tags: Mapping[str, str]
    ) -> OpenedChainRun:
        """The chain run of idea ``chain_sha256``: the one its experiment already has for it (reopened, RUNNING),
        else the launcher's ``$MLFLOW_RUN_ID`` run (``mlflow run`` made it), else a new run in ``experiment``.

        Under ``mlflow run`` with the idea run already, the launcher's run gets tag ``avlm.chain.resumed_into``
        naming the chain run and stays otherwise empty.
        """
        launcher = os.environ.get("MLFLOW_RUN_ID") or None
        if launcher:
            experiment_id = self.client.get_run(launcher).info.experiment_id
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        previous = [
            run
            for run in _search_all(
                self.client, [experiment_id], f"tags.`{ROLE_TAG}` = 'chain' and tags.`{SHA_TAG}` = '{chain_sha256}'"
            )
            if run.info.run_id != launcher
        ]
        all_tags = {ROLE_TAG: "chain", SHA_TAG: chain_sha256, OUTCOME_TAG: "running", **tags}
        if previous:
            run_id = _oldest(previous)
            self.client.update_run(run_id, status="RUNNING")
            if launcher:
                self.client.set_tag(launcher, RESUMED_INTO_TAG, run_id)
            if STOPPED_AT_TAG in self.client.get_run(run_id).data.tags:
                self.client.delete_tag(run_id, STOPPED_AT_TAG)  # the stages decide again below
            self.set_tags(run_id, all_tags)
            return OpenedChainRun(run_id, experiment_id, resumed=True, launcher_run_id=launcher)
        if launcher:
            self.set_tags(launcher, {**all_tags, "mlflow.runName": run_name})
            return OpenedChainRun(launcher, experiment_id, resumed=False)
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        return OpenedChainRun(run.info.run_id, experiment_id, resumed=False)

    def open_stage_run(self, chain: OpenedChainRun, stage: str, *, run_name: str, tags: Mapping[str, str]) -> str:
        """The stage's child run of the chain run: the one it has already (a resumed chain; reopened), else a new
        one."""
        existing = _search_all(
            self.client,
            [chain.experiment_id],
            f"tags.`{PARENT_ID_TAG}` = '{chain.run_id}' and tags.`{STAGE_TAG}` = '{stage}'",
        )
        all_tags = {ROLE_TAG: "stage", STAGE_TAG: stage, PARENT_ID_TAG: chain.run_id, **tags}
        if existing:
            run_id = _oldest(existing)
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(run_id, all_tags)
            return run_id
        return self.client.create_run(chain.experiment_id, run_name=run_name, tags=all_tags).info.run_id

    def stage_runs(self, chain_run_id: str) -> dict[str, Any]:
        """The chain run's stage runs by stage name (MLflow ``Run`` objects)."""
        experiment_id = self.client.get_run(chain_run_id).info.experiment_id
        runs = _search_all(
            self.client,
            [experiment_id],
            f"tags.`{PARENT_ID_TAG}` = '{chain_run_id}' and tags.`{ROLE_TAG}` = 'stage'",
        )
        return {run.data.tags[STAGE_TAG]: run for run in runs}

    def log_dict(self, run_id: str, data: Any, artifact_file: str) -> None:
        """Write ``data`` as the JSON artifact ``artifact_file`` of the run."""
        self.client.log_dict(run_id, data, artifact_file)
