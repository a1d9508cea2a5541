"""The W&B path as W&B itself recorded it: a short OFFLINE run through the project, read back from
W&B's own run file (``<job>/wandb/offline-run-*/run-*.wandb``), not from a mock.

One one-job ``--multirun`` (so the run gets its sweep group) runs once for the module, with
``WANDB_MODE=offline``, a fake ``WANDB_API_KEY`` and an ``HF_TOKEN`` in its environment. The file
must hold the run's group, job type and name, the resolved config, every metric on the
``train/global_step`` axis, the summary keys the dashboard asks for, and neither secret.

wandb >= 0.2x writes the file from its Go core and no longer ships a Python reader
(``wandb.sdk.internal.datastore`` is gone), so :func:`read_wandb_log` below reads it.
"""

import json
import math
import os
import secrets
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from simpo_exp import compare, dashboard, runinfo
from simpo_exp.rundir import stopped_record
from simpo_exp.tracking import (
    CONDITIONAL_METRICS,
    ERROR_SUMMARY,
    SAMPLES_KEY,
    SECRET_NAMES,
    STEP_KEY,
    STOPPED_SUMMARY,
    Tracker,
    eval_keys,
    train_keys,
)
from tests.runs import run_module

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

SECRET_KEY = secrets.token_hex(20)  # 40 characters, like a real W&B key
SECRET_HF = "hf_" + secrets.token_hex(17)
WANDB_INTERNAL = {"_step", "_runtime", "_timestamp"}


# ----------------------------------------------------------------------------- W&B's run file
# The .wandb file is a LevelDB-style log (what wandb's old Python `datastore` wrote and its Go core
# still writes):
#   file header, 7 bytes:  b":W&B", magic 0xBEE1 (uint16 LE), version 0 (uint8)
#   then 32 KiB blocks (the file header counts towards the first) of chunks, each
#     crc32 (uint32 LE) of (type byte + data) | length (uint16 LE) | type (uint8) | data
#   type FULL=1 is a whole record; FIRST=2, MIDDLE=3, LAST=4 are the pieces of one that spans
#   blocks. A block's tail shorter than a chunk header (7 bytes) is zero padding.
# Each assembled record is a serialized `wandb.proto.wandb_internal_pb2.Record`.
LOG_HEADER = struct.Struct("<4sHB")
LOG_IDENT, LOG_MAGIC, LOG_VERSION = b":W&B", 0xBEE1, 0
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_log(path: Path) -> list:
    """Every record of a .wandb file, in order; raises on a bad header, checksum or chunk sequence."""
    data = path.read_bytes()
    ident, magic, version = LOG_HEADER.unpack_from(data, 0)
    assert (ident, magic, version) == (LOG_IDENT, LOG_MAGIC, LOG_VERSION), (ident, hex(magic), version)
    records, pieces, pos = [], None, LOG_HEADER.size
    while pos < len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER.size:  # padding at the end of a block
            pos += left_in_block
            continue
        if pos + CHUNK_HEADER.size > len(data):
            break  # a header cut off by the end of the file (a run still being written)
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero-filled rest of a block
            pos += left_in_block
            continue
        chunk = data[pos + CHUNK_HEADER.size : pos + CHUNK_HEADER.size + length]
        assert len(chunk) == length, f"chunk at {pos} cut off"
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad checksum at {pos}"
        pos += CHUNK_HEADER.size + length
        if kind == FULL:
            assert pieces is None, f"FULL inside a split record at {pos}"
            records.append(chunk)
        elif kind == FIRST:
            assert pieces is None, f"FIRST inside a split record at {pos}"
            pieces = [chunk]
        elif kind in (MIDDLE, LAST):
            assert pieces is not None, f"{kind} without FIRST at {pos}"
            pieces.append(chunk)
            if kind == LAST:
                records.append(b"".join(pieces))
                pieces = None
        else:
            raise AssertionError(f"unknown chunk type {kind} at {pos}")
    out = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        out.append(record)
    return out


def read_ended_wandb_log(path: Path, wait: float = 60) -> list:
    """The records of the .wandb file of a run ended in this process, once W&B's core has written them: ``finish``
    returns before the file holds the run's exit record."""
    deadline = time.monotonic() + wait
    while True:
        try:
            records = read_wandb_log(path)
        except AssertionError:  # a chunk still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {wait} s"
        time.sleep(0.2)


def _path(item) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def _set(d: dict, path: list[str], value) -> None:
    for part in path[:-1]:
        d = d.setdefault(part, {})
    d[path[-1]] = value


def fold(records) -> SimpleNamespace:
    """What W&B knows of the run at the end: run record, config, summary, history rows, metric definitions."""
    run, config, summary, history, metrics, kinds = None, {}, {}, [], [], []
    for r in records:
        kind = r.WhichOneof("record_type")
        kinds.append(kind)
        if kind == "run":
            run = r.run
            for item in r.run.config.update:
                _set(config, _path(item), json.loads(item.value_json))
        elif kind == "config":
            for item in r.config.update:
                _set(config, _path(item), json.loads(item.value_json))
        elif kind == "summary":
            for item in r.summary.update:
                _set(summary, _path(item), json.loads(item.value_json))
            for item in r.summary.remove:
                summary.pop(_path(item)[0], None)
        elif kind == "history":
            row = {}
            for item in r.history.item:
                _set(row, _path(item), json.loads(item.value_json))
            history.append(row)
        elif kind == "metric":
            metrics.append(r.metric)
    return SimpleNamespace(run=run, config=config, summary=summary, history=history, metrics=metrics, kinds=kinds)


