"""The command line's own checks, before Hydra reads it (every stage's entry point runs them): what Hydra would
refuse with a traceback, or run other than it was meant (a sweep preset in a single run, a launcher under
torchrun)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import sys
import typing
from pathlib import Path

from simpo_exp.rundir import CONF_DIR, refuse_added_chosen_group

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


def modes_given(argv: list[str]) -> list[str]:
    """Hydra's modes a command gives (long names), read by Hydra's own parser, so that ``--cfg=job``, ``-cjob`` and
    an abbreviation (``--multi``, which argparse takes) count; by their exact flags where that parser is not at hand or
    refuses the line (Hydra then says why itself)."""
    exact = [long for long, short in MODES.items() if long in argv or short in argv]
    try:
        from hydra._internal.utils import get_args_parser  # what hydra.main parses the command line with
    except ImportError:
        return exact
    try:  # quiet: a refusal or --version is for Hydra to print
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:
        return exact
    return [long for long in MODES if getattr(args, long[2:].replace("-", "_"), None) not in (None, False)]


def mixed_modes(argv: list[str]) -> str | None:
    """The message for a command giving two of Hydra's modes (``--multirun --cfg job``), else None."""
    given = modes_given(argv)
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
    node's, with the preset's defaults; else None. ``--cfg``, ``--info``, ``--help``, ``--hydra-help`` (which print
    and run nothing) pass."""
    if set(modes_given(argv)) - {"--run"} or {"--help", "-h", "--hydra-help"} & set(argv):
        return None
    if any(a.lstrip("+").lower() == "hydra.mode=multirun" for a in argv):  # Hydra's other way to ask for a multirun
        return None
    for arg in argv:
        if arg.startswith(tuple(PLUGINS)):
            return f"{arg} applies to a --multirun only (Hydra runs a single job here, on this machine): add --multirun"
    return None


def unreadable_override(argv: list[str]) -> str | None:
    """The message for an override Hydra's grammar cannot read, naming it (Hydra's own names neither the argument
    nor the key: ``beta= 2``, a space after ``=`` the shell splits into ``beta=`` and ``2``, read "token recognition
    error at: '2'"; ``beta=2,`` "mismatched input '<EOF>' expecting {...}"), else None."""
    try:
        from hydra._internal.utils import get_args_parser
        from hydra.core.override_parser.overrides_parser import OverridesParser
    except ImportError:
        return None
    args = get_args_parser()
    args.exit_on_error = False  # a flag argparse refuses is Hydra's to say, once
    try:
        overrides = args.parse_known_args(argv)[0].overrides  # what Hydra takes for overrides
    except (argparse.ArgumentError, SystemExit):
        return None
    parser = OverridesParser.create()
    for i, arg in enumerate(overrides):
        try:
            parser.parse_override(arg)
        except Exception as e:  # noqa: BLE001 - Hydra's grammar errors have no class of their own
            hint = ""
            if "=" not in arg and i and overrides[i - 1].endswith("="):
                hint = f"; a space after '='? write {overrides[i - 1]}{arg} (or quote a value with spaces)"
            elif arg.endswith(","):
                hint = "; a comma at the end: a sweep lists its values as key=a,b,c"
            elif "=" not in arg:
                hint = "; an override is key=value (+key=value adds a key, ~key removes one)"
            return f"cannot read the override {arg!r} (Hydra: {str(e).splitlines()[0][:160]}){hint}"
    return None


SCHEMAS = {  # each stage's primary config -> its schema (module, class)
    "config": ("simpo_exp.config", "Config"),
    "generate": ("simpo_exp.generate.config", "GenerateRunConfig"),
    "evaluate": ("simpo_exp.evaluate.config", "EvaluateRunConfig"),
}


def _undeclared(schema: type, parts: list[str]) -> tuple[int, list[str]] | None:
    """(index of the first part the schema does not declare, the names declared at that level), or None where
    every part is declared or the walk reaches a value of no declared shape (a list, ``Any``)."""
    node, i = schema, 0
    while i < len(parts):
        fields = getattr(node, "__dataclass_fields__", None)
        if fields is None:
            return None
        if parts[i] not in fields:
            return i, list(fields)
        hint = typing.get_type_hints(node)[parts[i]]
        if typing.get_origin(hint) is dict:  # Dict[str, Section]: the next part names an entry, any name
            hint, i = typing.get_args(hint)[1], i + 1
        node, i = hint, i + 1
    return None


