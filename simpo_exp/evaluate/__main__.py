"""``python -m simpo_exp.evaluate RUN_OR_SWEEP_DIR [benchmark=NAME | benchmark=[A,B]] [key=value ...]``.

The directory may be given as a plain argument, anywhere among Hydra's options and overrides; it becomes
``evaluate.path``. Hydra composes
conf/evaluate.yaml. Never imports simpo_exp.train or another stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from simpo_exp.command_line import refuse_command_line
from simpo_exp.evaluate.config import apply_command_line, to_evaluate_config  # stores the schema Hydra uses
from simpo_exp.rundir import CONF_DIR
from simpo_exp.runinfo import given_overrides, user_errors
from simpo_exp.signals import sigterm_as_interrupt

# Hydra's command-line options that take a value in the next argument (``--info`` takes one of INFO_TOPICS)
OPTIONS_WITH_VALUE = (
    *("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--experimental-rerun"),
    *("--cfg", "-c", "--package", "-p"),
)
INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def _plain_arguments(argv: list[str]) -> list[int]:
    """Where in ``argv`` the arguments are that are neither an option, an option's value, nor a key=value (an
    existing directory is one, '=' in its name or not: a sweep job's holds its overrides)."""
    found, option = [], ""
    for i, arg in enumerate(argv[1:], 1):
        if option in OPTIONS_WITH_VALUE or (option == "--info" and arg in INFO_TOPICS):
            option = ""
            continue
        option = arg
        if not arg.startswith(("-", "~")) and ("=" not in arg or Path(arg).is_dir()):  # ~key: a deletion
            found.append(i)
    return found


def _path_argument(argv: list[str]) -> list[str]:
    """The run or sweep directory, given as a plain argument anywhere among Hydra's options and overrides, as
    ``evaluate.path='...'`` (quoted: job directories hold '=' and ','). A plain argument that is not a
    directory: a one-line error and exit 2, not Hydra's "missing EQUAL" parse error."""
    plain = _plain_arguments(argv)
    named = [a for a in argv if a.lstrip("+").startswith("evaluate.path=")]
    if len(named) + bool(plain) > 1:  # Hydra takes the last: the others were left unevaluated, without a word
        given = [*named, *(argv[i] for i in plain[:1])]
        print(f"error: more than one run or sweep directory given ({', '.join(given)}); give one (a --multirun "
              "sweeps several: evaluate.path=A,B)", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    if not plain:
        return argv
    i = plain[0]
    if not Path(argv[i]).is_dir():
        print(f"error: evaluate.path={argv[i]!r}: no such directory (give a run or sweep directory)", file=sys.stderr)
        raise SystemExit(2)
    if len(plain) > 1:
        print(
            f"error: unexpected argument {argv[plain[1]]!r} beside the run directory {argv[i]!r} (one directory; "
            "settings as key=value)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    quoted = argv[i].replace("\\", "\\\\").replace("'", "\\'")
    return [*argv[:i], f"evaluate.path='{quoted}'", *argv[i + 1 :]]


def _config_dirs(argv: list[str]) -> list[Path] | None:
    """The config directories a command adds to the package's (``--config-dir``, ``hydra.searchpath``); None
    where one is not a local folder (a ``pkg://`` entry), so that Hydra itself checks the names."""
    dirs = []
    for i, arg in enumerate(argv[1:], 1):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(argv[i + 1])
        elif arg.startswith("--config-dir="):
            dirs.append(arg.partition("=")[2])
        elif arg.lstrip("+").startswith("hydra.searchpath="):
            dirs += [d.strip().strip("'\"") for d in arg.partition("=")[2].strip("[]").split(",") if d.strip()]
    if any(d.startswith("pkg://") for d in dirs):
        return None
    return [Path(d.removeprefix("file://")) for d in dirs]


def _check_benchmark_names(argv: list[str]) -> None:
    """An unknown ``benchmark=`` option: a one-line error and exit 2 (Hydra's own is a longer exit 1). The
    package's presets and those of the command's own config directories are known."""
    extra = _config_dirs(argv)
    if extra is None:
        return
    known = sorted({p.stem for d in [Path(CONF_DIR), *extra] for p in (d / "benchmark").glob("*.yaml")})
    for arg in argv[1:]:
        key, sep, value = arg.lstrip("+~").partition("=")
        if key != "benchmark" or not sep:
            continue
        names = [n.strip() for n in value.strip("[]").split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            print(
                f"error: invalid config value benchmark={value!r}: unknown benchmark {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(known)} (benchmark/*.yaml in the package's conf/ and in --config-dir)",
                file=sys.stderr,
            )
            raise SystemExit(2)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    runs = OmegaConf.select(cfg, "evaluate.path", throw_on_missing=False)
    # its own dated folder holds only its log: each run's eval/ is held while it is evaluated (evaluate_all)
    # always goes on; SIGTERM as Ctrl-C: the judge replies in flight are written before it leaves
    with (
        sigterm_as_interrupt(),
        user_errors(
            cfg, work=f"the eval/ folder of each run under {runs}", hold=False, keeps="finished shards, judge replies"
        ),
    ):
        OmegaConf.resolve(cfg)
        apply_command_line(cfg, given_overrides(HydraConfig.get()))
        config = to_evaluate_config(cfg)  # fails here, naming the key, before any model loads
        from simpo_exp.evaluate.run import evaluate_all

        evaluate_all(config)


if __name__ == "__main__":
    sys.argv = _path_argument(sys.argv)
    _check_benchmark_names(sys.argv)
    refuse_command_line(sys.argv[1:], "evaluate")
    main()
