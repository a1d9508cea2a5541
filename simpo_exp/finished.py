"""A finished run is recognised: re-running its command (or its sweep) returns the recorded result.

The last thing a run writes, after its model and ``summary.json``, is ``finished.json`` holding the
config it ran with. The entry point looks for it before anything loads: when it is there, with the
summary and (if ``save_model``) the model, and the config matches (compared as a checkpoint's is,
``checkpoint.incompatible_keys``), the job is skipped and its recorded summary returned. So a sweep
re-run after a crash or a preemption trains only the jobs that had not finished; those resume from
their checkpoints. ``resume=false`` trains again from scratch.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from simpo_exp.rundir import RESUMABLE_CHANGES, read_json, read_json_value

log = logging.getLogger(__name__)

FINISHED = "finished.json"


def record(run_dir: Path, config_dict: dict) -> None:
    """Mark ``run_dir`` finished (main process, after the model and summary.json are written)."""
    path = Path(run_dir) / FINISHED
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": config_dict}, indent=2, default=str))
    tmp.replace(path)


def recorded_summary(cfg) -> dict | None:
    """The summary of the finished run of this config in ``cfg.output_dir``, or None when it has to
    train (not finished, or ``resume=false``). Says so when it skips; a finished run of another config there is
    refused (``OtherRunsDirectory``), as a checkpoint of one is."""
    from simpo_exp.tracking import HEADLINE_METRICS, config_to_dict, final_table

    run_dir = Path(cfg.output_dir)
    marker, summary_path = run_dir / FINISHED, run_dir / "summary.json"
    if not cfg.resume or not marker.is_file():
        return None
    saved = read_json(marker).get("config")
    if not isinstance(saved, dict):  # unreadable, or written by hand or another version: train (resuming from a
        return None  # checkpoint) and write it again
    # Imported here, not at the top: it loads torch, and the entry point imports this module before Hydra
    # has checked the overrides (a misspelled key is then reported in under a second).
    from simpo_exp.checkpoint import fingerprinted_sources, incompatible_keys

    # before what decides whether it trains: a finished run without model/ (save_model=false then, or moved away)
    # or summary.json, re-run under another config, started afresh and replaced the finished run's records
    diffs = incompatible_keys(
        saved, config_to_dict(cfg), what="finished with", fingerprinted=fingerprinted_sources(run_dir)
    )
    if diffs:  # trained again here, the finished run's model, summary and records would be replaced without a word
        from simpo_exp.errors import OtherRunsDirectory

        raise OtherRunsDirectory(
            f"{run_dir.resolve()} holds a finished run of a different config ({'; '.join(diffs)}). Use another run "
            "directory (hydra.run.dir; hydra.sweep.dir for a sweep), or resume=false to train this config here (the "
            "finished run's files are replaced)."
        )
    if not summary_path.is_file() or (cfg.save_model and not (run_dir / "model").is_dir()):
        return None  # the same config, its summary or model missing: trained (resumed where it saved) to write them
    summary = read_json_value(summary_path)
    if not isinstance(summary, dict):
        return None  # unreadable, or not a summary (a list): train (resuming from a checkpoint) and write it again
    changed = data_changed(run_dir, cfg)
    if changed:  # the same command on new data (the generate stage re-paired its output in place, say)
        from simpo_exp.errors import OtherRunsDirectory

        raise OtherRunsDirectory(
            f"{run_dir.resolve()} finished with this config on data that has changed since: {'; '.join(changed)}. "
            "resume=false trains it again on the data as it is now (the finished run's files are replaced), or use "
            "another run directory (hydra.run.dir)."
        )
    if os.environ.get("RANK", "0") != "0":  # the main process says it, once for the command
        return summary
    message = (
        f"{run_dir.resolve()}: already finished with this config; skipped (its summary.json is the "
        "result; resume=false trains it again)"
    )
    log.info(message)
    unapplied = not_applied(saved, config_to_dict(cfg))
    if unapplied:  # changes a resumed run takes; a finished one runs nothing, so they change nothing of its files
        log.warning(
            "%s: %s: a finished run writes nothing again, so its files stay as it wrote them; resume=false trains "
            "it again with them",
            run_dir.resolve(), "; ".join(unapplied),
        )  # fmt: skip
    from simpo_exp.runinfo import restore_run_config

    restore_run_config(run_dir)  # .hydra as the run ran (Hydra wrote this command's there): compare reads them
    keys = [k for k in HEADLINE_METRICS if k in summary]
    print(f"{message}\n{final_table(summary, keys)}", flush=True)
    return summary


def not_applied(saved: dict, now: dict) -> list[str]:
    """``key: finished with A, now B`` for each change a resumed run takes that a finished run cannot, since it runs
    nothing: ``rundir.RESUMABLE_CHANGES`` but where it runs, how it logs and whether it resumes, and how it runs
    (the hardware keys that do not change what trains, the attention kernel, the tokenising processes: a finished
    run re-run with hardware.mixed_precision=fp16 was skipped without a word of it)."""
    from simpo_exp.checkpoint import HOW_IT_RUNS, TRAINING_HARDWARE_KEYS

    kept = RESUMABLE_CHANGES - {"output_dir", "logger", "progress_bar", "resume"}
    changed = [(k, saved.get(k), now.get(k)) for k in sorted(kept) if saved.get(k) != now.get(k)]
    was, new = saved.get("hardware") or {}, now.get("hardware") or {}
    for key in sorted((set(was) | set(new)) - TRAINING_HARDWARE_KEYS - {"name"}):
        if was.get(key) != new.get(key):
            changed.append((f"hardware.{key}", was.get(key), new.get(key)))
    for dotted in sorted(HOW_IT_RUNS):
        section, key = dotted.split(".", 1)
        a, b = (saved.get(section) or {}).get(key), (now.get(section) or {}).get(key)
        changed += [(dotted, a, b)] if a != b else []
    return [f"{k}: finished with {a!r}, now {b!r}" for k, a, b in changed]


def data_changed(run_dir: Path, cfg) -> list[str]:
    """How the local data files differ from those the run in ``run_dir`` recorded (``sources.changes_since_record``); a
    warning where its record is too old to hold their fingerprints."""
    from simpo_exp.data.sources import changes_since_record, fingerprint
    from simpo_exp.rundir import recorded_sources

    now = {name: fingerprint(src) for name, src in cfg.dataset.sources.items()}
    return changes_since_record(recorded_sources(run_dir), now, run_dir)
