"""What only Hydra knows about a run: its directory, its name, its sweep. Filled into the config."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import traceback
import uuid
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from simpo_exp.errors import FolderInUse, OtherRunsDirectory
from simpo_exp.finished import FINISHED
from simpo_exp.inference.files import probe_writable, write_atomic
from simpo_exp.rundir import (
    CONF_DIR,
    RANK_ERROR_GLOB,
    REFUSED_FILE,
    RESUMABLE_CHANGES,
    STOPPED_FILE,
    checkpoint_dirs,
    ended_unrecorded,
    failure_record,
    hold_folder,
    parsed_request,
    read_json,
    read_yaml,
    records_dir,
    release_folders,
    rerun_command,
    select,
    split_outside,
    stopped_before_a_step_record,
    stopped_words,
    sweep_request,
)
from simpo_exp.signals import StopRequested, declined_requeue, interrupt_status

log = logging.getLogger(__name__)


# One override of Hydra's override_dirname ("k=v,k=v"): a comma outside brackets and quotes followed by a key and
# "=" (a list value's commas, "dataset.sources=[a,b]", are not followed by one; a quoted path's may be:
# "model.path='/runs/0_beta=5,eval_steps=10/model'").
_NEXT_ITEM = re.compile(r",(?=[+~]?[\w.@-]+=)")


def _override_items(overrides: str) -> list[str]:
    return split_outside(overrides, at=_NEXT_ITEM)


_LONG_FLOAT = re.compile(r"^(?P<key>[^=]+=)(?P<value>-?\d+\.\d{7,}(?:[eE][-+]?\d+)?)$")


def job_dirname(overrides: str, sweep_dir: str | None = None, num=None, limit: int = 120) -> str:
    """A sweep job's directory name from its overrides: no '/' (a path value would nest directories). A name past
    ``limit`` characters gives way in this order, so that what tells a sweep's jobs apart stays readable: the
    settings that do not change what trains (``RESUMABLE_CHANGES``: eval_steps, logger, ...) are left out, long
    floats (an Optuna sample: 4.939549651064031) kept to 6 significant digits, dotted keys named by their last
    part (``dataset.synthetic.num_test`` as ``num_test``), then whole items, the longest first but the sweep's swept
    keys last (a value is never cut inside, where it read as another), then, for one item alone past the limit,
    its end; a hash of the whole list follows, so two jobs never share a name. (Cut at the end alone, a name lost
    the keys sorted last: seed, and under Optuna the learning rate.)"""
    name = overrides.replace("/", "_") or "default"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    before = _cut_before(overrides, limit)
    if sweep_dir is not None and (Path(str(sweep_dir)) / f"{num}_{before}").is_dir():
        return before  # a job of a sweep started then: its folder, with its checkpoints, goes on
    items = [i for i in _override_items(name) if i.lstrip("+~").split("=", 1)[0] not in RESUMABLE_CHANGES]
    items = [(m["key"] + f"{float(m['value']):.6g}") if (m := _LONG_FLOAT.match(i)) else i for i in items]
    if len(",".join(items)) > limit - 9:  # dotted keys by their last part where that names one item only
        lasts = [i.split("=", 1)[0].rsplit(".", 1)[-1] for i in items]
        items = [
            last + "=" + i.split("=", 1)[1] if lasts.count(last) == 1 and "=" in i else i
            for i, last in zip(items, lasts)
        ]
    room = limit - 9
    if len(",".join(items)) > room:  # whole items left out, the longest first (a path, a list; never a seed=1),
        # the sweep's swept keys last: cut inside one, a value read as another ("max_steps=" before the hash read as
        # max_steps=-4954...)
        swept = swept_keys(Path(str(sweep_dir))) if sweep_dir is not None else frozenset()
        key = lambda item: item.lstrip("+~").split("=", 1)[0]  # noqa: E731
        kept = list(items)
        for item in sorted(items, key=lambda i: (key(i) not in swept, len(i)), reverse=True):
            if len(",".join(kept)) <= room or len(kept) == 1:
                break
            kept.remove(item)
        items = kept
    return ",".join(items)[:room] + "-" + digest


OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)


def _cut_before(overrides: str, limit: int = 120) -> str:
    """A long job folder name as names were cut before 2026-12-02: at the end, then a hash of the whole list."""
    name = overrides.replace("/", "_") or "default"
    return name if len(name) <= limit else name[: limit - 9] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]


def launch_time(pattern: str) -> str:
    """The time this command started, formatted as Hydra's ``now`` formats it: this process's, or where torchrun or
    accelerate launch started it as one of several processes on this machine, their launcher's (the parent they
    share), so that every process resolves one default run folder. Each resolving its own ``now``, processes
    started a second apart (imports take longer on some) wrote two folders: the run's, and one holding a rank's log
    and config, which compare listed as a run "running" for good. Several machines: give ``hydra.run.dir``."""
    started = datetime.datetime.now()
    # torch's elastic agent (torchrun, accelerate launch) is the parent: its workers carry its run id. A process
    # given RANK/WORLD_SIZE by hand (the generate stage's) has a shell for a parent, started who knows when.
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("LOCAL_WORLD_SIZE") or 1) > 1:
        parent = _process_start(os.getppid())
        if parent is not None:
            started = datetime.datetime.fromtimestamp(parent)
    return started.strftime(pattern)


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None where there is no /proc."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        boot = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# cached, as Hydra's ``now`` is: Hydra resolves the run folder more than once in a process
OmegaConf.register_new_resolver("launch_time", launch_time, replace=True, use_cache=True)


_JOB_FOLDER = re.compile(r"^(\d+)_(.*)$")


def job_subdir(overrides: str, sweep_dir: str | None = None, num=None) -> str:
    """A sweep job's folder: ``<job number>_<job_dirname>``, or where the sweep folder already holds this setting's
    folder under another number, that one. A sweep run again with a value taken out or added (``beta=5,10`` after
    ``beta=2,5,10``) numbers its jobs anew; by number alone, a finished setting trained again from the start in a
    new folder and a stopped one did not resume. The job's own number comes first (a requeued or repeated sweep is
    unchanged); of several others (a setting given twice), the lowest. The processes of a multi-process job agree:
    a folder under another number is one that was there before the job started."""
    name = job_dirname(overrides, sweep_dir, num)
    if sweep_dir is None or (Path(str(sweep_dir)) / f"{num}_{name}").is_dir():
        return f"{num}_{name}"
    names = {name, _cut_before(overrides)}  # an earlier sweep's folder under a long name cut the old way too
    with contextlib.suppress(OSError):
        sweep = Path(str(sweep_dir))
        found = [(m, p) for p in sweep.iterdir() if (m := _JOB_FOLDER.match(p.name))]
        folders = [(int(m[1]), p.name, m[2]) for m, p in found if p.is_dir()]
        taken = sorted((n, f) for n, f, named in folders if named in names)
        # else a folder of this setting under other settings a resume may change (logger=none added, another
        # eval_steps), as its job recorded them whole (a long name is cut, with a hash of them all): a job trains
        # the same there, and resumes or is skipped as finished, saying what it cannot apply. Not where this sweep
        # itself gives such a setting several values (eval_steps=1,2): its jobs are the runs asked for, each its own.
        if not taken:
            swept = swept_keys(sweep)
            alike = _trains_alike(overrides, swept)
            taken = sorted(
                (n, f) for n, f, _ in folders if _trains_alike(_recorded_overrides(sweep / f), swept) == alike
            )
        if taken:
            return taken[0][1]
    return f"{num}_{name}"


def _trains_alike(overrides: str | None, swept: frozenset = frozenset()) -> list[str] | None:
    """A job's overrides (Hydra's ``override_dirname``) less the operational ones (``operational``: the cadence, the
    logger, ...) but those of the ``swept`` keys; None for None (a folder without its record)."""
    if overrides is None:
        return None
    keep = lambda item: item.split("=", 1)[0] in swept or not operational(item)  # noqa: E731
    return [i for i in _override_items(overrides) if i and keep(i.lstrip("+~"))]


def swept_keys(sweep_dir: Path) -> frozenset:
    """The keys the sweep in ``sweep_dir`` gives several values: as the sweeping command recorded them for its jobs
    (``SWEPT_ENV``, set by ``SweepSummary``), else from the folder's ``multirun.yaml``, which a second sweep started
    in the same folder rewrites (a job of the first then took a folder of another setting for its own)."""
    recorded = os.environ.get(SWEPT_ENV)
    if recorded is not None and os.environ.get(SWEEP_DIR_ENV) == os.path.abspath(sweep_dir):
        with contextlib.suppress(ValueError):
            return frozenset(json.loads(recorded))
    return swept_in(sweep_request(sweep_dir)[1])


def this_sweeps_keys() -> frozenset:
    """The keys the --multirun this job is one of gives several values (``swept_keys`` of its folder); none outside
    a --multirun."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return frozenset()
    hc = HydraConfig.get()
    return swept_keys(Path(hc.runtime.cwd) / hc.sweep.dir)


