"""Reading what a run directory holds (overrides, JSON and JSONL records), for the stages that read runs.

Tolerant by design: a run that is still being written (a half-written last line, a missing file) reads as
what it has so far.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shlex
import socket
import time
from pathlib import Path

import yaml

from simpo_exp.inference.files import jsonl_lines

# Where conf/ and launchers/ are: the repository (beside the package) in a checkout or an editable install, the
# package itself in an installed wheel, which carries them inside it (pyproject.toml). The presets name launcher
# files relative to it (hardware.deepspeed_config: launchers/ds_zero3.json).
_PACKAGE = Path(__file__).resolve().parent
PROJECT_DIR = _PACKAGE if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent
# The config groups as an absolute path: Hydra reads a relative config_path against the calling module when main()
# is called as a console script (simpo-exp), where no module "conf" exists.
CONF_DIR = str(PROJECT_DIR / "conf")


def refuse_added_chosen_group(argv: list[str], config_name: str) -> None:
    """``+experiment=NAME`` (the form other Hydra projects document) for a group this stage's defaults list already
    chooses: a one-line error naming the form to use, exit 2. Hydra's own says "Multiple values for experiment.
    To override a value use 'override experiment: NAME'", a defaults-list line, not something to type."""
    import sys

    defaults = yaml.safe_load((Path(CONF_DIR) / f"{config_name}.yaml").read_text()).get("defaults") or []
    chosen = {group: option for item in defaults if isinstance(item, dict) for group, option in item.items()}
    for arg in argv:
        key, sep, _ = arg.partition("=")
        if sep and key.startswith("+") and not key.startswith("++") and key[1:] in chosen:
            print(
                f"error: {arg}: the {key[1:]} group is in this stage's defaults list already (default: "
                f"{chosen[key[1:]] or 'none'}); give it without '+': {arg[1:]}",
                file=sys.stderr,
            )
            raise SystemExit(2)


def natural_order(path: Path) -> list:
    """A folder's sort key with its numbers read as numbers (job 10 after job 9): text and numbers alternate in it,
    so that names of any shape compare (``.submitit`` beside ``0_beta=2``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", Path(path).name)]


def folder_to_name(sweep: bool, hydra_overrides: list) -> str | None:
    """The setting a re-run must add to go on in a run's folder (``hydra.run.dir``; a sweep's ``hydra.sweep.dir``),
    or None where the command's own Hydra overrides (``hydra_overrides``) named it already."""
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    return None if any(str(o).lstrip("+").split("=", 1)[0] == key for o in hydra_overrides) else key


def rerun_command(hydra=None) -> str:
    """How to go on in this run's folder: "re-run the same command" where the command named the folder
    (``hydra.run.dir``, a sweep's ``hydra.sweep.dir``), else the same command with that folder added. Hydra's
    default folders are named after the time the command started: the same command alone started afresh in a new
    one. ``hydra``: the ``hydra`` node of a run's config (default: this process's Hydra run, if any)."""
    same = "re-run the same command"
    if hydra is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return same
        hydra = HydraConfig.get()
    mode = getattr(hydra, "mode", None)
    sweep = getattr(mode, "name", str(mode)) == "MULTIRUN"
    key = folder_to_name(sweep, getattr(getattr(hydra, "overrides", None), "hydra", None) or [])
    if mode is None or key is None:
        return same
    # a relative folder is the command's working directory's (the job's own, under hydra.job.chdir=true, is not)
    cwd = getattr(getattr(hydra, "runtime", None), "cwd", None) or os.getcwd()
    folder = os.path.join(str(cwd), str(hydra.sweep.dir if sweep else hydra.run.dir))
    return f"{same} with {shell_override(key, os.path.normpath(folder))}"


HYDRA_UNQUOTED = (
    "/-\\+.$%*@?|:_ "  # what Hydra's override grammar reads in an unquoted value, besides ASCII letters and digits
)


def shell_override(key: str, value: str) -> str:
    """``key=value`` as one word of a shell command line that Hydra reads back as ``value``: quoted for Hydra where
    the value holds what its grammar reads as syntax ('=' or ',' of a sweep job's directory, brackets, quotes, '!',
    a letter past ASCII), then for the shell where it holds a space or the shell's own."""
    if not all(c.isascii() and (c.isalnum() or c in HYDRA_UNQUOTED) for c in value) or value != value.strip():
        value = "'" + value.replace("'", "\\'") + "'"
    word = f"{key}={value}"
    if shlex.quote(word) == word:
        return word
    return f'"{word}"' if not any(c in word for c in '"$`\\!') else shlex.quote(word)


