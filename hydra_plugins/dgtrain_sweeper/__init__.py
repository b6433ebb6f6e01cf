"""dgtrain's Optuna sweeper: hydra-optuna-sweeper that continues a stored study after an interruption.

Hydra only instantiates sweepers from the `hydra_plugins` namespace, hence this small package. On top of
`hydra/sweeper=optuna` it
- creates the sweep directory before the study, so `storage: sqlite:///<sweep dir>/optuna.db` opens;
- runs only the trials still to go when the study already holds some (`n_trials` is the study's total),
  marking trials left "running" by a killed sweep as failed;
- numbers new jobs after the stored trials, so a restart never writes into an earlier trial's directory;
- saves multirun.yaml in the sweep directory, as Hydra's basic sweeper does (`dgtrain sweep-summary`).
hydra-optuna-sweeper is imported only when this sweeper is used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# optuna 2.x on SQLAlchemy 1.4: a 2.0-migration warning and alembic's INFO lines ("setup plugin ...") say
# nothing a dgtrain user can act on. Set here, at plugin discovery, because Hydra builds the sampler
# (importing optuna) before the sweeper.
os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")
logging.getLogger("alembic").setLevel(logging.WARNING)


class DgtrainOptunaSweeper(Sweeper):
    def __init__(self, direction: Any = None, **kwargs: Any) -> None:
        try:
            from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
        except ImportError as e:
            raise ImportError("sweep presets need hydra-optuna-sweeper: pip install 'dgtrain[sweep]'") from e
        direction = getattr(direction, "value", direction)  # dgtrain's Direction enum -> "maximize"
        if direction is None:
            raise ValueError("hydra.sweeper.direction is null: set sweep.direction=minimize|maximize")
        self.inner = OptunaSweeper(direction=direction, **kwargs)
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.inner.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None
        impl = self.inner.sweeper
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        if impl.storage and impl.study_name:
            stored = _stored_trials(impl.storage, impl.study_name)
            if stored:
                import optuna

                finished = [t for t in stored if t.state.is_finished()]
                stale = [t for t in stored if t.state == optuna.trial.TrialState.RUNNING]
                _mark_failed(impl.storage, impl.study_name, stale)
                remaining = max(0, impl.n_trials - len(finished))
                log.info(
                    f"Continuing study {impl.study_name!r}: {len(finished)} of {impl.n_trials} trials "
                    f"done, {len(stale)} interrupted (now failed), {remaining} to go"
                )
                impl.n_trials = remaining
                impl.job_idx = len(stored)  # job dirs continue after the stored trials'
                # A seeded sampler restarts its random sequence in a new process and would propose the
                # stored trials' parameters again: move it on, deterministically, by the trials done.
                seed = OmegaConf.select(self.config, "hydra.sweeper.sampler.seed")
                _reseed(impl.sampler, None if seed is None else int(seed) + len(stored))
        return self.inner.sweep(arguments)


def _reseed(sampler: Any, seed: int | None) -> None:
    """Give a sampler (and the random sampler a TPE sampler starts with) a new random state."""
    import numpy as np

    if seed is None:
        sampler.reseed_rng()
        return
    for s in (sampler, getattr(sampler, "_random_sampler", None)):
        if s is not None and hasattr(s, "_rng"):
            s._rng = np.random.RandomState(seed)


def _stored_trials(storage: str, study_name: str) -> list:
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no such study yet
        return []
    return study.get_trials(deepcopy=False)


def _mark_failed(storage: str, study_name: str, trials: list) -> None:
    if not trials:
        return
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    fail = optuna.trial.TrialState.FAIL
    for t in trials:
        if hasattr(study._storage, "set_trial_state_values"):  # optuna >= 3
            study._storage.set_trial_state_values(t._trial_id, fail)
        else:  # optuna 2.x
            study._storage.set_trial_state(t._trial_id, fail)