def swept_in(parsed: list | None) -> frozenset:
    """The keys a sweep's parsed overrides (``rundir.parsed_request``) give several values."""
    return frozenset(o.key_or_group for o in parsed or [] if o.is_sweep_override())


def _recorded_overrides(folder: Path) -> str | None:
    """The ``override_dirname`` a sweep job recorded in its ``.hydra/hydra.yaml`` (whole, where its folder's name may
    be cut); None where there is none to read."""
    value = select(read_yaml(folder / ".hydra" / "hydra.yaml") or {}, "hydra.job.override_dirname", missing=None)
    return None if value is None else str(value)


OmegaConf.register_new_resolver("job_subdir", job_subdir, replace=True)
# a path's last part: the SLURM preset names its jobs after the sweep's folder (Hydra's default, the job's name, is
# "__main__" under python -m, the same for every job of every sweep in squeue and sacct)
OmegaConf.register_new_resolver("folder_name", lambda path: Path(str(path)).name, replace=True)


def stage_groups(choices, optional: str = "") -> str:
    """The ``--help`` listing of a stage's config groups: those its defaults compose (``hydra.runtime.choices``)
    and the ``optional`` ones (space-separated) it takes with ``+``, each with its options, from every folder on
    Hydra's search path (a ``--config-dir`` too). Hydra's own listing names every group in ``conf/``, so each
    stage listed the other stages' groups as well (``benchmark`` under training, which refuses it)."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        options = GlobalHydra.instance().config_loader().get_group_options
    else:  # resolved outside a Hydra app: the package's own presets
        options = lambda group: [p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")]  # noqa: E731
    groups = [g for g in choices if not g.startswith("hydra/")] + [f"+{g}" for g in optional.split()]
    names = sorted(groups, key=lambda g: g.lstrip("+"))
    return "\n".join(f"{g}: {', '.join(sorted(options(g.lstrip('+'))))}" for g in names)


OmegaConf.register_new_resolver("stage_groups", stage_groups, replace=True)


def tasks_for_gpus(gpus_per_node) -> int:
    """``+launcher=slurm``'s tasks per node: one per GPU, and one on a node given no GPU (``gpus_per_node=0`` asked
    SLURM for no task at all)."""
    return max(1, int(gpus_per_node))


OmegaConf.register_new_resolver("tasks_for_gpus", tasks_for_gpus, replace=True)


LAUNCH_GROUPS = ("launcher", "sweep")  # how a sweep's jobs run (+launcher=slurm, +sweep=optuna), not what they train


def operational(item: str) -> bool:
    """Whether an override (``key=value``) leaves what a run trains as it is: Hydra's own, ``RESUMABLE_CHANGES``
    (``resume=false``, the logger, the cadence, ...) and how the jobs are launched (``LAUNCH_GROUPS``)."""
    key = item.split("=", 1)[0]
    return key.startswith("hydra.") or key.split(".", 1)[0] in RESUMABLE_CHANGES or key in LAUNCH_GROUPS


def run_name(overrides: list[str], sft_weight: float, swept: frozenset = frozenset()) -> str:
    """A readable name from the command-line overrides, e.g. ``beta=5,gamma_beta_ratio=0.3``: those that change
    what the run trains (not the ``operational`` ones), and those a sweep varies (``swept``: a sweep over
    ``eval_steps=10,50`` named every job ``default``)."""
    keep = lambda item: item.split("=", 1)[0] in swept or not operational(item)  # noqa: E731
    parts = [o.lstrip("+~") for o in overrides if keep(o.lstrip("+~"))]
    if sft_weight > 0 and not any(p.startswith("sft_weight=") for p in parts):
        parts.append(f"sft={sft_weight:g}")
    return ",".join(parts) or "default"


def recorded_sweep_group(sweep_dir: Path) -> str | None:
    """The W&B group this sweep's jobs already recorded (``wandb_run.json``), if any: a sweep moved to another folder
    and resumed there gave its resumed and new jobs a group of the new path, its finished ones kept the old one, and
    the dashboard refused the sweep as two."""
    records = [read_json(record) for record in sorted(Path(sweep_dir).glob("*/wandb_run.json"))]
    groups = [r.get("group") for r in records]
    groups = [g for g in groups if isinstance(g, str) and g.startswith("sweep-")]
    return max(set(groups), key=groups.count) if groups else None


def sweep_group(sweep_dir: str, cwd: str | None = None) -> str:
    """A sweep's W&B group: ``sweep-<its directory's name>-<6 hex of its absolute path>``. By name alone, sweeps in
    directories of one name (``outputs/a/beta``, ``outputs/b/beta``) shared a group, so each one's dashboard showed
    both."""
    path = os.path.normpath(os.path.join(cwd or os.getcwd(), str(sweep_dir)))
    return f"sweep-{Path(path).name}-{hashlib.sha1(path.encode()).hexdigest()[:6]}"


def fill_run_identity(cfg: DictConfig) -> DictConfig:
    """Resolve the config and set ``logger.run_name``/``logger.group`` from Hydra's state."""
    hc = HydraConfig.get()
    overrides = given_overrides(hc)
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    refuse_a_sweep_folder_per_process(hc)
    for override in overrides:
        group = override.lstrip("~").split("=", 1)[0]
        if override.startswith("~") and (Path(CONF_DIR) / group).is_dir():
            from simpo_exp.config import ConfigError

            raise ConfigError(f"{override}: the {group} group cannot be removed; pick one of its options ({group}=...)")
    searched = set(OmegaConf.select(hc, "sweeper.params", default=None) or {})
    refuse_unused(cfg, given, dict(hc.runtime.choices), lambda extra: _compose_as_given(hc, extra), searched)
    for mine, shipped in shadowed_presets(hc.runtime.config_sources, dict(hc.runtime.choices)):
        log.warning(
            "%s is not read: the shipped %s of the same name is found first; give yours a name of its own",
            mine,
            shipped,
        )
    target = OmegaConf.select(cfg, "hardware.effective_batch_size")
    if "gradient_accumulation_steps" in given and target:
        from simpo_exp.config import ConfigError

        raise ConfigError(
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} would not be used: "
            f"hardware.effective_batch_size={target} (hardware={hc.runtime.choices.get('hardware')}, an experiment "
            "or the command line) sets the accumulation from the device count; add "
            "hardware.effective_batch_size=null to fix the accumulation yourself, or leave it to the global batch"
        )
    hparams = hc.runtime.choices.get("hparams")
    fixed = hparams and preset_value(hc.runtime.config_sources, "hparams", hparams, "gradient_accumulation_steps")
    if target and fixed and "gradient_accumulation_steps" not in given:  # the global batch wins, said
        log.warning(
            "hparams=%s's gradient_accumulation_steps=%s is not used: hardware.effective_batch_size=%s (hardware=%s) "
            "sets the accumulation from the device count; add hardware.effective_batch_size=null to keep the "
            "preset's",
            hparams, fixed, target, hc.runtime.choices.get("hardware"),
        )  # fmt: skip
    resolve(cfg)
    lc = cfg.logger
    if lc.get("run_name") is None:
        lc.run_name = run_name(overrides, float(cfg.sft_weight), this_sweeps_keys())
    if lc.get("group") is None and hc.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hc.runtime.cwd) / hc.sweep.dir
        lc.group = recorded_sweep_group(sweep_dir) or sweep_group(hc.sweep.dir, hc.runtime.cwd)
    if hc.runtime.choices:
        picked = [f"{g}:{c}" for g, c in hc.runtime.choices.items() if not g.startswith("hydra") and c]
        lc.tags = list(lc.get("tags") or []) + picked
    point_to_records(cfg, hc)
    return cfg