REFUSED_FILE = "refused.json"  # a sweep job refused as another run's directory (the run itself left as it was)
# Keys that do not change what a run trains (cadence, logging, where it runs): a resumption may change them, and a
# run's name leaves them out.
RESUMABLE_CHANGES = {
    "output_dir",
    "logger",
    "progress_bar",
    "resume",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "save_model",
    "save_dtype",
    "eval_on_start",
    "max_bad_steps",
    "reference_cache_dir",  # where the reference log-probs are kept, keyed by what they are of
    # read by evaluation only: a smaller eval batch after an out-of-memory evaluation, fewer or shorter samples
    "per_device_eval_batch_size",
    "num_generations",
    "max_new_tokens",
}

# A run that left at a stop signal, its checkpoint saved: {"signal", "step"}, plus "during" where the stop came
# before the first step (set-up, eval_on_start) (train.py writes it, the entry point removes it when the run starts
# again; compare and the sweep's summary read it).
STOPPED_FILE = "stopped.json"
# How many folders deep compare and evaluate look for runs under the path they are given: Hydra's default sweep
# folder puts jobs 3 deep under outputs/ (multirun/<time>/<job>); a layout of one's own (outputs/multirun/exp1/
# <time>/<job>) one or two deeper, and those were left out without a word at 3.
RUN_SEARCH_DEPTH = 6


STEP_NAME = re.compile(r"step-\d+")  # a checkpoint folder's name
CHECKPOINT_MARKER = "COMPLETE"  # written last into a checkpoint folder (simpo_exp/checkpoint.py): it is whole


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    # step-<digits> only: a staging folder (.tmp) or a copy a user made beside them (step-000008.bak) is none
    done = [p for p in root.glob("step-*") if STEP_NAME.fullmatch(p.name) and (p / CHECKPOINT_MARKER).is_file()]
    return sorted(done, key=step_of)


def step_of(path: Path) -> int:
    """The step a checkpoint directory holds, from its name (``step-000050``)."""
    return int(Path(path).name.split("-")[1])


def stopped_before_a_step_record(run_dir: Path, signum: int, during: str) -> dict:
    """The stop record of a run stopped before its first step (in ``during``): its step is where a re-run resumes."""
    done = checkpoint_dirs(run_dir)
    return stopped_record(signum, step_of(done[-1]) if done else 0) | {"during": during}


def stopped_record(signum: int, step: int) -> dict:
    import signal

    return {"signal": signal.Signals(signum).name, "step": step}


def stopped_words(record: dict) -> str:
    """A stop record told in words: "SIGTERM after step 40, checkpoint saved", or, for one before the first step
    (``during``: set-up, evaluation at start), "SIGTERM during set-up, before a step (nothing saved)"."""
    signal_name = record.get("signal", "a signal")
    if record.get("during"):
        return f"{signal_name} during {record['during']}, before a step (nothing saved)"
    return f"{signal_name} after step {record.get('step', '?')}, checkpoint saved"


def recorded_sources(run_dir: Path) -> dict:
    """The ``sources`` of the data_report.json a run wrote at its start: per data source its counts, provenance and
    files' fingerprints ({} where there is none)."""
    return read_json(Path(run_dir) / "data_report.json").get("sources") or {}


def split_outside(text: str, at: re.Pattern | None = None) -> list[str]:
    """``text`` split at its commas outside brackets and quotes (and, with ``at``, only where ``at`` matches from
    the comma on): ``a='x,y',b=[1,2]`` is two items."""
    parts, depth, quote, start, escaped = [], 0, "", 0, False
    for i, ch in enumerate(text):
        if escaped:  # the character after a backslash inside quotes (Hydra's \' in a quoted value): no quote's end
            escaped = False
        elif quote:
            escaped = ch == "\\"
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0 and (at is None or at.match(text, i)):
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["beta=2", "+x=1", "~y"]`` -> ``{"beta": "2", "x": "1", "y": "<deleted>"}``, Hydra's own left out."""
    out = {}
    for item in items:
        item = str(item).lstrip("+~")
        key, sep, value = item.partition("=")
        if key.startswith("hydra.") or key == "output_dir":
            continue
        out[key] = value if sep else "<deleted>"
    return out