def undeclared_override(argv: list[str], config_name: str) -> str | None:
    """The message for a key given without '+' that the stage's schema does not declare (``hardware.pakcing=x``),
    else None. Hydra's own says "Could not override 'hardware.pakcing'. To append to your config use
    +hardware.pakcing=x", which the run then refuses (no such key): two commands to learn of a typo. Group names
    (``hparams=...``) and Hydra's own keys pass."""
    import difflib
    import importlib

    if config_name not in SCHEMAS:
        return None
    module, name = SCHEMAS[config_name]
    schema = getattr(importlib.import_module(module), name)
    groups = [p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()]
    for arg in argv:
        key, sep, _ = arg.partition("=")
        parts = key.split("@")[0].split(".")
        if not sep or arg.startswith(("-", "+", "~")) or "/" in key or parts[0] == "hydra":
            continue
        if parts[0] in groups and (len(parts) == 1 or parts[0] not in schema.__dataclass_fields__):
            continue  # a group's option (hardware=cpu), or a group placed elsewhere (hparams: at the top level)
        if (found := _undeclared(schema, parts)) is None:
            continue
        at, declared = found
        parent = ".".join(parts[:at])
        close = difflib.get_close_matches(parts[at], declared + ([] if at else groups), n=1)
        hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
        if config_name == "evaluate" and not at and parts[0] in _benchmark_fields():
            hint = f"; a benchmark's setting: benchmarks.<name>.{key} (benchmark=<name> chooses one)"
        return f"{arg}: no such key {'.'.join(parts[: at + 1])} in this stage's config{hint}"
    return None


def _benchmark_fields() -> list[str]:
    from simpo_exp.evaluate.config import BenchmarkConfig

    return list(BenchmarkConfig.__dataclass_fields__)


def key_given_twice(argv: list[str]) -> str | None:
    """The message for a key given twice where one is a sweep (``--multirun beta=2,5 beta=10``), else None: Hydra
    takes the last value alone, so the sweep ran one job. (A value given again without a sweep is Hydra's last-one-
    wins, which a script appending overrides to a base list relies on.)"""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
    except ImportError:
        return None
    parser, seen = OverridesParser.create(), {}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:  # Hydra's flags (and their values)
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001 - Hydra refuses it itself, in its own words
            continue
        key, sweep = override.key_or_group, override.is_sweep_override()
        if key in seen and (seen[key][1] or sweep):
            return (
                f"{key} is given twice ({seen[key][0]} and {arg}): Hydra takes the last value alone, so the sweep "
                "would not run as written; give the key once"
            )
        seen[key] = (arg, sweep)
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


MPI_WORLD_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # as accelerate reads them


def mpi_ranks_alone(argv: list[str]) -> str | None:
    """The message for a process started as one of several by mpirun (or srun without torchrun or submitit), which
    set MPI's ranks but not torch's (RANK, WORLD_SIZE): each took itself for the main one and for a one-process run
    (each wrote the run's records, and the accumulation was one process's: the global batch N times the one asked
    for) until accelerate read MPI's ranks as the engine started. Else None."""
    if "RANK" in os.environ:
        return None
    sizes = {name: os.environ[name] for name in MPI_WORLD_SIZES if os.environ.get(name, "").isdigit()}
    if not any(int(size) > 1 for size in sizes.values()):
        return None
    given = ", ".join(f"{k}={v}" for k, v in sizes.items())
    return (
        f"this process is one of several an MPI launcher started ({given}) without torch's ranks (RANK, WORLD_SIZE): "
        "start the processes with torchrun or accelerate launch (launchers/), a sweep on SLURM with +launcher=slurm, "
        "or run one process"
    )


def refuse_command_line(argv: list[str], stage: str) -> None:
    """Exit 2 with a message for a command line Hydra would refuse with a traceback or run as it was not meant
    (each stage's entry point, before Hydra reads it); ``stage``: its primary config's name."""
    checks = (mpi_ranks_alone, missing_plugin, mixed_modes, sweep_without_multirun, launcher_under_torchrun)
    checks += (unreadable_override, key_given_twice)
    if message := next((m for m in (check(argv) for check in checks) if m), None) or undeclared_override(argv, stage):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    refuse_added_chosen_group(argv, stage)