def point_to_records(cfg: DictConfig, hc) -> None:
    """Where ``output_dir=`` moves the run's records away from its Hydra folder, write their place, resolved, into
    that folder's ``.hydra/`` (``RECORDS_POINTER``): an interpolated one (``output_dir=/x/b${beta}``, how a sweep gives
    each job its own) cannot be resolved from the saved config, so the sweep's summary called every finished job
    "still running" and compare listed them without metrics."""
    from simpo_exp.rundir import RECORDS_POINTER

    out, hydra_dir = cfg.get("output_dir"), Path(str(hc.runtime.output_dir))
    if not out or hc.output_subdir is None or Path(out).resolve() == hydra_dir.resolve():
        return
    with contextlib.suppress(OSError):
        write_atomic(hydra_dir / str(hc.output_subdir) / RECORDS_POINTER, str(Path(out).resolve()))


def resolve(cfg: DictConfig) -> None:
    """``OmegaConf.resolve``; an interpolation that cannot be resolved (``beta=${oc.env:UNSET}``) is a ConfigError
    naming its key."""
    from omegaconf.errors import InterpolationResolutionError

    try:
        OmegaConf.resolve(cfg)
    except InterpolationResolutionError as e:
        from simpo_exp.config import ConfigError

        key = next((k for k in _leaf_keys(cfg) if _unresolvable(cfg, k)), "?")
        raw = OmegaConf.to_container(cfg, resolve=False)
        for part in key.split("."):
            raw = raw.get(part) if isinstance(raw, dict) else None
        cause = str(e).splitlines()[0]
        raise ConfigError(f"{key}={raw}: cannot be resolved ({cause})") from None


def _leaf_keys(node, prefix: str = ""):
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            yield from _leaf_keys(child, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _unresolvable(cfg: DictConfig, key: str) -> bool:
    from omegaconf.errors import InterpolationResolutionError

    try:
        OmegaConf.select(cfg, key)
        return False
    except InterpolationResolutionError:
        return True


def under_torchrun() -> bool:
    """Whether this process is one of several torchrun started (accelerate launch starts them through it): a
    ``--multirun`` then runs every job on all of them, in one process group. (submitit's tasks run one job each.)"""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID")) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def refuse_a_sweep_folder_per_process(hc) -> None:
    """A ``--multirun`` that torchrun (or accelerate launch) starts on several processes needs a fixed
    ``hydra.sweep.dir``: each process resolves the default, ``outputs/multirun/${now:...}``, at its own start, and
    processes started a second apart wrote two sweep folders. (submitit's tasks share the folder their launcher
    resolved once.)"""
    from simpo_exp.config import ConfigError

    if under_torchrun() and hc.mode == RunMode.MULTIRUN and not _folder_given(hc.overrides.hydra, "hydra.sweep.dir"):
        raise ConfigError(
            f"--multirun on {os.environ['WORLD_SIZE']} processes: give a fixed hydra.sweep.dir=... (every process "
            f"must name the same folder; the default, {hc.sweep.dir}, is each process's own start time)"
        )


def _folder_given(overrides, key: str) -> bool:
    """Whether ``overrides`` (Hydra's, or the task's) give ``key`` (``hydra.run.dir``, ``hydra.sweep.dir``,
    ``output_dir``) a value of its own (``++key=`` too)."""
    return any(str(o).lstrip("+").startswith(f"{key}=") for o in overrides)


def refuse_a_folder_per_hand_started_process(hc, what: str = "generation") -> None:
    """Processes given ``RANK``/``WORLD_SIZE`` by hand (the generate stage's split, README) share no launcher: each
    resolves the default folder, ``${now:...}``, at its own start, so processes started a second apart sampled
    their shards into folders of their own and no data set was ever written. They need a fixed folder
    (``hydra.run.dir``, or ``hydra.sweep.dir`` for a ``--multirun``). So do torchrun's on several machines
    (``WORLD_SIZE`` past ``LOCAL_WORLD_SIZE``): each machine's launcher starts at its own second."""
    from simpo_exp.config import ConfigError

    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return  # named where the stage reads it (generate.run.process_place)
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    machines = "TORCHELASTIC_RUN_ID" in os.environ and local.isdigit() and world > int(local)
    if world <= 1 or ("TORCHELASTIC_RUN_ID" in os.environ and not machines):
        return  # torchrun on one machine: its launcher's start time is every process's (``launch_time``)
    sweep = hc.mode == RunMode.MULTIRUN
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    if not (_folder_given(hc.overrides.hydra, key) or (not sweep and _folder_given(hc.overrides.task, "output_dir"))):
        start = "each machine's launcher's start time" if machines else "each process's own start time"
        raise ConfigError(
            f"WORLD_SIZE={world} without a fixed {key}=...: every process of one {what} must name the same "
            f"folder (the default, {hc.sweep.dir if sweep else hc.run.dir}, is {start})"
        )


def given_overrides(hc) -> list[str]:
    """The command line's overrides as typed: ``beta=${oc.env:B}`` stays text (read through OmegaConf, Hydra's list
    would resolve it, and fail where the variable is missing)."""
    return [str(o) for o in OmegaConf.to_container(hc.overrides.task, resolve=False)]


def _swept_by_this_sweep(key: str) -> bool:
    """Whether ``key`` is refused where inert: in a single run, or where this job's sweep gives it several values
    (a sweep over it trains one run under several names); a sweep over another key (``fused_head=none,liger``) that
    hands it to every job leaves it unread in some of them."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return True
    return key in this_sweeps_keys()


# (key, inert(cfg, method spec), why): a key given on the command line that the run's other settings leave unread
INERT_GIVEN = (
    (
        "hardware.logps_chunk_size",
        lambda c, m: OmegaConf.select(c, "hardware.fused_head") == "liger" and m is not None and not m.reference,
        lambda c: (
            "hardware.fused_head=liger computes the log-probs in its own chunks (a method with reference "
            "log-probs reads it for the reference's pass)"
        ),
    ),
    (
        "hardware.measure_layouts",
        lambda c, m: OmegaConf.select(c, "hardware.packing") != "auto",
        lambda c: f"only hardware.packing=auto measures layouts; the run packs as {c.hardware.packing}",
    ),
    ("save_dtype", lambda c, m: not c.get("save_model", True), lambda c: "save_model=false writes no model"),
)


# The methods whose beta scales summed log-ratios or log-probs (their loss presets' 0.1), not SimPO's per-token means
SMALL_BETA_METHODS = ("dpo", "ipo", "rdpo", "cpo", "orpo")


def refuse_unused(cfg: DictConfig, given: set[str], choices: dict, compose=None, searched=frozenset()) -> None:
    """Refuse a value given on the command line (``given``: its keys) that the run would not use: a sweep over it
    would train the same run again under other names. ``choices``: the config groups picked; ``compose(overrides)``:
    the primary config composed with those overrides alone, to tell what an hparams preset sets.

    - a method hyper-parameter the method does not read (``loss=simper beta=5``);
    - ``num_train_epochs`` where a preset's ``max_steps`` (the embedded default's 200) decides the length;
    - ``gamma`` and ``gamma_beta_ratio`` together, or ``gamma_beta_ratio`` where a preset's absolute ``gamma`` wins;
    - ``hparams=`` with ``experiment=``, where the experiment (composed after it) sets the keys the preset sets;
    - under ``experiment=``, what the groups composed around it silently drop: see ``refuse_lost_to_experiment``.

    ``searched``: the keys the sweeper's search space (``hydra.sweeper.params``) sets, which the user did not type."""
    from simpo_exp.config import ConfigError
    from simpo_exp.methods import METHOD_KEYS, TABLE, readers

    if "method" in given and compose is not None:
        refuse_method_without_its_preset(cfg, choices, compose)
    if "num_train_epochs" in given and "max_steps" not in given and (cfg.get("max_steps") or 0) > 0:
        raise ConfigError(
            f"num_train_epochs={cfg.get('num_train_epochs')} would not be used: max_steps={cfg.get('max_steps')} (set "
            f"by a preset: model={choices.get('model')}, or another group) decides the run's length; add "
            "max_steps=-1 to train by epochs"
        )
    if {"gamma", "gamma_beta_ratio"} <= given and cfg.get("gamma") is not None:
        both = "give gamma (absolute margin) or gamma_beta_ratio (gamma = beta * ratio), not both"
        searched_one = sorted({"gamma", "gamma_beta_ratio"} & set(searched))
        if searched_one:  # the user typed the other; the sweep's search space sets this one
            both += f": the sweep's search space sets {searched_one[0]}; add '~hydra.sweeper.params.{searched_one[0]}'"
        raise ConfigError(both)
    method = cfg.get("method")
    beta = cfg.get("beta") if "beta" in searched and method in SMALL_BETA_METHODS else None  # only then resolved
    if isinstance(beta, (int, float)) and beta > 1:
        log.warning(
            "beta=%.3g comes from the sweep's search space, SimPO's scale (+sweep=optuna: 2-10); method=%s's beta is "
            "usually 0.01-0.5 (its loss preset's 0.1): search that range with "
            "\"hydra.sweeper.params.beta='tag(log, interval(0.01, 0.5))'\"",
            beta,
            method,
        )
    unread = sorted(given & set(METHOD_KEYS) - set(TABLE[method].reads)) if method in TABLE else []
    if unread:
        key = unread[0]
        fix = (
            f"search without it: add '~hydra.sweeper.params.{key}' (the sweep's search space, "
            f"{choices.get('hydra/sweeper') or 'a preset'}'s, sets it)"
            if key in searched
            else "leave it out"
        )
        raise ConfigError(
            f"{key}={cfg.get(key)!r} would not be used: method={method!r} does not read it (read by "
            f"{', '.join(readers(key))}); {fix}"
        )
    for key, inert, why in INERT_GIVEN:
        if key in given and inert(cfg, TABLE.get(method)):
            said = f"{key}={OmegaConf.select(cfg, key)!r} would not be used: {why(cfg)}"
            if not _swept_by_this_sweep(key):  # given to every job of a sweep over another key: said, not refused
                log.warning("%s; this job runs without it", said)
                continue
            raise ConfigError(f"{said}; leave it out")
    warn_synthetic_unread(cfg, given)
    if "gamma_beta_ratio" in given and cfg.get("gamma") is not None:
        raise ConfigError(
            f"gamma_beta_ratio={cfg.gamma_beta_ratio} would not be used: gamma={cfg.gamma} (an absolute margin, set "
            "by a preset) takes its place; add gamma=null to use the ratio"
        )
    if {"experiment", "hparams"} <= given and choices.get("experiment") and compose is not None:
        hparams = choices.get("hparams")
        changed = hparams_preset_values(hparams, given, compose, "experiment")
        if changed is None:
            return
        lost = {key: value for key, value in changed.items() if value != cfg.get(key)}
        if lost:
            sets = ", ".join(f"{k} ({v} in hparams={hparams}, {cfg.get(k)} in the experiment)" for k, v in lost.items())
            raise ConfigError(
                f"hparams={hparams} would not be used: experiment={choices['experiment']} is composed after it and "
                f"sets its own values of {sets}; give those keys on the command line instead"
            )
    if "hparams" in given and choices.get("hparams") not in (None, "default") and not choices.get("experiment"):
        refuse_hparams_lost_to_loss(cfg, given, choices, compose, TABLE.get(method))
    if choices.get("experiment") and compose is not None:
        refuse_lost_to_experiment(cfg, given, choices, compose)