# ----------------------------------------------------------------------------- one offline run
@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wandb_offline")
    sweep = root / "2030-02-02_00-00-00"
    # run_module's environment: WANDB_MODE=offline (which wins over the key: see
    # test_wandb_mode_offline_wins_over_an_api_key below), W&B silent, the hub offline; the two secrets are read when
    # the run starts, so the run is forked from the test server with them set. logger.mode=offline says the same
    # from the config side.
    env = {"WANDB_API_KEY": SECRET_KEY, "HF_TOKEN": SECRET_HF}
    args = [
        "--multirun",
        "beta=5",
        "gamma_beta_ratio=0.3",
        "max_steps=3",
        "eval_steps=0",
        "logging_steps=1",
        "logger=wandb",
        "logger.mode=offline",
        "save_model=false",
        "dataset.synthetic.num_train=128",
        "dataset.synthetic.num_test=32",
        f"hydra.sweep.dir={sweep}",
    ]
    res = run_module("simpo_exp", *args, cwd=root, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "W&B start failed" not in res.stderr and "W&B log failed" not in res.stderr, res.stderr[-3000:]
    (job_dir,) = [p for p in sweep.iterdir() if p.is_dir()]
    return job_dir


@pytest.fixture(scope="module")
def run_file(job) -> Path:
    assert not list((job / "wandb").glob("run-*")), "an online run directory: W&B did not stay offline"
    (path,) = (job / "wandb").glob("offline-run-*/run-*.wandb")
    return path


@pytest.fixture(scope="module")
def wb(run_file) -> SimpleNamespace:
    return fold(read_wandb_log(run_file))


def jsonl(job: Path) -> list[dict]:
    return [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]


def test_the_file_is_a_complete_wandb_log(wb):
    assert wb.kinds[0] == "header" and wb.kinds.count("run") == 1
    assert "exit" in wb.kinds  # the run was finished, not cut off
    kinds = {f.name for f in pb.Record.DESCRIPTOR.oneofs_by_name["record_type"].fields}
    assert {"run", "config", "history", "summary", "metric", "exit"} <= kinds  # what fold() reads


def test_reader_reassembles_records_that_span_blocks(tmp_path):
    """A record bigger than a 32 KiB block (here a 100 kB config value), as W&B itself splits it."""
    code = (
        f"import wandb; r = wandb.init(mode='offline', dir={str(tmp_path)!r}, project='p', "
        "config={'blob': 'ab' * 50000}, settings=wandb.Settings(console='off', x_disable_stats=True)); "
        "r.log({'x': 1}); r.finish()"
    )
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert path.stat().st_size > 3 * BLOCK
    wb = fold(read_wandb_log(path))
    assert wb.config["blob"] == "ab" * 50000
    assert wb.history[0]["x"] == 1 and "exit" in wb.kinds


def test_group_job_type_and_name(job, wb):
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    assert wb.run.run_group == runinfo.sweep_group(str(job.parent))  # runinfo.fill_run_identity's sweep group
    assert wb.run.job_type == "train"
    assert wb.run.display_name == runinfo.run_name(overrides, 0.0)
    assert wb.run.display_name.startswith("beta=5,gamma_beta_ratio=0.3,")
    assert wb.run.project == "simpo-exp"
    assert {"model:tiny", "dataset:synthetic", "hparams:default"} <= set(wb.run.tags)


def test_config_is_the_resolved_config(job, wb):
    c = wb.config
    assert c["beta"] == 5.0 and c["gamma_beta_ratio"] == 0.3 and c["max_steps"] == 3
    assert c["resolved"]["gamma_beta_ratio"] == 0.3 and c["resolved"]["gamma"] == pytest.approx(1.5)
    assert c["resolved"]["learning_rate"] == c["model"]["learning_rate"] == 0.001  # the tiny preset's
    assert c["dataset"]["synthetic"]["num_train"] == 128
    assert c["output_dir"] == str(job)  # resolved, not "${hydra:runtime.output_dir}"
    assert c["logger"]["group"] == wb.run.run_group and c["logger"]["run_name"] == wb.run.display_name
    composed = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
    for key, value in composed.items():
        if not isinstance(value, (dict, list)) and "${" not in str(value):
            assert c[key] == value, key

    def secret_keys(node, where=""):
        if isinstance(node, dict):
            for k, v in node.items():
                name = str(k).lower()
                if any(name == s or name.endswith("_" + s) for s in SECRET_NAMES):
                    yield where + k
                yield from secret_keys(v, f"{where}{k}.")

    assert list(secret_keys(c)) == []


def test_metrics_on_the_global_step_axis(job, wb):
    star = [m for m in wb.metrics if m.glob_name == "*"]
    assert star and star[0].step_metric == STEP_KEY
    assert STEP_KEY in {m.name for m in wb.metrics}
    # a metric defined by name (for its max) is on the same axis: its own definition replaces the glob's
    named = {m.name: m for m in wb.metrics if m.name}
    assert named["eval/rewards/accuracies"].step_metric == STEP_KEY
    assert named[SAMPLES_KEY].step_metric == ""  # an axis of its own, not a metric on the step's
    # W&B keeps its best (max) and last as the run goes: what a running, stopped or crashed run's summary shows (a
    # finished run's is set again from the whole metrics.jsonl)
    summary = named["eval/rewards/accuracies"].summary
    assert (summary.max, summary.last, summary.min) == (True, True, False)
    logged = jsonl(job)
    tables = [row for row in wb.history if "eval/generations" in row]  # sample generations, one table an eval
    history = [row for row in wb.history if "eval/generations" not in row]
    assert [row[STEP_KEY] for row in tables] == [0, 3]
    assert len(history) == len(logged)
    for row, record in zip(history, logged):
        assert row[STEP_KEY] == record["step"]
        assert set(row) - WANDB_INTERNAL - {STEP_KEY} == set(record) - {"step"}
        for key, value in record.items():
            if key != "step":
                assert row[key] == pytest.approx(value), key
    keys = {k for row in history for k in row} - WANDB_INTERNAL
    assert keys == set(train_keys() + eval_keys()) - set(CONDITIONAL_METRICS) | {STEP_KEY, SAMPLES_KEY}
    assert [row[STEP_KEY] for row in history] == [0, 1, 2, 3, 3]  # eval at start, train 1-3, final eval


def test_summary_and_group_are_what_the_dashboard_asks_for(job, wb):
    pytest.importorskip("wandb_workspaces")
    spec = dashboard.view_spec(dashboard.build_workspace(dashboard.read_sweep(job.parent), None, "simpo-exp"))
    asked = dashboard.spec_keys(spec)
    assert asked["groups"] == {wb.run.run_group}
    assert asked["grouping"] == set()  # one job: nothing to group; its overrides are table columns
    assert {"beta.value", "gamma_beta_ratio.value"} <= asked["config"]
    for key in asked["summary"]:  # "eval/rewards/accuracies.max" is summary["eval/rewards/accuracies"]["max"]
        base, _, agg = key.rpartition(".") if key not in wb.summary else (key, "", "")
        assert base in wb.summary, (key, sorted(wb.summary))
        value = wb.summary[base][agg] if agg else wb.summary[base]
        assert isinstance(value, (int, float)), (key, value)
    evals = [r[dashboard.TARGET] for r in jsonl(job) if dashboard.TARGET in r]
    assert wb.summary[dashboard.TARGET] == {"max": pytest.approx(max(evals)), "last": pytest.approx(evals[-1])}
    for key in asked["config"]:  # "beta.value" is config["beta"]
        node = wb.config
        for part in key.replace(".value", "", 1).split("."):
            node = node[part]
        assert not isinstance(node, dict), key


def test_no_secret_is_written(job, run_file):
    assert os.environ.get("WANDB_API_KEY") != SECRET_KEY  # only the run's process had them
    blob = run_file.read_bytes()
    for secret in (SECRET_KEY, SECRET_HF):
        assert secret.encode() not in blob
        for path in job.rglob("*"):  # nor in W&B's logs, the configs, metrics, summaries
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    assert not [p for p in job.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]  # only safetensors weights


def _logger_cfg(group):
    return SimpleNamespace(
        wandb=True,
        mode="auto",
        project="p",
        entity=None,
        group=group,
        job_type="train",
        run_name="r",
        tags=[],
        init_timeout=1.0,
    )


def test_wandb_mode_offline_wins_over_an_api_key(tmp_path, monkeypatch):
    import wandb

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", fake_init)
    lc = _logger_cfg(group=None)
    with pytest.warns(UserWarning, match="stop here"):
        Tracker(tmp_path, lc, {})
    assert seen["mode"] == "offline"


def test_an_empty_wandb_mode_or_a_long_tag_keeps_the_wandb_run(tmp_path, monkeypatch):
    """WANDB_MODE set but empty (``WANDB_MODE=`` in a job script), or a tag past W&B's 64 characters (a long preset
    name): wandb.init refused either, and the run went on without W&B. Now it is an offline run, its tag cut."""
    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    lc = _logger_cfg(group=None)
    lc.tags = ["experiment=" + "x" * 70, "short", "", "short", "experiment=" + "x" * 80]  # (W&B refuses an empty one)
    tracker = Tracker(tmp_path, lc, {})
    try:
        assert tracker.wandb_run is not None
        assert list(tracker.wandb_run.tags) == ["experiment=" + "x" * 53, "short"]
        assert json.loads((tmp_path / "wandb_run.json").read_text())["mode"] == "offline"
    finally:
        tracker.finish({})


def test_a_misspelt_wandb_mode_is_named_and_the_run_logs_offline(tmp_path, monkeypatch):
    """``WANDB_MODE=onlin``: wandb.Settings refused it with a pydantic dump that never named WANDB_MODE (printed
    twice), and the run went on without W&B. Now the variable is named, set aside, and the run logs offline."""
    monkeypatch.setenv("WANDB_MODE", "onlin")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.warns(UserWarning, match=r"WANDB_MODE='onlin' is not a W&B mode \(online, offline, disabled, "):
        tracker = Tracker(tmp_path, _logger_cfg(group=None), {})
    try:
        assert tracker.wandb_run is not None
        assert json.loads((tmp_path / "wandb_run.json").read_text())["mode"] == "offline"
    finally:
        tracker.finish({})


def test_an_online_start_that_fails_logs_offline_instead(tmp_path, monkeypatch):
    """With a key but no server (a cluster node without outbound network, a wrong key), the run trained without any
    W&B record, and its resume started another W&B id: now it keeps an offline record of the same run."""
    import wandb

    modes = []
    real_init = wandb.init

    def init(**kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise ConnectionError("no route to api.wandb.ai")
        return real_init(**kwargs)

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "init", init)
    with pytest.warns(UserWarning, match="logging offline instead: send it later with `wandb sync .*offline-run-"):
        tracker = Tracker(tmp_path, _logger_cfg(group=None), {})
    try:
        assert modes == ["online", "offline"] and tracker.wandb_run is not None
        record = json.loads((tmp_path / "wandb_run.json").read_text())
        assert record["mode"] == "offline" and record["id"] == tracker.wandb_run.id
        assert list((tmp_path / "wandb").glob("offline-run-*"))
    finally:
        tracker.finish({})


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """The second start of a run (a resume) asks W&B for the run id the first start recorded."""
    import wandb

    calls = []

    class FakeRun:
        def __init__(self, **kwargs):
            self.id, self.project, self.entity = kwargs.get("id", "first-id"), kwargs["project"], None
            self.group, self.name = kwargs["group"], kwargs["name"]

        def define_metric(self, *args, **kwargs):
            pass

    def fake_init(**kwargs):
        calls.append(kwargs)
        return FakeRun(**kwargs)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", fake_init)
    lc = _logger_cfg(group="g")
    Tracker(tmp_path, lc, {})
    assert "id" not in calls[0]
    assert json.loads((tmp_path / "wandb_run.json").read_text())["id"] == "first-id"
    Tracker(tmp_path, lc, {})
    assert calls[1]["id"] == "first-id" and calls[1]["resume"] == "allow"
    (tmp_path / "wandb_run.json").write_text("{not json")  # a damaged record starts a new W&B run
    Tracker(tmp_path, lc, {})
    assert "id" not in calls[2]


def test_steps_wandb_holds_from_a_start_that_ended_past_its_checkpoint_are_not_sent_again(tmp_path, monkeypatch):
    """A start killed after its step-2 checkpoint had logged steps 3 and 4: the resume cut them from metrics.jsonl
    and logged them again, but W&B's history cannot be cut, so its charts drew steps 3 and 4 twice, the line doubling
    back (compare kept the last row a step; the W&B UI and the dashboard's views showed both). W&B keeps the first
    start's rows (an exact resume logs the same values); metrics.jsonl gets the resumed ones."""
    import wandb

    from simpo_exp import checkpoint
    from simpo_exp.tracking import wandb_holds_through

    sent = []

    class FakeRun:
        id, project, entity, group, name = "first-id", "p", None, None, "n"

        def __init__(self, **kwargs):
            pass

        def define_metric(self, *args, **kwargs):
            pass

        def log(self, row):
            sent.append((row[STEP_KEY], sorted(k for k in row if k != STEP_KEY)))

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", lambda **kwargs: FakeRun(**kwargs))
    monkeypatch.setattr(wandb, "Table", lambda **kwargs: "table")
    first = Tracker(tmp_path, _logger_cfg(group=None), {})
    for step in (1, 2, 3, 4):
        first.log({"train/loss": 1.0 / step}, step)
    assert [s for s, _ in sent] == [1, 2, 3, 4]
    # the resume from step 2's checkpoint (train.start_or_resume)
    cut = checkpoint.trim_metrics(tmp_path / "metrics.jsonl", 2)
    assert cut == 4 and checkpoint.trim_metrics(tmp_path / "metrics.jsonl", 2) is None  # nothing more to cut
    wandb_holds_through(tmp_path, cut)
    sent.clear()
    again = Tracker(tmp_path, _logger_cfg(group=None), {})
    for step in (3, 4, 5):
        again.log({"train/loss": 1.0 / step}, step)
    again.log_generations([{"step": 4, "prompt": "p", "response": "r"}], 4)
    again.log_generations([{"step": 5, "prompt": "p", "response": "r"}], 5)
    assert sent == [(5, ["train/loss"]), (5, ["eval/generations"])]
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]  # the resumed start's rows, each step once
    record = json.loads((tmp_path / "wandb_run.json").read_text())
    assert record["id"] == "first-id" and record["logged_through"] == 4  # kept by the second start's record
    wandb_holds_through(tmp_path, 3)  # a later start cut back to 3 after dying at step 3: W&B still holds 4
    assert json.loads((tmp_path / "wandb_run.json").read_text())["logged_through"] == 4