RANK_ERROR_GLOB = "error-rank*.json"  # the failure of a process other than the main one (runinfo.user_errors)


def failure_record(run_dir: Path) -> dict | None:
    """A run's failure as compare and a sweep's summary tell it: ``error.json`` (the main process's), with the first
    other process's own failure (``error-rank<N>.json``) beside it where that says something else (the main
    process often records only its collective's "connection closed by peer"); the other process's alone where
    the main one recorded none (it took the launcher's SIGTERM, sent when that process died, for a stop); None
    where neither is there."""
    run_dir = Path(run_dir)
    main = read_json(run_dir / "error.json") if (run_dir / "error.json").exists() else None
    ranks = sorted(run_dir.glob(RANK_ERROR_GLOB), key=natural_order)
    other = read_json(ranks[0]) if ranks else None
    if not other:
        return main
    rank = ranks[0].name.removeprefix("error-rank").removesuffix(".json")
    first = (str(other.get("error") or "").strip().splitlines() or [""])[0]
    if main is None:
        return {**other, "error": f"on process {rank}: {other.get('error', '')}"}
    if first and first not in str(main.get("error") or ""):
        lines = str(main.get("error") or "").splitlines() or [""]
        lines[0] += f" (process {rank}: {other.get('type', 'Error')}: {first})"
        return {**main, "error": "\n".join(lines)}
    return main


def read_json(path: Path) -> dict:
    """A record's mapping; {} when the file is missing or unreadable, or holds no mapping (a list or a number, by
    hand or from another tool, crashed its readers' ``.get`` with an AttributeError)."""
    found = read_json_value(path)
    return found if isinstance(found, dict) else {}