def refuse_method_without_its_preset(cfg: DictConfig, choices: dict, compose) -> None:
    """Refuse ``method=<another>`` on the command line: it replaced the method the loss group picked and kept that
    group's other values, so ``method=dpo`` trained DPO at SimPO's beta 2.0, ``method=rdpo`` with no length term and
    ``method=cpo``/``orpo`` with no NLL term, each under its baseline's name. ``loss=<method>`` sets the method with
    its usual values."""
    from simpo_exp.config import ConfigError

    loss = choices.get("loss") or "simpo"
    try:
        picked = compose([f"loss={loss}"]).get("method")
    except Exception as e:  # Hydra's compose API unavailable in this process (a launcher's): left unchecked
        log.debug("method not checked: %s", e)
        return
    if cfg.get("method") != picked:
        raise ConfigError(
            f"method={cfg.get('method')} on the command line keeps loss={loss}'s other values (beta={cfg.get('beta')}, "
            f"sft_weight={cfg.get('sft_weight')}), not the method's own: give loss={cfg.get('method')} instead (it "
            "sets the method with its usual beta and NLL weight; beta=... after it still changes them)"
        )


def warn_synthetic_unread(cfg: DictConfig, given: set[str]) -> None:
    """Say that ``dataset.synthetic.*`` given beside data that is not synthetic is read by nothing (said, not refused:
    test and benchmark commands carry the small synthetic sizes to every data set they try)."""
    keys = sorted(k for k in given if k.startswith("dataset.synthetic."))
    sources = OmegaConf.select(cfg, "dataset.sources") or {}
    if keys and not any("synthetic" in (s.get("path"), s.get("format")) for s in sources.values()):
        log.warning(
            "%s not read: no data source is synthetic (dataset.sources: %s)", ", ".join(keys), ", ".join(sources)
        )


def hparams_preset_values(hparams: str, given: set[str], compose, against: str) -> dict | None:
    """The top-level values ``hparams=<hparams>`` sets apart from ``hparams=default``'s, but the keys ``given`` on the
    command line; None where Hydra's compose API is unavailable in this process (a launcher's): left unchecked."""
    try:
        preset, base = compose([f"hparams={hparams}"]), compose(["hparams=default"])
    except Exception as e:  # Hydra's compose API unavailable in this process (a launcher's)
        log.debug("hparams under %s not checked: %s", against, e)
        return None
    return {
        key: value
        for key, value in preset.items()
        if not isinstance(value, (dict, DictConfig)) and key not in given and value != base.get(key)
    }


def refuse_hparams_lost_to_loss(cfg: DictConfig, given: set[str], choices: dict, compose, spec) -> None:
    """Refuse ``hparams=<preset>`` where nothing it sets reaches the run: the loss group, composed after it, sets its
    own value of each (``loss=dpo``'s beta 0.1) or the method does not read it (DPO and gamma_beta_ratio), so the run
    is ``hparams=default``'s under another name (``hparams=default,strong-prefs loss=dpo`` trained one run twice)."""
    from simpo_exp.config import ConfigError
    from simpo_exp.methods import METHOD_KEYS

    hparams = choices["hparams"]
    changed = hparams_preset_values(hparams, given, compose, "loss") if compose is not None else None
    if changed is None:
        return
    reads = set(spec.reads) if spec is not None else None

    def lost(key, value) -> str | None:
        if reads is not None and key in METHOD_KEYS and key not in reads:
            return f"{key} ({value} in hparams={hparams}) is not read by method={cfg.get('method')}"
        if cfg.get(key) != value:
            return f"{key} ({value} in hparams={hparams}, {cfg.get(key)} in loss={choices.get('loss')})"
        return None

    why = [w for key, value in changed.items() if (w := lost(key, value))]
    if changed and len(why) == len(changed):
        raise ConfigError(
            f"hparams={hparams} would not be used: loss={choices.get('loss')} is composed after it, and of what the "
            f"preset sets: {'; '.join(why)}. The run would be hparams=default's under another name; give the keys "
            "on the command line instead (beta=...)"
        )


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def refuse_lost_to_experiment(cfg: DictConfig, given: set[str], choices: dict, compose) -> None:
    """Refuse what the defaults list's order would drop without a word under ``experiment=`` (a preset of the
    user's, typically):

    - the experiment's ``method``: the loss group is composed after the experiment (so that ``experiment=<recipe>
      loss=dpo`` trains DPO with DPO's beta), and an experiment cannot override a group listed after it, so its
      ``method: dpo`` trained SimPO; the fix is ``loss=dpo`` on the command line;
    - with that loss, the experiment's own values of the keys the loss preset sets (its DPO ``beta``);
    - with ``model=`` on the command line, the experiment's own ``model.*`` values (a recipe's chat template)
      laid over the model preset picked there."""
    from simpo_exp.config import ConfigError

    experiment, loss, model = choices["experiment"], choices.get("loss"), choices.get("model")
    try:
        own = compose([f"experiment={experiment}", "~loss"])  # the experiment's values, no loss group after it
        bare = compose(["~loss"])  # neither: what the experiment itself sets differs from it
        with_loss = compose([f"experiment={experiment}", f"loss={loss}"])
        picked = compose([f"model={model}"]).model if "model" in given else None
        laid = compose([f"experiment={experiment}", f"model={model}"]).model if "model" in given else None
    except Exception as e:  # Hydra's compose API unavailable in this process (a launcher's): left unchecked
        log.debug("experiment not checked: %s", e)
        return
    where = f"experiment={experiment}"
    if own.get("method") != cfg.get("method") and not {"loss", "method"} & given:
        raise ConfigError(
            f"{where} sets method={own.get('method')}, which would not be used: the loss group is composed after the "
            f"experiment (loss={loss} sets method={cfg.get('method')}) and an experiment cannot pick it; give "
            f"loss={own.get('method')} on the command line"
        )
    if own.get("method") == with_loss.get("method"):
        replaced = [
            f"{k} ({_shown(own.get(k))} in the experiment, {_shown(v)} in loss={loss})"
            for k, v in with_loss.items()
            if not isinstance(v, (dict, DictConfig)) and k not in given and own.get(k) not in (v, bare.get(k))
        ]
        if replaced:
            raise ConfigError(
                f"loss={loss} is composed after {where} and replaces its {', '.join(replaced)}; give the "
                "experiment's values on the command line"
            )
    if picked is not None and laid != own.get("model"):  # naming the experiment's own model changes nothing
        lost = [
            f"model.{k}={_shown(v)} (model={model} has {_shown(picked.get(k))})"
            for k, v in laid.items()
            if not isinstance(v, (dict, DictConfig)) and f"model.{k}" not in given and v != picked.get(k)
        ]
        if lost:
            raise ConfigError(
                f"model={model} with {where}: the experiment is composed after the model group and lays its own "
                f"{', '.join(lost)} over it; give each of those keys on the command line (model.<key>=...; "
                "model.chat_template=auto takes the tokenizer's own) so that the run says which it trains with"
            )


