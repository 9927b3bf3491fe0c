"""P5: metric points through avlm's logger ÷ the synchronous ``MlflowClient.log_metric`` loop, both fully flushed;
then the same against a real ``mlflow server`` that is killed for part of the run.

Run it::

    python bench/metric_logging.py                       # 10,000 points; sqlite, then a real server (~3 minutes)
    python bench/metric_logging.py --points 2000 --no-server

sqlite: a fresh sqlite store in a temporary folder, one run per side. The synchronous side calls
``MlflowClient.log_metric`` once per point (what a loop logging every step without a buffer pays); a sqlite write
costs milliseconds, so it runs on ``--sync-points`` points (default 1,000) and its time is scaled to ``--points``
(printed as such). The avlm side logs ``--points`` points with ``MLflowLogger.log_metrics`` and then ``close()``,
which returns only once every point is in the store; its time includes that flush. The target is <= 0.02. Both sides
then count the points in the store (none lost, none twice).

server: ``mlflow server`` (sqlite + artifact proxy) on 127.0.0.1; the synchronous loop runs against it over HTTP
while it is up. The avlm side logs a third of the points, the server is killed (SIGKILL), the second third is logged
during the outage, the server is restarted in the background while the last third is logged, and ``close()`` waits
until everything is delivered. MLflow's HTTP retries are set to 0 for the avlm side (``MLFLOW_HTTP_REQUEST_*``:
no retries, 5 s timeout), so every request during the outage fails at once and the logger's own queue and retries
are what keeps the points. Printed:
the training thread's cost (its time inside ``log_metrics`` calls; the waiting for the server to come back is not a
cost the training pays) ÷ the scaled synchronous loop, and how long the delivery took after the server answered again
(the logger's retry backoff, at most 10 s, included).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

from mlflow import MlflowClient  # noqa: E402

from avlm.tracking import MLflowLogger  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "tracking"))
from mlflow_server import MlflowServer  # noqa: E402

KEY = "train/step_loss"


def sync_loop(client: MlflowClient, run_id: str, points: int) -> float:
    """Seconds to log ``points`` points one ``log_metric`` call at a time."""
    start = time.perf_counter()
    for step in range(points):
        client.log_metric(run_id, KEY, 1.0 / (step + 1), step=step)
    return time.perf_counter() - start


def stored_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, KEY))


def check_all_there(client: MlflowClient, run_id: str, points: int, who: str) -> None:
    steps = stored_steps(client, run_id)
    if steps != list(range(points)):
        raise SystemExit(f"{who}: {len(steps)} points stored ({len(set(steps))} distinct steps), expected {points}")


def bench_sqlite(root: Path, points: int, sync_points: int) -> dict[str, float]:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("p5-sqlite")
    sync_run, avlm_run = (client.create_run(experiment).info.run_id for _ in range(2))
    sync_s = sync_loop(client, sync_run, sync_points)
    check_all_there(client, sync_run, sync_points, "sync loop")

    run_logger = MLflowLogger(avlm_run, local_dir=root / "avlm", tracking_uri=uri)
    start = time.perf_counter()
    for step in range(points):
        run_logger.log_metrics({KEY: 1.0 / (step + 1)}, step=step)
    calls_s = time.perf_counter() - start
    if not run_logger.close("FINISHED"):
        raise SystemExit("avlm logger: points left undelivered on sqlite")
    avlm_s = time.perf_counter() - start
    check_all_there(client, avlm_run, points, "avlm logger")
    return {"sync_s": sync_s * points / sync_points, "avlm_s": avlm_s, "calls_s": calls_s}


def bench_server_outage(root: Path, points: int, sync_points: int) -> dict[str, float]:
    short_retries = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    server = MlflowServer(root / "server")
    restart = threading.Thread(target=server.start, name="restart")
    try:
        server.start()
        client = MlflowClient(server.url)
        experiment = client.create_experiment("p5-server")
        sync_run, avlm_run = (client.create_run(experiment).info.run_id for _ in range(2))
        sync_s = sync_loop(client, sync_run, sync_points)
        check_all_there(client, sync_run, sync_points, "sync loop (server)")

        os.environ.update(short_retries)
        run_logger = MLflowLogger(avlm_run, local_dir=root / "avlm-server", tracking_uri=server.url)
        calls_s = 0.0
        thirds = [range(points)[i * points // 3 : (i + 1) * points // 3] for i in range(3)]
        for third, steps in enumerate(thirds):
            if third == 1:
                server.kill()
            elif third == 2:
                restart.start()
            start = time.perf_counter()
            for step in steps:
                run_logger.log_metrics({KEY: 1.0 / (step + 1)}, step=step)
            calls_s += time.perf_counter() - start
        restart.join(timeout=300)
        back_at = time.perf_counter()
        if not run_logger.close("FINISHED"):
            raise SystemExit("avlm logger: points left undelivered after the server came back")
        drain_s = time.perf_counter() - back_at
        for name in short_retries:  # the checks below read 10,000 points at once: MLflow's defaults again
            os.environ.pop(name)
        check_all_there(client, avlm_run, points, "avlm logger (server)")
        status = client.get_run(avlm_run).info.status
        if status != "FINISHED":
            raise SystemExit(f"avlm logger (server): run ended {status}, expected FINISHED")
        return {"sync_s": sync_s * points / sync_points, "calls_s": calls_s, "drain_s": drain_s}
    finally:
        if restart.is_alive():
            restart.join(timeout=300)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--points", type=int, default=10_000, help="points through avlm's logger")
    parser.add_argument("--sync-points", type=int, default=1_000, help="points through the sync loop (scaled)")
    parser.add_argument("--no-server", action="store_true", help="skip the real-server outage part")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the outage's retry warnings are expected

    with tempfile.TemporaryDirectory() as tmp:
        sqlite = bench_sqlite(Path(tmp), args.points, args.sync_points)
        server = None if args.no_server else bench_server_outage(Path(tmp), args.points, args.sync_points)

    scale = f"measured on {args.sync_points:,} points, scaled to {args.points:,}"
    print(f"P5 metric logging: {args.points:,} points; sync MlflowClient.log_metric loop {scale}")
    print(f"{'':34} {'sync loop':>12} {'avlm logger':>12} {'ratio':>8}  target <= 0.02")
    print(
        f"{'sqlite, fully flushed':34} {sqlite['sync_s']:>11.2f}s {sqlite['avlm_s']:>11.3f}s "
        f"{sqlite['avlm_s'] / sqlite['sync_s']:>8.4f}  (log_metrics calls alone: {sqlite['calls_s']:.3f}s)"
    )
    if server:
        print(
            f"{'server killed for ~2/3 of the run':34} {server['sync_s']:>11.2f}s {server['calls_s']:>11.3f}s "
            f"{server['calls_s'] / server['sync_s']:>8.4f}  (training-thread time in log_metrics; the sync loop "
            "would have crashed at the kill)"
        )
        print(f"{'':34} all {args.points:,} points delivered once, {server['drain_s']:.1f}s after the server answered")
    print(f"no point lost or duplicated: {args.points:,} distinct steps in each avlm run")


if __name__ == "__main__":
    main()