def read_json_value(path: Path):
    """A JSON file's value, whatever its type; None when the file is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# libyaml's loader where PyYAML was built with it: the same documents, about nine times faster on Hydra's files
# (compare reads three of them per job of a sweep).
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str):
    """``yaml.safe_load(text)``, through libyaml where it is there."""
    return yaml.load(text, Loader=_SAFE_LOADER)


def read_yaml(path: Path):
    try:
        return parse_yaml(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def subdir_depth(hydra: dict) -> int:
    """How many folders a --multirun job's folder is below its sweep's: ``hydra.sweep.subdir``'s separators outside
    its interpolations, plus one (``b${beta}/s${seed}``: two). ``hydra``: the ``hydra`` node of its hydra.yaml."""
    subdir = re.sub(r"\$\{[^}]*\}", "x", str((hydra.get("sweep") or {}).get("subdir") or ""))  # x: a part
    return max(1, len([part for part in subdir.split("/") if part]))


def sweep_dir_of(job: Path, hydra: dict | None = None) -> Path:
    """The folder of the sweep a --multirun job's folder is in (its parent, or ``subdir_depth`` levels up);
    ``hydra``: the job's hydra.yaml ``hydra`` node, read from its ``.hydra/`` where not given."""
    if hydra is None:
        hydra = (read_yaml(Path(job) / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}
    depth = subdir_depth(hydra) if isinstance(hydra, dict) else 1
    return Path(job).parents[depth - 1] if len(Path(job).parents) >= depth else Path(job).parent


def sweep_request(sweep_dir) -> tuple[dict, list | None]:
    """What the sweep in ``sweep_dir`` was asked, from the ``multirun.yaml`` Hydra writes there before its first
    job: its sweeper's config, and its command's overrides with the sweeper's ``params`` as Hydra's grammar reads
    them (None where this version's grammar reads them otherwise)."""
    return parsed_request((read_yaml(Path(sweep_dir) / "multirun.yaml") or {}).get("hydra") or {})


def parsed_request(hydra: dict) -> tuple[dict, list | None]:
    """``sweep_request`` of a sweep's Hydra config (``multirun.yaml``'s ``hydra``, or the sweeping command's own)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = hydra.get("sweeper") or {}
    task = list((hydra.get("overrides") or {}).get("task") or [])
    task += [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        return sweeper, OverridesParser.create().parse_overrides(task)
    except Exception:
        return sweeper, None


def jobs_asked(sweep_dir: Path) -> int | None:
    """How many job folders the sweep in ``sweep_dir`` asked for, from Hydra's ``multirun.yaml``: the basic sweeper's
    grid (the product of the number of distinct values of each sweep override: a value given twice, ``beta=2,5,2``,
    runs in one folder, its second job skipped as finished), Optuna's ``n_trials`` where its search space is
    continuous alone (``choice``/``range`` trials may repeat a setting, which reuses its folder); None where it
    does not say."""
    sweeper, parsed = sweep_request(sweep_dir)
    target = str(sweeper.get("_target_", ""))
    if "optuna" in target.lower():
        params = [str(v) for v in (sweeper.get("params") or {}).values()]
        continuous = all("interval(" in v for v in params)
        return sweeper.get("n_trials") if isinstance(sweeper.get("n_trials"), int) and continuous else None
    if not target.endswith("BasicSweeper") or parsed is None:  # nothing said, rather than a wrong count
        return None
    counts = [distinct_values(o) if o.is_sweep_override() else 1 for o in parsed]
    return None if None in counts else math.prod(counts)


def distinct_values(override) -> int | None:
    """How many distinct values a parsed sweep override asks for; None where Hydra's grammar alone cannot say
    (``glob()`` lists a group's options and ``interval()`` is Optuna's: neither counts without the config loader)."""
    try:
        return len({str(v) for v in override.sweep_iterator()})
    except Exception:  # noqa: BLE001 - Hydra's own exceptions: nothing said, rather than a traceback
        return None


def swept_in_request(sweep_dir) -> list[str]:
    """The override keys the sweep in ``sweep_dir`` asked several values of (``multirun.yaml``: the command's sweep
    overrides and the sweeper's ``params``), ``+``/``~`` and Hydra's own left out; [] where it does not say. Known
    before the jobs that try them start."""
    _, parsed = sweep_request(sweep_dir)
    keys = []
    for o in parsed or []:
        if not o.is_sweep_override() or o.key_or_group.startswith("hydra.") or o.key_or_group == "output_dir":
            continue
        if (count := distinct_values(o)) is None or count > 1:  # glob(), interval(): several values all the same
            keys.append(o.key_or_group)
    return keys


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (metrics.jsonl, generations.jsonl); a half-written last line (a
    running job, one cut inside a multi-byte character included) is skipped, and a missing file gives none."""
    records = []
    try:  # bytes decoded leniently: a cut character spoils only its own (unparseable, skipped) line
        lines = jsonl_lines(Path(path).read_bytes().decode("utf-8", errors="replace"))
    except OSError:
        return records
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def select(cfg: dict, dotted: str, missing=None):
    """``cfg["a"]["b"]`` for ``"a.b"`` in a nested config dict; ``missing`` where a part is absent."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


RUN_RECORDS = ("summary.json", "error.json", STOPPED_FILE, "metrics.jsonl")  # what a run writes into output_dir


RECORDS_POINTER = "records_dir"  # in a run's .hydra/: where output_dir= put its records (runinfo.point_to_records)


def records_dir(folder: Path) -> Path:
    """Where the run whose Hydra folder (``.hydra/``) is ``folder`` wrote its model and records: the folder itself,
    unless it holds none of them and its config names another existing ``output_dir`` (``output_dir=...`` on the
    command line moves them; Hydra's own files stay in ``hydra.run.dir``): the place the run wrote down
    (``RECORDS_POINTER``), else its config's, interpolations resolved where the config alone resolves them. A
    relative one is taken from where the run ran: the command's folder, or its own under ``hydra.job.chdir=true``."""
    folder = Path(folder)
    if any((folder / name).exists() for name in RUN_RECORDS):
        return folder
    with contextlib.suppress(OSError):
        pointed = Path((folder / ".hydra" / RECORDS_POINTER).read_text().strip())
        if pointed.is_absolute() and pointed.is_dir():
            return pointed
    config = read_yaml(folder / ".hydra" / "config.yaml")
    moved = config.get("output_dir") if isinstance(config, dict) else None  # (a damaged file may hold a list)
    if isinstance(moved, str) and "${" in moved:  # output_dir=/x/b${beta}: the saved config resolves it
        try:
            from omegaconf import OmegaConf

            moved = OmegaConf.load(folder / ".hydra" / "config.yaml").output_dir
        except Exception:  # a Hydra resolver (${hydra:...}), not resolvable outside the run
            return folder
    if not isinstance(moved, str) or not moved:
        return folder
    hydra = read_yaml(folder / ".hydra" / "hydra.yaml") or {}
    ran_in = folder if select(hydra, "hydra.job.chdir") else select(hydra, "hydra.runtime.cwd")
    path = Path(moved).expanduser()
    path = path if path.is_absolute() or not ran_in else Path(str(ran_in)) / path
    return path if path.is_dir() else folder


def output_stage(path: Path) -> str | None:
    """ "generate" or "evaluate" where ``path`` is that stage's output directory (its saved config has the stage's
    section), which holds a ``.hydra/`` folder as a training run does but is not one; else None."""
    saved = read_yaml(Path(path) / ".hydra" / "config.yaml")
    return next((stage for stage in ("generate", "evaluate") if isinstance(saved, dict) and stage in saved), None)


def other_stage_output(path: Path) -> bool:
    """Whether ``path`` is a generate or evaluate stage's output directory (``output_stage``)."""
    return output_stage(path) is not None


IN_USE_FILE = ".in-use"  # the lock a working job holds on its folder (hold_folder)
_held: dict[str, int] = {}


# How long a job waits for its folder's lock before it is refused: a job holds it for its whole life, while
# compare's probe of a folder (ended_unrecorded) holds it shared for an instant.
PROBE_SECONDS = 1.0


def _lock_within(fd: int, fcntl, seconds: float) -> None:
    """``flock`` ``fd`` exclusively, trying again for ``seconds`` while another holds it (BlockingIOError after)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def hold_folder(path: Path, advice: str) -> None:
    """Take ``path`` for this job, so that a second job started there while this one works (a requeue while the
    old job lives, two commands given one folder, two runs started in the same second) is refused instead of
    mixing its records and files with this one's. The lock is the operating system's (``flock``), so a killed
    job holds nothing; where the file system has none, nothing is held. A process holds one folder at a time:
    taking one lets go of the one before (a sweep's jobs run in turn in one process)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return
    release_folders()
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(Path(path) / IN_USE_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:  # another user's lock file in a shared folder: a lock needs no write access
            fd = os.open(Path(path) / IN_USE_FILE, os.O_RDONLY)
    except OSError as e:  # the stage's own checks name a folder it cannot write
        logging.getLogger(__name__).warning("%s cannot be locked (%s): a second job there is not refused", path, e)
        return
    try:
        _lock_within(fd, fcntl, PROBE_SECONDS)
    except BlockingIOError:
        holder = os.read(fd, 1024).decode(errors="replace").strip()
        os.close(fd)
        from simpo_exp.errors import FolderInUse

        raise FolderInUse(
            f"{Path(path).resolve()} is in use by another job ({holder or 'one that has just started'}): {advice}"
        ) from None
    except OSError as e:  # a file system without locks (Lustre without its flock option, say)
        os.close(fd)
        logging.getLogger(__name__).warning("%s cannot be locked here (%s): a second job there is not refused", path, e)
        return
    _held[str(path)] = fd
    with contextlib.suppress(OSError):  # who holds it, for the message a second job gets (read-only: not said)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}{_this_machine()}{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())


def _this_machine() -> str:
    """The part of a lock file's holder line (``pid N on HOST, since TIME``) that names this machine."""
    return f" on {socket.gethostname()}, since "


def ended_unrecorded(path: Path) -> bool:
    """Whether the job that last held ``path`` (``hold_folder``) is gone: its lock file names this machine and
    no process holds the lock. Only a job of this machine is judged (a lock taken on another machine may not be
    seen from here where the file system's locks are node-local); a folder never held says nothing. The probe
    takes the lock shared and lets go at once; a job starting in that instant waits for it (``PROBE_SECONDS``)."""
    try:
        import fcntl

        lock = Path(path) / IN_USE_FILE
        if _this_machine() not in lock.read_text(errors="replace"):
            return False  # another machine's job, or none: not probed
        fd = os.open(lock, os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except OSError:  # held (BlockingIOError), or no locks on this file system
        return False
    finally:
        os.close(fd)


def release_folders() -> None:
    """Let go of the folder this process holds (``hold_folder``), if any. A forked child (a data loader worker)
    shares the lock with its parent until it closes its copy, so it does so at once (closing the child's copy
    leaves the parent's lock as it is): a parent killed while its workers exit no longer holds the folder."""
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the last copy lets go of the lock
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=release_folders)
