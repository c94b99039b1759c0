"""Ray Tune's driver-side callback for a sweep: each trial's events and final row, reported by the trial as Tune
results, handed to the sweep's hooks (a job per trial). Imported only where Ray runs the sweep
(forge.sweep_tune). Tune keeps a pickled copy of its callbacks with the experiment's state: the copy leaves the
hooks out (they hold the job store's connection), since a sweep never resumes through Tune."""

from __future__ import annotations

from ray.tune import Callback

from forge.runs import Outcome

EVENT, ROW, EVALUATION = "forge_event", "forge_row", "forge_evaluation"
# what a trial's evaluation brings back to its job (the rest stays in the trial's stages/evaluate.json)
EVALUATION_KEYS = ("table", "learned", "forgetting", "samples", "warnings", "stopped_on_its_own", "source",
                   "tokens", "record")


class Relay(Callback):
    def __init__(self, trials: list, hooks):
        self.by_number = {t.number: t for t in trials}
        self.hooks = hooks
        self.rows: dict[int, dict] = {}
        self.started: set[int] = set()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "hooks": None}

    def _trial(self, tune_trial):
        return self.by_number[tune_trial.config["trial"]]

    def on_trial_start(self, iteration, trials, trial, **info):
        found = self._trial(trial)
        if found.number not in self.started:
            self.started.add(found.number)
            self.hooks.started(found)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        found = self._trial(trial)
        if EVENT in result:
            self.hooks.progress(found, result[EVENT])
        if ROW in result and found.number not in self.rows:
            self.rows[found.number] = result[ROW]
            self.hooks.finished(found, result[ROW], result.get(EVALUATION))

    def on_trial_error(self, iteration, trials, trial, **info):
        found = self._trial(trial)
        if found.number not in self.rows:
            self.rows[found.number] = {**found.row(), "status": Outcome.FAILED, "error": {
                "code": "internal_error", "message": "the Ray Tune trial failed", "hint": "see the sweep job's log"}}
            self.hooks.finished(found, self.rows[found.number], None)
