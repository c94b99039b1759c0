"""A sweep's trials through Ray Tune, when the sweep runs as a Ray job (``FORGE_EXECUTOR=ray``): one Tune trial
per configuration, each asking for a CPU (a GPU where the cluster has one for every trial) and the custom
resources FORGE_RAY_RESOURCES names, so trials run side by side where the cluster has room and queue where it
has not. A trial trains and evaluates in its own run dir on the storage every node sees; its events and its
final row come back to this driver as Tune results, and go to the sweep's hooks (a job per trial)."""

from __future__ import annotations

import os

from forge.runs import Outcome

TRIAL_CPUS_ENV = "FORGE_RAY_TRIAL_CPUS"


def _resources():
    """One bundle per trial: CPUs (FORGE_RAY_TRIAL_CPUS, default 1), a GPU where the cluster has GPUs, and the
    custom resources of the nodes jobs belong on."""
    import ray
    from ray import tune

    from forge.train.ray_train import custom_resources

    each = {"CPU": float(os.environ.get(TRIAL_CPUS_ENV) or 1), **custom_resources()}
    if ray.cluster_resources().get("GPU", 0) >= 1:
        each["GPU"] = 1.0
    return tune.PlacementGroupFactory([each])


def _trainable(config, trials: list, run_trial):
    """The function each Tune trial runs: one configuration trained and evaluated (``run_trial``, given by
    forge.sweep, which this module never imports back), its events reported."""

    def run(params: dict) -> None:
        from ray import tune

        from forge.progress import quiet_libraries
        from forge.sweep_relay import EVALUATION, EVALUATION_KEYS, EVENT, ROW

        quiet_libraries()
        trial = next(t for t in trials if t.number == params["trial"])

        def on_progress(event: dict) -> None:
            if event.get("event") in ("progress", "stage", "warning", "defaults"):
                tune.report({EVENT: event})

        evaluated = None
        try:
            row, evaluated = run_trial(config, trial, on_progress)
        except Exception as exc:  # noqa: BLE001 - the trial's failure is its row
            from forge.failures import error_from

            row = {**trial.row(), "status": Outcome.FAILED, "error": error_from(exc).to_dict()}
        evaluation = {k: evaluated[k] for k in EVALUATION_KEYS if k in evaluated} if evaluated else None
        tune.report({ROW: row, **({EVALUATION: evaluation} if evaluation and "table" in evaluated else {})})

    return run


def tune_trials(config, trials: list, hooks, run_trial) -> list[dict]:
    """Run every trial through Ray Tune (each calling ``run_trial(config, trial, on_progress)``); the rows in
    trial order (a trial Tune never started: skipped)."""
    import ray
    from ray import tune

    ray.init(ignore_reinit_error=True, log_to_driver=True)  # inside a Ray job: the job's own cluster
    from forge.sweep_relay import Relay

    relay = Relay(trials, hooks)
    tuner = tune.Tuner(
        tune.with_resources(_trainable(config, trials, run_trial), _resources()),
        param_space={"trial": tune.grid_search([t.number for t in trials])},
        tune_config=tune.TuneConfig(num_samples=1, time_budget_s=60 * config.minutes if config.minutes else None),
        run_config=tune.RunConfig(name="tune", storage_path=str((config.sweep_dir() / "tune").resolve()),
                                  callbacks=[relay], verbose=0))
    tuner.fit()
    rows = []
    for trial in trials:
        row = relay.rows.get(trial.number)
        if row is None:
            why = ("the time budget stopped it while it ran" if trial.number in relay.started
                   else "Ray Tune did not start it before the time budget ran out")
            row = {**trial.row(), "status": "skipped", "why": why}
            hooks.finished(trial, row, None)
        rows.append(row)
    return rows
