"""The MLflow runs of a sweep: the sweep run, and one parent run per ablation file nested under it (client-side
runs, so the children log from their own processes); the links into the UI. Part of biomass.tracking."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from dataclasses import dataclass

from biomass.errors import BiomassError
from biomass.tracking import experiment_id, git_state, open_client
from biomass.tracking.server import UI_PORT, TrackingServer, is_http, is_local_store, stop_leftover_server, ui_links


@dataclass
class ParentRecord:
    """What an ablation's parent run records when it is created, as `biomass.ablate` describes the ablation (this
    module knows MLflow, not ablation files): its name, tags, params, and the name of its baseline row."""
    name: str
    tags: dict[str, str]
    params: dict[str, str]
    baseline: str


class SweepRuns:
    """The sweep's MLflow side: the tracking URI the children use (a server this sweep starts over a local store
    when children run at once), the sweep run and one parent run per ablation, nested under it."""

    def __init__(self, records: list[ParentRecord], seeds: int, sweep_dir: Path, parallel: int, executor: str,
                 experiment: str, saved: dict[str, Any]):
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.store_uri = mlflow.get_tracking_uri()
        self.server: TrackingServer | None = None
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the sweep prints its own links
        stop_leftover_server(saved.get("server_session"))
        self.uri = self.store_uri
        if parallel > 1 and is_local_store(self.store_uri):
            # SQLite takes one writer at a time: concurrent children would fail with "database is locked"
            self.server = TrackingServer(self.store_uri, sweep_dir / "mlflow-server.log")
            self.uri = self.server.start()
            saved["server_session"] = self.server.session
        try:
            self.client = open_client(self.uri)
            self.experiment_id = experiment_id(self.client, experiment)
            if saved.get("sweep_run_id"):
                self.sweep_run_id = saved["sweep_run_id"]
                self.client.update_run(self.sweep_run_id, status="RUNNING")
            else:
                tags = {"role": "sweep", "sweep_dir": str(sweep_dir), "ablations": ", ".join(r.name for r in records),
                        "seeds": str(seeds), "executor": executor, "parallel": str(parallel),
                        **git_state(Path(__file__).parent)}
                self.sweep_run_id = self.client.create_run(self.experiment_id, run_name=f"sweep-{sweep_dir.name}",
                                                           tags=tags).info.run_id
                saved["sweep_run_id"] = self.sweep_run_id
        except BiomassError:
            raise
        except Exception as err:  # an unreachable server, a bad URI
            self.close()
            raise BiomassError(f"MLflow tracking at {self.uri}: cannot start the sweep run "
                               f"({' '.join(str(err).split())[:300]})") from None
        parents = saved.setdefault("parent_run_ids", {})
        self.parents = {r.name: Parent(self.client, self.experiment_id, r, self.sweep_run_id, parents.get(r.name))
                        for r in records}
        parents.update({name: p.run_id for name, p in self.parents.items()})

    def finish(self, files: list[Path], status: str) -> dict[str, str]:
        for f in files:
            self.client.log_artifact(self.sweep_run_id, str(f))
        self.client.set_terminated(self.sweep_run_id, status)
        base = self.store_uri.rstrip("/") if is_http(self.store_uri) else f"http://127.0.0.1:{UI_PORT}"
        return ui_links(base, self.experiment_id, self.sweep_run_id, [p.run_id for p in self.parents.values()])

    def abort(self, status: str) -> None:
        for p in self.parents.values():
            p.abort(status)
        try:
            self.client.set_terminated(self.sweep_run_id, status)
        except Exception:  # noqa: BLE001 - already failing
            pass

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


class Parent:
    """The ablation's parent MLflow run (a client-side run, so the children run in their own processes), nested under
    the sweep's run. `run_id` continues the parent of a resumed sweep."""

    def __init__(self, client, experiment_id: str, record: ParentRecord, sweep_run_id: str | None,
                 run_id: str | None = None):
        from mlflow.entities import Param

        self.client = client
        self.baseline = record.baseline
        try:
            if run_id:
                self.run_id = run_id
                client.update_run(run_id, status="RUNNING")
                return
            tags = {**record.tags, "role": "ablation", **git_state(Path(__file__).parent)}
            if sweep_run_id:
                tags["mlflow.parentRunId"] = sweep_run_id
            run = client.create_run(experiment_id, run_name=f"ablation-{record.name}", tags=tags)
            self.run_id = run.info.run_id
            params = [Param(key, value[:6000]) for key, value in record.params.items()]
            for i in range(0, len(params), 90):
                client.log_batch(self.run_id, params=params[i:i + 90])
        except Exception as err:  # an unreachable server, a bad URI
            raise BiomassError(f"MLflow tracking at {client.tracking_uri}: cannot start the ablation's parent run "
                               f"({' '.join(str(err).split())[:300]})") from None

    def finish(self, rows: list[dict[str, Any]], verdict: str, files: list[Path], status: str,
               children: dict[str, str] | None = None) -> None:
        """Scores, Δ (mean ± std over seeds; the bootstrap CI as delta/<variant>/ci_lo, ci_hi), a `verdict` tag per
        variant and overall, and tags `child.<variant>.seed<k>` naming each child's MLflow run (a child shared with
        another ablation is nested under only one parent; this tag is how the others find it)."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = []
        for row in rows:
            for col, metric in (("oracle", "weighted_r2"), ("deployable", "weighted_r2_deployable")):
                for prefix, value, std in (("cv", row[col], row[f"{col}_std"]),
                                           ("delta", row[f"delta_{col}"], row[f"delta_{col}_std"])):
                    if prefix == "delta" and row["variant"] == self.baseline:
                        continue
                    if value is not None:
                        metrics.append(Metric(f"{prefix}/{row['variant']}/{metric}", float(value), now, 0))
                    if std is not None:
                        metrics.append(Metric(f"{prefix}/{row['variant']}/{metric}_std", float(std), now, 0))
            for key in ("ci_lo", "ci_hi"):
                if row.get(key) is not None:
                    metrics.append(Metric(f"delta/{row['variant']}/{key}", float(row[key]), now, 0))
        metrics.append(Metric("runs/completed", float(sum(r["completed"] for r in rows)), now, 0))
        metrics.append(Metric("runs/failed", float(sum(r["runs"] - r["completed"] for r in rows)), now, 0))
        for i in range(0, len(metrics), 900):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 900])
        tags = [RunTag(f"verdict.{r['variant']}", r["verdict"]) for r in rows if r.get("verdict")]
        tags.append(RunTag("verdict", verdict))
        tags += [RunTag(f"child.{label}", run_id) for label, run_id in (children or {}).items() if run_id]
        for i in range(0, len(tags), 90):
            self.client.log_batch(self.run_id, tags=tags[i:i + 90])
        for f in files:
            self.client.log_artifact(self.run_id, str(f))
        self.client.set_terminated(self.run_id, status)

    def abort(self, status: str) -> None:
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception:  # noqa: BLE001 - already failing; the run stays RUNNING in the UI at worst
            pass