def test_a_failed_run_closes_its_wandb_run_as_failed(tmp_path):
    """A run that stops with an error (here every step diverges) ends its W&B run with a non-zero exit code,
    so a synced failed run does not show as finished."""
    run_dir = tmp_path / "run"
    args = ["learning_rate=1e30", "max_bad_steps=1", "max_steps=6", "eval_on_start=false", "num_generations=0"]
    args += ["logger=wandb", "save_model=false", "dataset.synthetic.num_train=64", "dataset.synthetic.num_test=32"]
    res = run_module("simpo_exp", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 2 and "NonFiniteError" in (run_dir / "error.json").read_text(), res.stderr[-3000:]
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    exits = [r.exit.exit_code for r in read_wandb_log(path) if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]
    # the error in the summary, as compare names it from error.json: its W&B path tells a diverged seed by it
    assert fold(read_wandb_log(path)).summary["error"].startswith("NonFiniteError: ")


def test_a_run_that_exits_with_status_0_from_inside_the_tracker_is_not_closed_as_finished(tmp_path, monkeypatch):
    """A SystemExit(0) raised inside the run (another stop handler's exit, chained by the signal handler) left its
    code to W&B, which closed the stopped run as finished."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = Tracker(tmp_path, _logger_cfg(group=None), {})
    tracker.log({"train/loss": 0.5}, 1)
    with pytest.raises(SystemExit), tracker:
        raise SystemExit(0)
    (path,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    # read once W&B's core has written the exit record: finish returns before it (read at once, it was not there)
    records = read_ended_wandb_log(path)
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [1]
    assert "error" not in fold(records).summary  # an exit is no error of the run's (a stop has its own record)
    from simpo_exp.tracking import error_words

    assert error_words(ValueError("first\nsecond")) == "ValueError: first" and error_words(RuntimeError()) == (
        "RuntimeError: "
    )


def test_ctrl_c_in_a_run_is_no_error_in_its_wandb_summary(tmp_path, monkeypatch):
    """A KeyboardInterrupt that reaches the tracker (Ctrl-C outside the steps) is a stop, not a failure: no error
    in the summary, which compare would read as the run's failure."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = Tracker(tmp_path, _logger_cfg(group=None), {})
    with pytest.raises(KeyboardInterrupt), tracker:
        raise KeyboardInterrupt()
    (path,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert "error" not in fold(read_ended_wandb_log(path)).summary


def test_a_generations_table_that_fails_leaves_the_metrics_on_wandb(tmp_path, monkeypatch):
    """A table is staged as a file (an unwritable WANDB_DATA_DIR): its failure dropped the W&B run, which then held
    only step 0's evaluation and was closed at exit as finished. The metrics go on; the tables stop, said once."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = Tracker(tmp_path, _logger_cfg(group=None), {})
    monkeypatch.setattr(wandb, "Table", lambda **kw: (_ for _ in ()).throw(PermissionError("staging")))
    tracker.log_generations([{"step": 0, "prompt": "p", "response": "r"}], 0)
    tracker.log_generations([{"step": 1, "prompt": "p", "response": "r"}], 1)
    assert tracker.wandb_run is not None and len((tmp_path / "generations.jsonl").read_text().splitlines()) == 2
    tracker.log({"train/loss": 0.5}, 1)
    tracker.finish({"train/loss": 0.5})
    (path,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert fold(read_ended_wandb_log(path)).summary["train/loss"] == 0.5


def test_a_disabled_wandb_run_leaves_no_record(tmp_path, monkeypatch):
    """WANDB_MODE=disabled gives a stand-in run (entity "dummy"): its record made the run's evaluation log to it."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker(tmp_path, _logger_cfg(group=None), {})
    tracker.finish({"train/loss": 0.5})
    assert not (tmp_path / "wandb_run.json").exists() and (tmp_path / "summary.json").exists()


def test_a_stopped_run_tells_wandb_and_its_resume_takes_it_back(tmp_path, monkeypatch):
    """W&B shows a run left at a stop signal as failed (it exits with 128 + the signal's number). Its summary's
    ``stopped`` tells compare (and the notebook's W&B path) it is resumable; the run's next start removes it."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    lc = _logger_cfg(group="g")
    with pytest.raises(SystemExit), Tracker(tmp_path, lc, {}) as tracker:
        tracker.mark_stopped(stopped_record(15, 40))
        raise SystemExit(143)
    assert json.loads((tmp_path / "stopped.json").read_text()) == {"signal": "SIGTERM", "step": 40}
    (first,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_ended_wandb_log(first)
    stopped = fold(records)
    assert stopped.summary[STOPPED_SUMMARY] == "SIGTERM after step 40, checkpoint saved"
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [143]
    assert compare.wandb_status("failed", stopped.summary) == "stopped"
    assert compare.wandb_status("failed", {}) == "failed"

    Tracker(tmp_path, lc, {}).finish({"train/loss": 0.5})  # the resumed run, to its end
    (second,) = set((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")) - {first}
    records = read_ended_wandb_log(second)
    resumed = fold(records)
    assert resumed.run.run_id == stopped.run.run_id
    removed = [_path(item) for r in records if r.WhichOneof("record_type") == "summary" for item in r.summary.remove]
    # a stop or an error recorded by the last start (a failed run resumed after its cause was fixed) no longer holds
    assert removed == [[STOPPED_SUMMARY], [ERROR_SUMMARY]] and STOPPED_SUMMARY not in resumed.summary
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]


def test_a_resumed_runs_wandb_summary_holds_the_best_and_last_accuracy_of_the_whole_run(tmp_path, monkeypatch):
    """W&B's ``max,last`` summary of the held-out accuracy is worked out by each start of a run from what that start
    logs (and online, after a resume, the logged values no longer update it at all: wandb/wandb#9684), so a run
    resumed after a stop reported the best accuracy of its last start. The dashboard's table and parallel
    coordinates read this summary; finish() now sets it from the whole run's metrics.jsonl."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    lc = _logger_cfg(group="g")
    with pytest.raises(SystemExit), Tracker(tmp_path, lc, {}) as tracker:
        tracker.log({dashboard.TARGET: 0.9}, 10)
        tracker.log({dashboard.TARGET: 0.5}, 20)
        raise SystemExit(143)
    (first,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    tracker = Tracker(tmp_path, lc, {})  # the resumed run, to its end
    tracker.log({dashboard.TARGET: float("nan")}, 30)  # metrics.jsonl's null: not the best
    tracker.log({dashboard.TARGET: 0.6}, 40)
    tracker.finish({"train/loss": 0.5})
    (second,) = set((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")) - {first}
    resumed = fold(read_ended_wandb_log(second))
    assert resumed.summary[dashboard.TARGET] == {"max": pytest.approx(0.9), "last": pytest.approx(0.6)}


def test_the_runs_figures_no_step_logged_reach_the_wandb_summary(tmp_path):
    """finish() added to the W&B summary only keys outside train/ and eval/, taking those for logged metrics: the
    compile warm-up's train/compile_* (in summary.json, read by compare) never reached W&B. Now every key no step
    logged is added; logged ones keep the summaries W&B works out, but the held-out accuracy's."""
    tracker = Tracker(tmp_path, SimpleNamespace(wandb=False), {})
    fake = SimpleNamespace(summary={}, log=lambda metrics: None, finish=lambda: None)
    tracker.wandb_run = fake
    tracker.log({"train/loss": 0.5, "eval/rewards/accuracies": 0.75}, 3)
    figures = {"train/loss": 0.5, "eval/rewards/accuracies": 0.75, "train/compile_warmup_s": 2.5, "runtime_s": 9}
    tracker.finish(figures | {"note": "x", "hardware": {"gpu": "y"}})  # (text and groups are no figures)
    best_and_last = {dashboard.TARGET: {"max": 0.75, "last": 0.75}}  # from metrics.jsonl (the resume test above)
    assert fake.summary == {"train/compile_warmup_s": 2.5, "runtime_s": 9} | best_and_last


def test_the_best_held_out_accuracy_skips_nans_and_the_last_is_the_last_logged(tmp_path):
    """A NaN first eval made W&B's best NaN; a diverged last eval is the run's last value (NaN), not the one before."""
    tracker = Tracker(tmp_path, SimpleNamespace(wandb=False), {})
    finished = []
    tracker.wandb_run = SimpleNamespace(summary={}, log=lambda metrics: None, finish=lambda: finished.append(1))
    for step, acc in enumerate([float("nan"), 0.5, 0.7, float("nan")]):
        tracker.log({dashboard.TARGET: acc}, step)
    summary = tracker.wandb_run.summary
    tracker.finish({})
    best = summary[dashboard.TARGET]
    assert best["max"] == 0.7 and math.isnan(best["last"]) and finished == [1]


def test_a_run_whose_held_out_accuracy_was_never_a_number_still_closes_its_wandb_run(tmp_path, recwarn):
    tracker = Tracker(tmp_path, SimpleNamespace(wandb=False), {})
    finished = []
    tracker.wandb_run = SimpleNamespace(summary={}, log=lambda metrics: None, finish=lambda: finished.append(1))
    tracker.log({dashboard.TARGET: float("nan")}, 1)
    summary = tracker.wandb_run.summary
    tracker.finish({})
    assert finished == [1] and dashboard.TARGET not in summary
    assert not [w for w in recwarn if "W&B" in str(w.message)]


def test_infinities_keep_their_sign_in_metrics_jsonl(tmp_path):
    import json

    from simpo_exp.tracking import logged_value

    tracker = Tracker(tmp_path, SimpleNamespace(wandb=False), {})
    tracker.log({"train/logps/rejected": float("-inf"), "train/grad_norm": float("inf"), "train/loss": float("nan")}, 1)
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged_value(record["train/logps/rejected"]) == float("-inf")
    assert logged_value(record["train/grad_norm"]) == float("inf") and math.isnan(logged_value(record["train/loss"]))


def test_a_written_record_keeps_its_counts_named_token_and_drops_the_credentials(tmp_path):
    """A ``*_token`` key holding text is a credential and is dropped; the data report's counts of that shape (numbers)
    are what the tokenisation report is read for, and stay."""
    import json

    report = {
        "tokenization": {"train": {"pairs": 8, "responses_without_end_token": 3, "prompts_split_inside_a_token": 2}},
        "hf_token": SECRET_HF,
        "token": SECRET_KEY,
        "judge": {"openai_api_key": SECRET_KEY, "client_secret": 7, "db_password": "pw"},
        "endpoints": [{"url": "http://127.0.0.1:9", "hf_token": SECRET_HF}],  # in a list too
    }
    tracker = Tracker(tmp_path, SimpleNamespace(wandb=False), {})
    written = json.loads(tracker.write_json("data_report.json", report).read_text())
    assert written == {
        "tokenization": report["tokenization"],
        "judge": {},
        "endpoints": [{"url": "http://127.0.0.1:9"}],
    }


def test_online_without_a_key_logs_offline_without_asking_for_one(tmp_path, monkeypatch):
    """``logger.mode=online`` (or WANDB_MODE=online) with no key: at a terminal wandb asked for one and the run waited
    there (``init_timeout`` does not bound the prompt); now it logs offline and says how to send it later."""
    import wandb

    modes = []
    real_init = wandb.init

    def init(**kwargs):
        modes.append(kwargs["mode"])
        return real_init(**kwargs)

    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setattr(wandb, "init", init)
    cfg = _logger_cfg(group=None)
    cfg.mode = "online"
    with pytest.warns(UserWarning, match="no API key found .*logging offline instead"):
        tracker = Tracker(tmp_path / "a", cfg, {})
    tracker.finish({})
    monkeypatch.setenv("WANDB_MODE", "online")
    cfg.mode = "auto"
    with pytest.warns(UserWarning, match="no API key found"):
        tracker = Tracker(tmp_path / "b", cfg, {})
    tracker.finish({})
    assert modes == ["offline", "offline"]
    assert json.loads((tmp_path / "b" / "wandb_run.json").read_text())["mode"] == "offline"


def test_a_key_wandb_login_stored_counts_as_a_key(tmp_path, monkeypatch):
    """``logger.mode=auto`` went online only with WANDB_API_KEY: after ``wandb login`` (the key in ~/.netrc) every
    run logged offline, the dashboard was never saved and an online run's evaluation went offline."""
    from simpo_exp.evaluate.wandb_log import wandb_mode
    from simpo_exp.tracking import wandb_key_given

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not wandb_key_given() and not dashboard._online() and wandb_mode("online") == "offline"  # no file
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {SECRET_KEY}\n")
    netrc.chmod(0o600)
    # a key an earlier `wandb login` stored for api.wandb.ai: wandb 0.31 (default server api.forge.coreweave.com)
    # reads it as the key of the server behind its forge host; counted as none, every run logged offline
    assert wandb_key_given() and dashboard._online()
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.qa.forge.coreweave.com")  # a forge host before another server
    assert not wandb_key_given()
    monkeypatch.delenv("WANDB_BASE_URL")
    # where wandb login stores it (the installed wandb's default server: 0.31's is not api.wandb.ai)
    wandb = pytest.importorskip("wandb")
    wandb.login(key=SECRET_KEY, verify=False)
    assert wandb_key_given() and dashboard._online() and wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # a server of its own: no key for it there
    assert not wandb_key_given()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_key_given()


def test_the_project_is_wandb_projects_where_the_logger_names_none(monkeypatch):
    """``WANDB_PROJECT`` (W&B's own variable) was read by the dashboard and the notebook but not by training, which
    passed its default project explicitly: the saved view and the notebook looked for the runs in another project."""
    from simpo_exp.tracking import wandb_project

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert wandb_project(None) == "simpo-exp"
    monkeypatch.setenv("WANDB_PROJECT", "my-proj")
    assert wandb_project(None) == "my-proj" and wandb_project("given") == "given"


def test_the_command_line_is_not_in_the_wandb_record(tmp_path, monkeypatch):
    """wandb records ``sys.argv`` in a run's metadata, past the config's credential scrub: a key typed on the command
    line (a judge key given where its variable's name goes, a URL with a password) went up with ``wandb sync``."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(sys, "argv", ["simpo_exp", "judge.api_key_env=sk-ZZSECRETTYPED"])
    tracker = Tracker(tmp_path, _logger_cfg(group=None), {})
    tracker.log({"train/loss": 1.0}, 1)
    tracker.finish({})
    (record,) = list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    assert b"ZZSECRETTYPED" not in record.read_bytes()


class _FakeRun:
    """A W&B run that records what it is given, and raises from ``fail`` (a method's name) when asked."""

    def __init__(self, fail: str = ""):
        self.logged, self.finished, self.fail = [], [], fail
        outer = self

        class Summary(dict):
            def __setitem__(self, key, value):
                if outer.fail == "summary":
                    raise ConnectionError("W&B's service went away")
                super().__setitem__(key, value)

        self.summary = Summary()

    def log(self, metrics):
        if self.fail == "log":
            raise ConnectionError("W&B's service went away")
        self.logged.append(metrics)

    def finish(self, exit_code=0):
        self.finished.append(exit_code)


def test_a_wandb_failure_in_a_log_or_a_stop_never_stops_the_run(tmp_path):
    """W&B failing in log (the most frequent call) or in the stop handler's summary must leave the run, and its
    metrics.jsonl and stopped.json, as they were: said once, and W&B dropped for the rest of the run."""
    tracker = Tracker(tmp_path, SimpleNamespace(wandb=False), {})
    tracker.wandb_run = _FakeRun(fail="log")
    with pytest.warns(UserWarning, match="W&B log failed"):
        tracker.log({"train/loss": 1.0}, 1)
    tracker.log({"train/loss": 0.5}, 2)
    assert tracker.wandb_run is None and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    tracker.wandb_run = _FakeRun(fail="summary")
    with pytest.warns(UserWarning, match="W&B summary failed"):
        tracker.mark_stopped(stopped_record(15, 40))
    assert tracker.wandb_run is None and json.loads((tmp_path / "stopped.json").read_text())["step"] == 40


def test_a_run_that_ends_well_leaves_its_wandb_run_open_and_tables_go_on_the_step_axis(tmp_path):
    """Only a run that ends with an error closes its W&B run from the tracker (with a failing status); and a
    generations table is logged at its step, on the global-step axis every metric is plotted against."""
    tracker = Tracker(tmp_path, SimpleNamespace(wandb=False), {})
    tracker.wandb_run = run = _FakeRun()
    with tracker:
        pass
    assert run.finished == []
    tracker.log_generations([{"prompt": "p", "response": "r"}], 7)
    assert run.logged[-1][STEP_KEY] == 7 and "eval/generations" in run.logged[-1]
    with pytest.raises(RuntimeError), tracker:
        raise RuntimeError("diverged")
    assert run.finished == [1]


def test_a_failed_generations_table_is_said_once(tmp_path, monkeypatch, caplog):
    """A table W&B cannot take is not asked again at every evaluation (each one said again in the log)."""
    import logging

    import wandb

    tracker = Tracker(tmp_path, SimpleNamespace(wandb=False), {})
    tracker.wandb_run = _FakeRun()
    monkeypatch.setattr(wandb, "Table", lambda **kw: (_ for _ in ()).throw(PermissionError("staging")))
    with caplog.at_level(logging.WARNING, logger="simpo_exp.tracking"), pytest.warns(UserWarning):
        for step in (0, 1, 2):
            tracker.log_generations([{"prompt": "p", "response": "r"}], step)
    assert len([r for r in caplog.records if "generations table" in r.getMessage()]) == 1
    assert len((tmp_path / "generations.jsonl").read_text().splitlines()) == 3


def test_metrics_jsonl_is_strict_json(tmp_path):
    """NaN and the infinities written as they are (``NaN``, ``-Infinity``) are not JSON: jq, JavaScript and a
    strict parser refuse the file. They are written as null and a stand-in that compare reads back."""
    tracker = Tracker(tmp_path, SimpleNamespace(wandb=False), {})
    tracker.log({"train/logps/rejected": float("-inf"), "train/grad_norm": float("inf"), "train/loss": float("nan")}, 1)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def test_credentials_are_dropped_from_the_wandb_config_whatever_their_case(tmp_path, monkeypatch):
    """A user's ``+hub.hf_token=...`` or a judge's key in the run's config went to W&B's config with the rest; an
    upper-case name (an environment dict: ``HF_TOKEN``) was kept by a case-sensitive match."""
    import wandb

    from simpo_exp.tracking import scrub

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", fake_init)
    config = {"judge": {"api_key": "sk-x"}, "hub": {"hf_token": "hf_x"}, "max_new_tokens": 4}
    with pytest.warns(UserWarning, match="stop here"):
        Tracker(tmp_path, _logger_cfg(group=None), config)
    assert seen["config"] == {"judge": {}, "hub": {}, "max_new_tokens": 4}
    assert scrub({"HF_TOKEN": "hf_x", "Judge": {"OPENAI_API_KEY": "k"}, "N": 1}) == {"Judge": {}, "N": 1}
    # a key ending in a credential's name, not one holding it (model.tokenizer_path, tokens are no credentials); a bare
    # token whatever its value (an all-digit one is read as a number); a W&B-style slash key by its last part
    assert scrub({"model": {"tokenizer_path": "gpt2"}, "tokens": "x"}) == {
        "model": {"tokenizer_path": "gpt2"},
        "tokens": "x",
    }
    assert scrub({"token": 123456, "hub": {"token": 42}}) == {"hub": {}}
    assert scrub({"judge/api_key": "k", "env/HF_TOKEN": "t", "train/loss": 1}) == {"train/loss": 1}


def test_a_tracker_of_another_process_writes_nothing(tmp_path):
    """Only the main process records the run: another's tracker (enabled=False) wrote files into a run folder it
    never made, and failed there."""
    tracker = Tracker(tmp_path / "x", _logger_cfg(group=None), {}, enabled=False)
    tracker.write_json("a.json", {})
    tracker.mark_stopped(stopped_record(15, 1))
    tracker.finish({})
    assert not (tmp_path / "x").exists()


def test_wandb_disabled_in_the_environment_leaves_no_record_under_an_offline_logger(tmp_path, monkeypatch):
    """WANDB_MODE=disabled over logger.mode=offline gives a stand-in run (entity "dummy") too: its record made the
    run's evaluation log to it."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    lc = _logger_cfg(group=None)
    lc.mode = "offline"
    Tracker(tmp_path, lc, {}).finish({})
    assert not (tmp_path / "wandb_run.json").exists()


def test_a_federated_identity_counts_as_a_key_and_an_empty_password_does_not(tmp_path, monkeypatch):
    from simpo_exp.tracking import wandb_key_given

    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    netrc.write_text('machine api.wandb.ai\n  login user\n  password ""\n')
    netrc.chmod(0o600)
    assert not wandb_key_given()
    token = tmp_path / "identity.jwt"
    token.write_text("x")
    monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", str(token))
    assert wandb_key_given()


# ----------------------------------------------------------------------------- from a mutation review of tracking.py
@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))


def test_a_disabled_logger_without_a_key_stays_disabled(tmp_path, no_wandb_key):
    """Only online turns offline without a key: a disabled logger became an offline run, whose record then made the
    evaluate stage log to it."""
    from simpo_exp.tracking import keyed_mode

    assert [keyed_mode(m) for m in ("disabled", "offline")] == ["disabled", "offline"]
    lc = _logger_cfg(group=None)
    lc.mode = "disabled"
    Tracker(tmp_path / "run", lc, {}).finish({})
    assert not (tmp_path / "run" / "wandb_run.json").exists() and not list(tmp_path.glob("run/wandb/offline-run-*"))


def test_a_netrc_the_variable_names_is_the_only_one_read(tmp_path, no_wandb_key):
    """NETRC naming a missing file: no key, whatever ~/_netrc holds (W&B reads the file the variable names)."""
    from simpo_exp.tracking import wandb_key_given

    (tmp_path / "_netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert not wandb_key_given()


def test_two_runs_of_one_process_are_two_wandb_runs(tmp_path, no_wandb_key):
    """A multirun's jobs in one process: a job whose earlier W&B run was never finished logged into it."""
    lc = _logger_cfg(group=None)
    lc.mode = "offline"
    first, second = Tracker(tmp_path / "a", lc, {}), Tracker(tmp_path / "b", lc, {})
    try:
        assert first.wandb_run.id != second.wandb_run.id
        ids = [json.loads((tmp_path / d / "wandb_run.json").read_text())["id"] for d in ("a", "b")]
        assert ids == [first.wandb_run.id, second.wandb_run.id]
    finally:
        first.finish({}), second.finish({})


def test_no_generations_is_no_table_and_no_warning(tmp_path):
    """An eval with no sample rows hit rows[0]: a false warning, and the tables stopped for the rest of the run."""
    import warnings

    tracker = Tracker(tmp_path, SimpleNamespace(wandb=False), {})
    tracker.wandb_run = run = _FakeRun()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.log_generations([], 0)
    assert not (tmp_path / "generations.jsonl").exists()
    tracker.log_generations([{"prompt": "p", "response": "r"}], 1)
    assert "eval/generations" in run.logged[-1]


def test_a_run_that_exits_with_a_message_closes_its_wandb_run_as_failed(tmp_path):
    """SystemExit("bad config") carries text, not a status: the W&B run is closed with 1."""
    tracker = Tracker(tmp_path, SimpleNamespace(wandb=False), {})
    tracker.wandb_run = run = _FakeRun()
    with pytest.raises(SystemExit), tracker:
        raise SystemExit("bad config")
    assert run.finished == [1]


def test_a_logged_value_that_is_no_number_reads_as_none():
    from simpo_exp.tracking import logged_value

    assert logged_value(True) is None and logged_value("x") is None and math.isnan(logged_value(None))


def test_config_leaves_and_the_keys_that_differ_between_runs():
    """An empty group is a leaf of its own; skipping seed skips seed and seed.*, not seed_data; lists of the same
    dicts in another key order do not differ."""
    from simpo_exp.tracking import config_leaves, differing_keys

    assert config_leaves({"a": {}, "b": {"c": 1}}) == {"a": {}, "b.c": 1}
    assert differing_keys([{"seed": 1, "seed_data": 1}, {"seed": 2, "seed_data": 2}], skip=("seed",)) == ["seed_data"]
    assert differing_keys([{"a": [{"x": 1, "y": 2}]}, {"a": [{"y": 2, "x": 1}]}]) == []


# Loaded by the first start below: it fails right after step 3 is logged, its last checkpoint at step 2.
FAILS_AFTER_STEP_3 = """
import simpo_exp.train as train

real = train.log_train

def log_train(run, window, grad_norm):
    out = real(run, window, grad_norm)
    if run.state.step == 3:
        raise RuntimeError("injected failure after step 3")
    return out

train.log_train = log_train
"""


def test_a_resume_from_an_earlier_checkpoint_does_not_send_wandb_its_steps_again(tmp_path):
    """The run as a user starts it again after a failure between checkpoints: the resumed start's W&B record holds
    no step at or below the one the failed start reached (3), only the steps after it."""
    run_dir = tmp_path / "run"
    args = ["max_steps=4", "logging_steps=1", "eval_steps=2", "save_steps=2", "logger=wandb", "save_model=false"]
    args += ["num_generations=0", "dataset.synthetic.num_train=64", "dataset.synthetic.num_test=16"]
    args.append(f"hydra.run.dir={run_dir}")
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAILS_AFTER_STEP_3)
    env = {"PYTHONPATH": f"{tmp_path / 'inject'}:{Path(__file__).resolve().parents[1]}"}
    failed = run_module("simpo_exp", *args, cwd=tmp_path, env=env)
    assert failed.returncode != 0 and (run_dir / "checkpoints" / "step-000002").exists(), failed.stderr[-3000:]
    before = set((run_dir / "wandb").glob("offline-run-*"))
    res = run_module("simpo_exp", *args, cwd=tmp_path)
    assert res.returncode == 0 and "resumed from" in (run_dir / "__main__.log").read_text(), res.stderr[-3000:]
    (second,) = set((run_dir / "wandb").glob("offline-run-*")) - before
    steps = [row.get(STEP_KEY) for row in fold(read_ended_wandb_log(next(second.glob("run-*.wandb")))).history]
    assert steps and min(s for s in steps if s is not None) == 4, steps
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(logged)) == [0, 1, 2, 3, 4] and logged.count(3) == 1  # the local record: each step once
