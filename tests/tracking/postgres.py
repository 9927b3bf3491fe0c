"""A real PostgreSQL server for the registry tests, started from the binaries in the ``pgserver`` wheel.

Nothing to install on the machine: ``pip install -e ".[test]"`` brings ``pgserver`` (PostgreSQL's binaries) and
``psycopg2-binary`` (MLflow's driver). As root, pgserver runs the server as a system user ``pgserver`` that it
creates with ``useradd`` and lets it traverse the data folder's parents; the server listens on a unix socket in
its data folder only (``-h ""``: no TCP port at all).

MLflow's schema is migrated once per session into a template database; each test gets a copy of it
(``CREATE DATABASE ... TEMPLATE``, a file copy, far cheaper than MLflow's ~60 migrations), so tests are isolated.

Test modules use the fixtures ``registry_store`` and ``postgres`` by importing both
(``from postgres import postgres_fixture, registry_store_fixture``).
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TEMPLATE_DB = "mlflow_template"
_database_ids = itertools.count()
_SERVER = pytest.StashKey[Any]()


@contextlib.contextmanager
def running_postgres(data_dir: Path) -> Iterator[Any]:
    """Start a PostgreSQL server on ``data_dir`` (created) and stop it, deleting its data, on exit.

    Yields:
        The ``pgserver.PostgresServer``; ``get_uri(database)`` is its unix-socket ``postgresql://`` URI.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about an unset XDG_RUNTIME_DIR on import
        import pgserver

    server = pgserver.get_server(data_dir, cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()


def _execute(server: Any, *statements: str) -> None:
    """Run statements outside a transaction (CREATE DATABASE refuses to run inside one)."""
    import psycopg2

    connection = psycopg2.connect(server.get_uri())
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        connection.close()


def migrate_template(server: Any, artifact_root: Path) -> None:
    """Create ``TEMPLATE_DB`` with MLflow's tracking and registry tables."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    _execute(server, f"CREATE DATABASE {TEMPLATE_DB}")
    SqlAlchemyStore(mlflow_uri(server, TEMPLATE_DB), artifact_root.as_uri())
    # A template must have no open connections when it is copied; MLflow keeps its engine's pool open.
    _execute(
        server,
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{TEMPLATE_DB}'"
        " AND pid <> pg_backend_pid()",
    )


def mlflow_uri(server: Any, database: str) -> str:
    """MLflow's URI of ``database``: psycopg2 named, as SQLAlchemy >= 2.1 maps bare ``postgresql://`` to psycopg 3."""
    return server.get_uri(database).replace("postgresql://", "postgresql+psycopg2://", 1)


def fresh_database(server: Any) -> str:
    """A new database holding MLflow's empty schema; returns its MLflow URI."""
    name = f"mlflow_test_{next(_database_ids)}"
    _execute(server, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    return mlflow_uri(server, name)


@pytest.fixture(scope="session", name="postgres")
def postgres_fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One PostgreSQL server for the session, with MLflow's schema in a template database.

    Each module importing this fixture makes a fixture definition of its own, so the server is kept in the
    session's stash (one per session) and stopped when the session ends, also after a failure.
    """
    if _SERVER not in request.config.stash:
        stack = contextlib.ExitStack()
        request.config.add_cleanup(stack.close)
        # Not under pytest's basetemp: every pytest run makes /tmp/pytest-of-<user> private again (0700), which
        # would lock the server's own system user out of its data folder.
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="avlm-postgres-")))
        server = stack.enter_context(running_postgres(base / "data"))
        migrate_template(server, tmp_path_factory.mktemp("postgres_artifacts"))
        request.config.stash[_SERVER] = server
    return request.config.stash[_SERVER]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)], name="registry_store")
def registry_store_fixture(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty MLflow tracking + registry store, once on sqlite and once on PostgreSQL; returns its URI.

    The sqlite store is conftest's ``mlflow_store`` (temp working directory, a clean fluent-API state); the
    PostgreSQL store takes the same setup and points it at a fresh database. The PostgreSQL cases are ``slow``:
    starting the server and migrating MLflow's schema costs 15-40 s once per session.
    """
    import mlflow

    uri = request.getfixturevalue("mlflow_store")
    if request.param == "postgresql":
        uri = fresh_database(request.getfixturevalue("postgres"))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
    return uri