def shadowed_presets(sources, choices: dict) -> list[tuple[Path, Path]]:
    """(a preset of the user's, the shipped one read in its place) for each group option this run picked that a
    ``--config-dir`` (or ``hydra.searchpath``) folder holds under the same name as the project's ``conf/``: the
    project's folder comes first in Hydra's search path, so the user's file is silently not read."""
    shipped = Path(CONF_DIR).resolve()
    folders = [Path(s.path) for s in sources if s.schema == "file" and Path(s.path).resolve() != shipped]
    pairs = []
    for group, option in choices.items():
        if group.startswith("hydra") or not option:
            continue
        for folder in folders:
            mine = folder / group / f"{option}.yaml"
            if mine.is_file() and (shipped / group / f"{option}.yaml").is_file():
                pairs.append((mine, shipped / group / f"{option}.yaml"))
    return pairs


def preset_value(sources, group: str, option: str, key: str):
    """``key`` as the preset ``group=option`` sets it (its first file on the search path), or None."""
    for source in sources:
        path = Path(source.path) / group / f"{option}.yaml"
        if source.schema == "file" and path.is_file():
            return OmegaConf.select(OmegaConf.load(path), key, default=None)
    return None


def _compose_as_given(hc, extra: list[str]) -> DictConfig:
    """The primary config with ``extra`` overrides only (Hydra's compose API, inside the running app: the same
    search path, ``--config-dir`` included)."""
    from hydra import compose

    return compose(config_name=hc.job.config_name, overrides=extra)


@contextlib.contextmanager
def user_errors(cfg: DictConfig, work: str | None = None, hold: bool = True, keeps: str = "checkpoints"):
    """Turn a failed job into a clear message and an ``error.json`` in its directory. ``work``: where the stage
    keeps what it has done, when not in that directory (the evaluate stage's, in each run's ``eval/``); ``keeps``:
    what it has done, in words, as a Ctrl-C says it is kept.

    A bad config value, a missing model or data file is the user's to fix: show the message,
    not a traceback. In a single run the process exits with status 2 (a crash: Hydra's traceback, exit
    status 1). In a sweep every failed job, crash or not, ends with its message (a crash's with its
    traceback) and the sweep goes on: the task returns None, which Hydra's sweeper ignores and the Optuna
    sweeper records as a failed trial (a NaN it would refuse, and a raised error would stop Hydra's
    sweeper after the batch); ``SweepSummary`` lists the failed jobs at the end.

    ``hold``: take the job's folder first (``rundir.hold_folder``). Yields whether the job goes on: False for a
    sweep's job whose folder another job holds, refused (the caller returns; a single run exits 2 there).
    """
    out = Path(HydraConfig.get().runtime.output_dir)
    export_launcher_distributed_env()  # a multi-task SLURM job's ranks, so that one process alone is the main one
    name_the_rank_in_logs()
    single, main = HydraConfig.get().mode == RunMode.RUN, os.environ.get("RANK", "0") == "0"
    writes = Path(OmegaConf.select(cfg, "output_dir", default=None) or out)  # output_dir=... may move the work
    with contextlib.ExitStack() as ending:
        if main and hold:  # before anything here is read or removed: a job still working in this folder keeps it
            if not _take_folder(out, writes, cfg, single):
                yield False  # refused, in a sweep: the caller returns, the sweep goes on
                return
            ending.callback(release_folders)  # after the records below: let go when the stage is over
        # a re-run's outcome replaces an earlier failure's, stop's or refusal's, unless this command is refused or
        # interrupted before it starts: then they are put back. The main process alone (every process names this
        # folder)
        earlier = _take_records(out) if main else {}
        try:
            yield True
        except StopRequested as e:  # a stop signal before training began (simpo_exp/__main__.py): nothing trained
            _put_back(out, earlier)
            if main and hold and not (writes / STOPPED_FILE).exists():  # compare and the sweep's summary read it
                writes.mkdir(parents=True, exist_ok=True)
                record = stopped_before_a_step_record(writes, e.signum, "start-up")
                write_atomic(writes / STOPPED_FILE, json.dumps(record, indent=2))
            raise
        except KeyboardInterrupt as e:  # Ctrl-C (or SIGTERM) outside training's own handler (set-up, sampling, judging)
            _put_back(out, {k: v for k, v in earlier.items() if k == STOPPED_FILE})  # stopped, as it was before
            # a stage that works in other folders (evaluate: each run's eval/) finds its work there again from any
            # folder of its own: the same command goes on
            print(
                f"interrupted; what {work or out} holds so far ({keeps}) is kept: "
                f"{'re-run the same command' if work else rerun_command()} to go on",
                file=sys.stderr,
            )
            raise SystemExit(interrupt_status(e)) from None
        except OtherRunsDirectory as e:  # the run there is left as it was: its outcome and the config it ran with
            _put_back(out, earlier)
            restore_run_config(out)
            if not single and main:  # the sweep's summary lists it
                (out / REFUSED_FILE).write_text(refusal_record(e))
            print(f"error: {e}", file=sys.stderr)
            if single:
                raise SystemExit(2) from None
        except Exception as e:
            if declined_requeue(e) and (writes / STOPPED_FILE).exists():
                # a time limit after submitit's requeues were used up (hydra.launcher.max_num_timeout): the run saved
                # its checkpoint and stop record before submitit declined; stopped and resumable, not crashed
                print(
                    f"stopped at the time limit and not requeued ({e}); {writes} keeps its checkpoint: "
                    f"{rerun_command()} to resume",
                    file=sys.stderr,
                )
                if single:
                    raise
                return  # the sweep goes on (an Optuna trial without a value: failed)
            if main and hold and _is_user_error(e) and _refused_before_its_start(out, writes):
                # a command refused in the folder of a run it never started (a bad value beside a finished or
                # stopped run): that run is left as it was, its outcome and the config it ran with, as a refusal by
                # another run's folder leaves it
                _put_back(out, earlier)
                restore_run_config(out)
                if not single:  # the sweep's summary lists it
                    (out / REFUSED_FILE).write_text(refusal_record(e))
                print(f"error: {e} ({writes} holds a run from before, left as it was)", file=sys.stderr)
                if single:
                    raise SystemExit(2) from None
                return
            record = {"error": str(e), "type": type(e).__name__, "overrides": given_overrides(HydraConfig.get())}
            if main:  # one record of the run's failure; every process naming it overwrote the others' half-written
                out.mkdir(parents=True, exist_ok=True)
                write_atomic(out / "error.json", json.dumps(record, indent=2))
            else:  # its own failure (a crash, or a user error on its node alone), which the main one may only echo
                out.mkdir(parents=True, exist_ok=True)
                write_atomic(out / f"error-rank{os.environ.get('RANK')}.json", json.dumps(record, indent=2))
            if not _is_user_error(e):
                _note_collective_timeout(e, cfg)
                if single:
                    raise  # a crash: Hydra shows the traceback
                if under_torchrun():
                    # a crash on one of several processes leaves their process group unusable: the sweep ends here
                    # on every process (SystemExit: Hydra's launcher would record an exception and start the next
                    # job), rather than one going on to the next job while another waits in this one's
                    traceback.print_exc()
                    print(
                        f"error: this sweep job crashed ({type(e).__name__}) on one of its processes, whose group it "
                        "leaves unusable: the sweep ends here; re-run the same command to go on",
                        file=sys.stderr,
                    )
                    raise SystemExit(1) from None
                traceback.print_exc()
                print(f"error: this sweep job crashed ({type(e).__name__}); the others go on", file=sys.stderr)
                return
            print(f"error: {e}", file=sys.stderr)
            if single:
                raise SystemExit(2) from None
        else:  # a command refused here meanwhile may have put back a half-written copy: this job's own, once more
            if main and hold:
                _write_hydra_files(out, _started_with.get(str(out.resolve()), {}))


