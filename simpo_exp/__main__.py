"""``python -m simpo_exp``: compose the config with Hydra, validate it, train (unless that run already
finished). Nothing else."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from simpo_exp.command_line import refuse_command_line
from simpo_exp.config import to_config
from simpo_exp.finished import recorded_summary
from simpo_exp.rundir import CONF_DIR
from simpo_exp.runinfo import fill_run_identity, refuse_a_folder_per_hand_started_process, user_errors
from simpo_exp.signals import StopRequested, StopSignal


def main() -> float | None:
    """The entry point (``python -m simpo_exp``, ``simpo-exp``)."""
    refuse_command_line(sys.argv[1:], "config")
    return hydra_main()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    stop = StopSignal(at_once=True)  # from the start: a stop before the run's first step ends the job where it is
    try:
        with user_errors(cfg) as go:  # a stop before training starts leaves the run's records as they were
            if not go:  # a sweep's job whose folder another job holds: refused, the sweep goes on
                return None
            if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun on several machines: one folder for all of them
                refuse_a_folder_per_hand_started_process(HydraConfig.get(), "run")
            config = to_config(fill_run_identity(cfg))  # fails here, before any model or data loads
            done = recorded_summary(config)  # this run already finished: its recorded result, nothing loads
            if done is not None:
                return done.get("eval/rewards/accuracies")

            from simpo_exp.engine import release_process_group
            from simpo_exp.fused import kept_modeling_modules
            from simpo_exp.train import train

            # hardware.fused_layers=liger patches transformers for the process: a sweep's next job here builds its
            # model from transformers' own classes again
            with kept_modeling_modules():
                accuracy = train(config, stop)["eval/rewards/accuracies"]  # what a Hydra sweeper optimises
            release_process_group(more_jobs=in_multirun())  # the run's objects are gone by now
            return accuracy
    except StopRequested as e:  # before train() began: nothing of this command's to record
        stop.exit(None, e.signum)
    finally:
        stop.restore()  # a sweep's next job, in this process, finds the handlers as they were
    return None  # a sweep job that failed (see its error.json): no value, a failed trial to the Optuna sweeper


def in_multirun() -> bool:
    """Whether this job is one of a ``--multirun``'s (whose later jobs may run in this same process)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


if __name__ == "__main__":
    main()
