"""MLflow as the experiment tracker (logger/tracking.py; requirements-tracking.txt). The store is `uri`, else
MLFLOW_TRACKING_URI (a server, http://..., or a database), else the SQLite file <save_dir>/mlflow.db, whose
experiments keep their artifacts in <save_dir>/mlflow-artifacts/."""

import logging
import os
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

STORE, ARTIFACTS = "mlflow.db", "mlflow-artifacts"
# A server that is down or hung costs seconds once (then tracking is off), not MLflow's default of 7 retries of up to
# 120 s each; read by MLflow at each request. The user's own settings win.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# MLflow's and its database migrations' progress lines ("Creating initial MLflow database tables...") and urllib3's
# retries stay off the console: the one warning of a failure says it all
QUIET = ("mlflow", "alembic", "urllib3")


class MlflowTracker:
    """A run of an MLflow experiment: `start` it (or continue it), log to it, `end` it."""

    def __init__(self, uri: str | None, experiment: str, save_dir: str):
        for name, value in HTTP_SETTINGS.items():
            os.environ.setdefault(name, value)
        for name in QUIET:
            logging.getLogger(name).setLevel(logging.ERROR)
        self.experiment, self.run_id, self.client = experiment, None, None
        self.uri, self.store = uri or os.environ.get("MLFLOW_TRACKING_URI"), None
        if not self.uri:  # the embedded store; its experiments keep their artifacts next to it
            self.store = Path(save_dir).resolve()
            self.uri = f"sqlite:///{self.store / STORE}"

    def start(self, run_id: str | None, name: str, parent_id: str | None, tags: dict[str, str]) -> tuple[str, int]:
        """Continue run `run_id` (running again), or create run `name` (a child of `parent_id`, when given); its id
        and the last step it holds (0: none). A run the store does not have is created anew."""
        if self.store:
            self.store.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(self.uri)
        if run_id and self.has_run(run_id):
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            steps = [m.step for key in self.client.get_run(run_id).data.metrics
                     for m in self.client.get_metric_history(run_id, key)]
            return run_id, max(steps, default=0)
        found = self.client.get_experiment_by_name(self.experiment)
        artifacts = (self.store / ARTIFACTS).as_uri() if self.store else None
        experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment, artifacts)
        tags = {**tags, "mlflow.parentRunId": parent_id} if parent_id else tags
        self.run_id = self.client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
        return self.run_id, 0

    def has_run(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            return False
        return True

    def log_params(self, params: dict) -> None:
        self.client.log_batch(self.run_id, params=[Param(key, str(value)[:MAX_PARAM_VAL_LENGTH])
                                                   for key, value in params.items()])

    def log_metrics(self, values: dict[str, float], step: int, timestamp_ms: int) -> None:
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, timestamp_ms, step)
                                                    for key, value in values.items()])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