def _take_folder(out: Path, writes: Path, cfg: DictConfig, single: bool) -> bool:
    """Hold the folder the job writes (``rundir.hold_folder``) and write its .hydra files from memory; False where
    another job holds it (a single run exits 2 there; a sweep's job is recorded as refused beside its folder, which
    is the other job's, and the sweep goes on)."""
    try:
        hold_folder(
            writes,
            "wait for it to end, or give this command a folder of its own (hydra.run.dir=...; hydra.sweep.dir="
            "... for a sweep); two jobs started in the same second get the same dated folder",
        )
    except FolderInUse as e:  # the working job's records and config stay as it left them
        restore_run_config(out, HELD)  # Hydra rewrote them for this command: the holder's own copy goes back
        _put_back_sweep_mark(out)  # and this command's sweep mark: the holder's sweep left its job out, unreported
        print(f"error: {e}", file=sys.stderr)
        if single:
            raise SystemExit(2) from None
        refused = out.parent / f"{IN_USE_REFUSED}{out.name}.json"  # read by SweepSummary, also from another process
        write_atomic(refused, refusal_record(e))
        return False
    own = hydra_files(cfg)  # from memory: another command's Hydra may have rewritten .hydra/ before the lock
    _started_with.clear()
    _started_with[str(out.resolve())] = own
    _write_hydra_files(out, own, keep=True)
    _keep_sweep_mark(out)
    return True


def _write_hydra_files(out: Path, files: dict[str, str], keep: bool = False) -> None:
    """Write a job's .hydra files (``keep``: first their copy in .hydra/held/), each whole (``write_atomic``), so
    that a command refused here never reads or leaves half of one."""
    if not (out / ".hydra").is_dir():  # hydra.output_subdir=null
        return
    for folder in ([out / ".hydra" / HELD] if keep else []) + [out / ".hydra"]:
        for name, text in files.items():
            write_atomic(folder / name, text)


# the sweeping command's identity, set by SweepSummary for its jobs (in its process or a launcher's)
SWEEP_ENV = "SIMPO_EXP_SWEEP"
SWEPT_ENV, SWEEP_DIR_ENV = "SIMPO_EXP_SWEPT", "SIMPO_EXP_SWEEP_DIR"  # its swept keys (JSON list), for its folder
SWEEP_MARK = "sweep"  # .hydra/sweep in a job's folder: the identity of the sweep command that last started it


def _keep_sweep_mark(out: Path) -> None:
    """Copy the job's sweep mark (``on_job_start`` wrote it) into .hydra/held/ beside its .hydra files, or say there
    is none: a job of another sweep refused here rewrites it before it is refused (``_put_back_sweep_mark``)."""
    if not (out / ".hydra").is_dir():  # hydra.output_subdir=null: no mark
        return
    mark, kept = out / ".hydra" / SWEEP_MARK, out / ".hydra" / HELD / SWEEP_MARK
    if mark.is_file():
        write_atomic(kept, mark.read_text())
    else:
        kept.unlink(missing_ok=True)


def _put_back_sweep_mark(out: Path) -> None:
    """The holder's sweep mark back (none where it ran no sweep); a holder of an older version left no held copy."""
    held, mark = out / ".hydra" / HELD, out / ".hydra" / SWEEP_MARK
    if not held.is_dir():
        return
    with contextlib.suppress(OSError):
        if (held / SWEEP_MARK).is_file():
            write_atomic(mark, (held / SWEEP_MARK).read_text())
        else:
            mark.unlink(missing_ok=True)


def refusal_record(e: Exception) -> str:
    """A sweep job's refusal, as its sweep's summary and compare read it, naming the sweep that ran the job: a second
    sweep started in the same folder writes refusals where the first one looks, and the first listed the second's
    refused jobs as its own failures."""
    record = {"error": str(e), "type": type(e).__name__}
    if os.environ.get(SWEEP_ENV):
        record["sweep"] = os.environ[SWEEP_ENV]
    return json.dumps(record, indent=2)


# this job's .hydra files (hydra_files) when it took its folder: {folder: {file name: text}}
_started_with: dict[str, dict[str, str]] = {}
HELD = "held"  # .hydra/held/: the .hydra files of the job that holds the folder, for one refused there to put back
IN_USE_REFUSED = ".in-use-refused-"  # beside a sweep job's folder: that job was refused, another held its folder


def hydra_files(cfg: DictConfig) -> dict[str, str]:
    """The .hydra files Hydra writes for this command (``run_job``: the job's config, the Hydra config, the
    overrides), made from memory: a second command started in the same folder at the same moment may have
    rewritten them on disk."""
    hydra = HydraConfig.get()
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra})),
        "overrides.yaml": OmegaConf.to_yaml(hydra.overrides.task),
    }


RAN_WITH = "ran_with"  # .hydra/ran_with/: the .hydra files of the command a run last trained under
_accepted: set[str] = set()  # the run folders whose start this process accepted (keep_run_config)


def _refused_before_its_start(out: Path, writes: Path) -> bool:
    """Whether the command failed before it took over the run in its folder (before ``keep_run_config``), where a
    run trained before: a finished one, or one with checkpoints to resume from."""
    if {str(out.resolve()), str(writes.resolve())} & _accepted:
        return False
    return any((f / FINISHED).exists() or checkpoint_dirs(f) for f in {out, writes})


def _take_records(out: Path) -> dict[str, bytes]:
    """Remove the outcome records an earlier command left in ``out``; return those that may be put back (a refusal is
    this command's to record again, or not)."""
    (out / REFUSED_FILE).unlink(missing_ok=True)
    taken = {}
    for name in ("error.json", STOPPED_FILE, *(f.name for f in out.glob(RANK_ERROR_GLOB))):
        try:
            taken[name] = (out / name).read_bytes()
            (out / name).unlink(missing_ok=True)
        except FileNotFoundError:
            continue
    return taken


def _put_back(out: Path, records: dict[str, bytes]) -> None:
    for name, data in records.items():
        (out / name).write_bytes(data)


def keep_run_config(run_dir: Path) -> None:
    """Copy the run's .hydra files aside once its start is accepted (``restore_run_config`` puts them back): as
    they were when this job took the folder, since a job refused there meanwhile had Hydra rewrite them."""
    _accepted.add(str(Path(run_dir).resolve()))
    src = Path(run_dir) / ".hydra"
    if not src.is_dir():
        return
    dst = src / RAN_WITH
    dst.mkdir(exist_ok=True)
    started = _started_with.get(str(Path(run_dir).resolve()), {})
    for f in src.glob("*.yaml"):
        if f.name in started:
            f.write_text(started[f.name])
        shutil.copy2(f, dst / f.name)


