"""``python -m simpo_exp``: compose the config with Hydra, validate it, train (unless that run already
finished). Nothing else."""

from __future__ import annotations

import importlib.util
import os
import sys

import hydra
from omegaconf import DictConfig

from simpo_exp.config import to_config
from simpo_exp.finished import recorded_summary
from simpo_exp.rundir import CONF_DIR, refuse_added_chosen_group
from simpo_exp.runinfo import fill_run_identity, user_errors
from simpo_exp.signals import StopRequested, StopSignal

# optional config groups whose presets name a Hydra plugin of the ``sweep`` extra: without it Hydra only lists
# the plugins it has ("Available options in 'hydra/sweeper': basic")
PLUGINS = {
    "+sweep=": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
    "+launcher=": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
}


def missing_plugin(argv: list[str]) -> str | None:
    """What to install for a ``+sweep=``/``+launcher=`` override whose Hydra plugin is not installed, else None."""
    for arg in argv:
        for prefix, (module, package) in PLUGINS.items():
            if arg.startswith(prefix) and importlib.util.find_spec(module) is None:
                return f"{arg} needs Hydra's {package} plugin: pip install -e '.[sweep]'"
    return None


# Hydra's modes, of which a command takes one (its own refusal is a ValueError traceback)
MODES = {"--run": "-r", "--multirun": "-m", "--cfg": "-c", "--info": "-i", "--shell-completion": "-sc"}


def mixed_modes(argv: list[str]) -> str | None:
    """The message for a command giving two of Hydra's modes (``--multirun --cfg job``), else None."""
    given = [long for long, short in MODES.items() if long in argv or short in argv]
    if len(given) < 2:
        return None
    hint = (
        "; --cfg prints one job's config: drop --multirun and give each swept key one of its values"
        if {"--multirun", "--cfg"} <= set(given)
        else ""
    )
    return f"{' and '.join(given)} given: Hydra runs one of --run, --multirun, --cfg, --info at a time{hint}"


def sweep_without_multirun(argv: list[str]) -> str | None:
    """The message for a ``+sweep=``/``+launcher=`` preset in a command that runs one job here (no ``--multirun``):
    Hydra applies sweepers and launchers to a multirun only, so that job would train on this machine, a login
    node's, with the preset's defaults; else None. ``--cfg``, ``--info`` (which print and run nothing) pass."""
    if any(long in argv or short in argv for long, short in MODES.items() if long != "--run"):
        return None
    for arg in argv:
        if arg.startswith(tuple(PLUGINS)):
            return f"{arg} applies to a --multirun only (Hydra runs a single job here, on this machine): add --multirun"
    return None


def launcher_under_torchrun(argv: list[str]) -> str | None:
    """The message for ``+launcher=`` in a command torchrun (or accelerate launch) started on several processes:
    each process would submit the sweep's jobs, with the launcher's rendezvous variables inherited; else None."""
    from simpo_exp.runinfo import under_torchrun

    if under_torchrun():
        for arg in argv:
            if arg.startswith("+launcher="):
                return (
                    f"{arg} under torchrun/accelerate launch: each of the {os.environ['WORLD_SIZE']} processes would "
                    "submit the sweep's jobs; start the command with python -m simpo_exp (the launcher's jobs start "
                    "their own processes)"
                )
    return None


def refuse_command_line(argv: list[str], stage: str) -> None:
    """Exit 2 with a message for a command line Hydra would refuse with a traceback or run as it was not meant
    (each stage's entry point, before Hydra reads it); ``stage``: its primary config's name."""
    checks = (missing_plugin, mixed_modes, sweep_without_multirun, launcher_under_torchrun)
    if message := next((m for m in (check(argv) for check in checks) if m), None):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    refuse_added_chosen_group(argv, stage)


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
