"""The study's side of runner's search (``search_sweeper``): what a rerun must search alike,
a trial to launch again, and how each trial ended, told to the study."""

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from hydra.core.utils import JobReturn
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

KEYS = {"params": "hydra.sweeper.params", "fixed": "fixed params",
        "objectives": "hydra.sweeper.objective", "directions": "hydra.sweeper.direction"}


def space_record(search: Dict[str, Any]) -> Dict[str, Any]:
    """What a rerun must search alike: the space, the fixed params, objectives, directions."""
    from optuna.distributions import distribution_to_json

    return {"params": {k: distribution_to_json(d) for k, d in search["space"].items()},
            "fixed": search["fixed"], "objectives": search["objectives"],
            "directions": search["directions"]}


def existing_trial(study, storage, number: int):
    """The study's trial ``number`` (``optuna.trial.Trial``), to launch again and tell."""
    import optuna

    study_id = storage.get_study_id_from_name(study.study_name)
    return optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(
        study_id, number))


def tell(study, trial, ret: JobReturn) -> None:
    """Tell the study how the trial's job ended: its value(s), pruned, or failed (a job's
    exception, a NaN)."""
    import math

    import optuna

    from runner.config.errors import describe_error, first_line
    from runner.run.search import Pruned

    state = optuna.trial.TrialState
    try:
        value = ret.return_value
    except Exception as err:  # noqa: BLE001 (the job's failure: recorded on the trial)
        reason = describe_error(err) or first_line(err)
        log.warning("trial %d failed: %s", trial.number, reason)
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=state.FAIL)
        return
    if isinstance(value, Pruned):
        study.tell(trial, state=state.PRUNED)
        return
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if not all(math.isfinite(v) for v in values):
        log.warning("trial %d failed: its value is %s", trial.number, values)
        study.tell(trial, state=state.FAIL)
        return
    study.tell(trial, values=values)


def stops_search(study, numbers: Sequence[int]) -> Optional[str]:
    """The failure of one of trials ``numbers`` that every trial would repeat (an objective
    the task does not log: the job marks its trial), if any."""
    from runner.run.search import STOPS_SEARCH

    for trial in study.get_trials(deepcopy=False):
        if trial.number in numbers and STOPS_SEARCH in trial.user_attrs:
            return str(trial.user_attrs[STOPS_SEARCH])
    return None


def write_results(study, path: Path) -> None:
    """``optimization_results.yaml``, as hydra-optuna-sweeper writes it: the best trial's
    params and value (several objectives: the Pareto front's)."""
    if len(study.directions) == 1:
        try:
            best = study.best_trial
        except ValueError:  # no trial completed
            return
        results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
    else:
        results = {"name": "optuna", "solutions": [
            {"number": t.number, "params": t.params, "values": t.values}
            for t in study.best_trials]}
    OmegaConf.save(OmegaConf.create(results), path)