def restore_run_config(run_dir: Path, kept_in: str = RAN_WITH) -> None:
    """Put back the .hydra files of the command the run last trained under (``kept_in=HELD``: of the job working
    there now): Hydra rewrote them with a command that was then refused, and compare and evaluate read the run's
    config and overrides from them."""
    kept = Path(run_dir) / ".hydra" / kept_in
    started = _started_with.get(str(Path(run_dir).resolve())) if kept_in == RAN_WITH else None
    for f in kept.glob("*.yaml") if kept.is_dir() else ():
        text = f.read_text()
        write_atomic(kept.parent / f.name, text)  # a new time: the sweep's summary counts the job as run
        if started is not None:  # this job's own files from now on (written again as the job ends)
            started[f.name] = text


def _note_collective_timeout(e: Exception, cfg: DictConfig) -> None:
    """A process that waited for the others at a collective past the timeout (gloo's wording; NCCL's
    watchdog ends the process itself, with its own message): name the setting that bounds the wait."""
    if not (isinstance(e, RuntimeError) and "Timed out waiting" in str(e)):
        return
    seconds = OmegaConf.select(cfg, "hardware.collective_timeout", default=None, throw_on_missing=False)
    if seconds is not None:
        note = (
            f"hardware.collective_timeout={seconds} seconds passed while this process waited for the others "
            "(one may have stopped, or still be working alone: writing the model, preparing the data); "
            "raise it where such work takes longer"
        )
        if hasattr(e, "add_note"):  # shown under the traceback (Python 3.11+)
            e.add_note(note)
        else:
            print(f"error: {note}", file=sys.stderr)


def _is_user_error(e: Exception) -> bool:
    from simpo_exp.errors import UserError

    return isinstance(e, UserError)


class WritableFolder(Callback):
    """Refuse, by key, a run or sweep folder that cannot be made and written (``hydra.run.dir=`` under a file, or
    on a read-only disk): Hydra makes the folder before the stage's own check runs, and stopped with its traceback
    and exit status 1 instead of the message and status 2 every other bad value gets."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _writable_or_exit("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _writable_or_exit("hydra.sweep.dir", config.hydra.sweep.dir)


def _writable_or_exit(key: str, folder: str) -> None:
    try:
        probe_writable(Path(folder))
    except OSError as e:
        print(f"error: {key}={folder!r} is not a writable directory ({e.strerror or e})", file=sys.stderr)
        raise SystemExit(2) from e


def no_traceback_without_a_best_trial() -> None:
    """The Optuna sweeper asks its study for the best trial after the last one: when every trial failed, Optuna's
    ValueError ("No trials are completed yet") came out as a traceback through Hydra's and the plugin's frames,
    above the list of failed jobs. It is said in one line instead, and the command exits 1 (the failed jobs are
    listed at exit). Wraps the plugin's ``sweep`` once per process (the sweeper is set up after this is called)."""
    from hydra_plugins.hydra_optuna_sweeper import _impl

    sweep = _impl.OptunaSweeperImpl.sweep
    if getattr(sweep, "said_without_traceback", False):
        return

    def wrapped(self, arguments):
        try:
            return sweep(self, arguments)
        except ValueError as e:
            if "No trials are completed" not in str(e):
                raise
            print("error: every trial of the Optuna search failed: no best parameters to report", file=sys.stderr)
            raise SystemExit(1) from None

    wrapped.said_without_traceback = True
    _impl.OptunaSweeperImpl.sweep = wrapped


def write_sweep_request(config, sweep_dir: Path) -> None:
    """Hydra's basic sweeper writes the sweep's config to ``multirun.yaml`` before its first job, and the Optuna
    sweeper does not: compare then could not count the trials asked for (a search killed at trial 3 of 8 looked
    complete), and job folders were named and matched without the swept keys. Written here where the sweeper
    did not, as the basic one writes it."""
    if not isinstance(config, DictConfig):
        return
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    if not target or target.endswith("BasicSweeper"):
        return
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(config))
    except (OSError, ValueError) as e:  # the jobs' own checks name a folder that cannot be written
        log.warning("%s: the sweep's multirun.yaml cannot be written (%s)", sweep_dir, e)


def is_training(config) -> bool:
    """Whether a sweep's config is the training stage's: its primary config is ``config`` (the generate stage's
    schema extends the training one and has a ``method`` too; its successful jobs, with no finished.json, were
    listed as killed and the sweep exited 1)."""
    name = getattr(getattr(getattr(config, "hydra", None), "job", None), "config_name", None)
    return name == "config" if name else getattr(config, "method", None) is not None


def sweep_token() -> str:
    """The identity of this sweep command (``SWEEP_ENV``). The processes of one multi-process launch share it (its
    rendezvous: address, port and run id), each running the whole sweep: with one of its own each, the last to
    mark a job took it, and each process's summary counted a share of the jobs ("sweep finished: 1 jobs" twice
    for a sweep of 2)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and os.environ.get("MASTER_ADDR"):
        rendezvous = [os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")]
        return "launch:" + ":".join(rendezvous)
    return f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class SweepSummary(Callback):
    """At the end of a ``--multirun``, list this sweep's jobs that failed and why; exit 1 if any did.

    A sweep re-run into the same directory may run fewer or other jobs than the last one: only the job
    directories this run wrote (Hydra rewrites ``.hydra/overrides.yaml`` as each job starts, wherever the
    launcher runs it) count, so an earlier run's failure, fixed by another value, is not reported again.
    Files are told apart by their modification stamps before and after, not by clock, which may differ
    between a cluster's nodes. A sweeper that fails after its jobs (the Optuna sweeper when no trial succeeded
    asks for the best one) never reaches ``on_multirun_end``: the list is printed at exit then."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if isinstance(config, DictConfig) and "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_")):
            no_traceback_without_a_best_trial()
        self.sweep_dir, self.listed = Path(config.hydra.sweep.dir), False
        write_sweep_request(config, self.sweep_dir)
        self.rerun = rerun_command(config.hydra)
        self.training = is_training(config)  # compare reads training runs, and they alone write finished.json
        self.before = _job_stamps(self.sweep_dir) | _in_use_refusals(self.sweep_dir)
        # this command's identity, in its jobs' refusal records (refusal_record): the launchers' job processes inherit
        # the environment (joblib's workers, submitit's jobs), and jobs in this process read it here
        self.token = os.environ[SWEEP_ENV] = sweep_token()
        # and the keys it sweeps, which a job reads to find its folder: multirun.yaml is rewritten by a second sweep
        # started in the same folder
        if isinstance(config, DictConfig):
            _, parsed = parsed_request(OmegaConf.to_container(config.hydra, resolve=False))  # as multirun.yaml says
            os.environ[SWEPT_ENV] = json.dumps(sorted(swept_in(parsed)))
            os.environ[SWEEP_DIR_ENV] = os.path.abspath(self.sweep_dir)
        atexit.register(self._list_failed)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        """Mark the job's folder with this sweep's identity (``.hydra/sweep``): a second sweep started in the same
        folder (two default sweep folders made in one second share one) rewrites its jobs' files there, and the
        first listed those jobs' failures, stops and running jobs as its own."""
        if not isinstance(config, DictConfig):
            return
        token, subdir = os.environ.get(SWEEP_ENV), OmegaConf.select(config, "hydra.output_subdir")
        if not token or subdir is None or OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
            return
        with contextlib.suppress(OSError):
            write_atomic(Path(str(config.hydra.runtime.output_dir)) / str(subdir) / SWEEP_MARK, token)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self._list_failed():
            raise SystemExit(1)

    def _unfinished(self, jobs: list[Path], failures: set[Path]) -> list[Path]:
        """The training jobs started that neither finished nor recorded a failure or stop, each listed: a job killed
        outright (out of memory, kill -9, a lost node) writes nothing, and a launcher's error for it (submitit's
        ``UncompletedJobError``) ends the sweep's command while other jobs may still train."""
        if not getattr(self, "training", True):
            return []
        unfinished = [p for p in jobs if p not in failures and not _in_records(p, lambda d: (d / FINISHED).exists())]
        if unfinished:
            print(
                f"\nsweep ended with {len(unfinished)} of {len(jobs)} started jobs unfinished ({self.sweep_dir}):",
                file=sys.stderr,
            )
        for path in unfinished:
            how = (
                "killed without a record (out of memory, kill -9); it resumes from its newest checkpoint"
                if _in_records(path, ended_unrecorded)
                else "no record yet: still running, or on another machine"
            )
            print(f"  {self._job(path)}: {how}", file=sys.stderr)
        if unfinished:
            print(f"{self.rerun} to finish them: finished jobs are skipped", file=sys.stderr, flush=True)
        return unfinished

    def _list_failed(self) -> bool:
        """Print the jobs of this sweep that failed (or that all succeeded), once; whether any failed. A sweep run on
        several processes (``torchrun``/``accelerate launch ... --multirun``) prints one summary, the main
        process's; every process returns whether a job failed."""
        if getattr(self, "listed", True):
            return False
        self.listed = True
        if os.environ.get("RANK", "0") != "0":
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                return self._summarise()
        return self._summarise()

    def _summarise(self) -> bool:
        token = getattr(self, "token", None)
        started = [p for p, stamp in _job_stamps(self.sweep_dir).items() if self.before.get(p) != stamp]
        jobs = [p for p in started if _sweep_mark(p) in (None, token)]  # not another sweep's, in the same folder
        failed = [(p, record) for p in jobs if (record := _in_records(p, failure_record))]
        # refusals of this sweep's jobs: another sweep running in the same folder meanwhile writes its own here
        mine = lambda record: (record or {}).get("sweep") in (None, token)  # noqa: E731
        in_folder = [(p, read_json(p / REFUSED_FILE)) for p in jobs if (p / REFUSED_FILE).exists()]
        failed += [(p, record) for p, record in in_folder if mine(record)]
        # a job refused because another job held its folder: recorded beside the folder, which is the other job's
        held = [f for f, stamp in _in_use_refusals(self.sweep_dir).items() if self.before.get(f) != stamp]
        refused = {f.with_name(f.name.removeprefix(IN_USE_REFUSED).removesuffix(".json")): read_json(f) for f in held}
        refused = {job: record for job, record in refused.items() if mine(record)}
        failed += list(refused.items())
        jobs += [job for job in refused if job not in jobs]
        failures = {p for p, _ in failed}  # a process's failure the others took for a stop (the launcher's SIGTERM)
        stopped = [(p, record) for p in jobs if p not in failures and (record := _in_records(p, _stop_record))]
        if stopped:  # a stop signal ends the sweep at the job it reached: the jobs after it never ran
            path, record = stopped[-1]
            print(
                f"sweep stopped by {stopped_words(record)}, in job {self._job(path)} ({len(jobs)} jobs started in "
                f"{self.sweep_dir}); {self.rerun} to resume: finished jobs are skipped, the stopped one "
                "goes on (from its checkpoint, where it saved one)",
                file=sys.stderr,
                flush=True,
            )
        unfinished = self._unfinished(jobs, failures) if not stopped else []
        if not failed:
            if not stopped and not jobs:  # the sweep ended before its first job (a preset that does not compose)
                print(f"sweep ended before any job ran ({self.sweep_dir}): see the error above", file=sys.stderr)
            elif not stopped and not unfinished:
                print(f"sweep finished: {len(jobs)} jobs in {self.sweep_dir}", flush=True)
            return bool(unfinished)
        print(f"\nsweep finished: {len(failed)} of {len(jobs)} jobs FAILED ({self.sweep_dir})", file=sys.stderr)
        for path, err in failed:
            first_line = (err.get("error") or "").splitlines()[0] if err.get("error") else ""
            print(f"  {self._job(path)}: {err.get('type')}: {first_line}", file=sys.stderr)
        if getattr(self, "training", True):
            print(f"compare the rest with: python -m simpo_exp.compare {self.sweep_dir}", file=sys.stderr, flush=True)
        return True

    def _job(self, path: Path) -> str:
        """A job's folder as the sweep's summary names it: below the sweep's directory."""
        return str(path.relative_to(self.sweep_dir)) if path.is_relative_to(self.sweep_dir) else path.name


def _in_records(job: Path, read):
    """``read`` of the job's Hydra folder, else of the folder ``output_dir=`` moved its records to
    (``rundir.records_dir``), where it found nothing in the first."""
    return read(job) or (read(moved) if (moved := records_dir(job)) != job else None)


def _stop_record(folder: Path) -> dict | None:
    return (read_json(folder / STOPPED_FILE) or {"stopped": True}) if (folder / STOPPED_FILE).exists() else None


def _in_use_refusals(sweep_dir: Path) -> dict[Path, int]:
    """The records of the sweep's jobs refused because another job held their folder, with their stamps."""
    return {f: f.stat().st_mtime_ns for f in sweep_dir.glob(f"{IN_USE_REFUSED}*.json")}


JOB_DEPTH = 3  # hydra.sweep.subdir may nest a job's folder (beta${beta}/seed${seed}: two levels)


def _sweep_mark(job: Path) -> str | None:
    """The identity of the sweep command that last started the job in ``job`` (``SweepSummary.on_job_start``)."""
    try:
        return (job / ".hydra" / SWEEP_MARK).read_text().strip() or None
    except OSError:
        return None


def _job_stamps(sweep_dir: Path) -> dict[Path, int]:
    """The sweep's job directories, in job order (``10_...`` after ``2_...``), each with the modification stamp
    of the overrides file Hydra writes as the job starts (under ``hydra.output_subdir=null``, of the job's log),
    found up to ``JOB_DEPTH`` levels below the sweep's directory."""
    stamps: dict[Path, int] = {}
    for depth in range(1, JOB_DEPTH + 1):
        for folder in sweep_dir.glob("/".join(["*"] * depth)):
            if any(parent in stamps for parent in folder.parents):
                continue  # inside a job's folder (its checkpoints, model, ...)
            for marker in (folder / ".hydra" / "overrides.yaml", folder / "__main__.log"):
                if marker.is_file():
                    stamps[folder] = marker.stat().st_mtime_ns
                    break
    return dict(sorted(stamps.items(), key=lambda item: _job_order(item[0].relative_to(sweep_dir))))


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep directory, in job order, nested ones too (``_job_stamps``)."""
    return list(_job_stamps(Path(sweep_dir)))


def _job_order(rel: Path) -> tuple:
    return tuple((int(p.split("_", 1)[0]) if p.split("_", 1)[0].isdigit() else -1, p) for p in rel.parts)


class RankFormatter(logging.Formatter):
    """A handler's own format with ``[rank N]`` in front: every process of a run writes the one ``__main__.log``."""

    def __init__(self, inner: logging.Formatter, rank: str):
        super().__init__()
        self.inner, self.rank = inner, rank

    def format(self, record: logging.LogRecord) -> str:
        return f"[rank {self.rank}]" + self.inner.format(record)


def name_the_rank_in_logs() -> None:
    """On a process other than the main one, its log lines (the run's log file and its terminal) name its rank:
    each process logs into the same ``__main__.log``, and on 8 GPUs every line stood there 8 times, unnamed."""
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        return
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, RankFormatter):
            handler.setFormatter(RankFormatter(handler.formatter or logging.Formatter(), rank))


def export_launcher_distributed_env() -> None:
    """Inside a multi-task submitit (SLURM) job, export RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR
    and MASTER_PORT for torch.distributed; under torchrun or ``accelerate launch`` they are set already.

    A MASTER_ADDR or MASTER_PORT the user exported (SLURM templates often do) is kept: submitit's own ``export()``
    raises when any of them is set, which left every task a one-process job of its own. CUDA_VISIBLE_DEVICES, when
    it lists one device per task of the node, is narrowed to this task's entry; unset, it becomes LOCAL_RANK (as
    submitit does); otherwise it is left as is (accelerate takes device LOCAL_RANK modulo the visible count)."""
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    try:
        import submitit

        if submitit.JobEnvironment().num_tasks <= 1:
            return
        dist = submitit.helpers.TorchDistributedEnvironment()  # reads a MASTER_PORT already set
    except (ImportError, RuntimeError):  # not inside a submitit job after all
        return
    os.environ.setdefault("MASTER_ADDR", dist.master_addr)
    os.environ.setdefault("MASTER_PORT", str(dist.master_port))
    ranks = {"RANK": dist.rank, "WORLD_SIZE": dist.world_size, "LOCAL_RANK": dist.local_rank}
    ranks["LOCAL_WORLD_SIZE"] = dist.local_world_size
    os.environ.update({key: str(value) for key, value in ranks.items()})
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(dist.local_rank)
    elif len(entries := visible.split(",")) == dist.local_world_size:
        os.environ["CUDA_VISIBLE_DEVICES"] = entries[dist.local_rank]
