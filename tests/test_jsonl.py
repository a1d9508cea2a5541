"""The JSONL files the stages write and read back (sampled responses and their scores, judgments, metrics,
benchmark prompts): a line ends at "\\n" only. JSON leaves U+2028, U+2029 and U+0085 unescaped inside strings
(the stages write with ensure_ascii=False), and str.splitlines splits at them: a generate run whose tiny policy
sampled one of them stopped with "Invalid \\uXXXX escape" on reading its own shard."""

import json

import pytest

from simpo_exp import checkpoint, rundir
from simpo_exp.evaluate.benchmarks import _read_json_file
from simpo_exp.inference.files import read_jsonl, write_jsonl

ROWS = [
    {"step": 1, "text": "line\u2028separator, paragraph\u2029separator, next line\x85, file separator\x1c"},
    {"step": 2, "text": "plain"},
]


def test_every_jsonl_reader_keeps_unicode_line_breaks_inside_strings(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, ROWS)
    assert "\u2028" in path.read_text()  # written as it is, not escaped
    assert read_jsonl(path) == ROWS  # generate's shards, evaluate's answers and judgments
    assert rundir.read_jsonl(path) == ROWS  # compare: metrics.jsonl, generations.jsonl
    assert _read_json_file(str(path), "benchmarks.x.path") == ROWS  # a benchmark's prompts
    checkpoint.trim_metrics(path, last_step=1)  # a resumed run's metrics.jsonl
    assert read_jsonl(path) == ROWS[:1]


def test_a_resume_drops_a_half_written_last_record(tmp_path):
    """A run killed while writing a record leaves its line cut off; the resume's trim drops it with the records
    after the checkpoint instead of failing to parse it (every re-run did)."""
    path = tmp_path / "metrics.jsonl"
    write_jsonl(path, ROWS)
    with open(path, "a") as f:
        f.write('{"step": 3, "train/loss": 1.3')
    checkpoint.trim_metrics(path, last_step=2)
    assert read_jsonl(path) == ROWS


def test_weights_hash_is_the_same_anywhere_and_changes_with_weights_or_config(tmp_path):
    import shutil

    from simpo_exp.inference.files import weights_sha256

    a = tmp_path / "a"
    a.mkdir()
    (a / "model.safetensors").write_bytes(b"w1")
    (a / "config.json").write_text("{}")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    assert weights_sha256(a) == weights_sha256(b)
    (b / "config.json").write_text('{"x": 1}')
    assert weights_sha256(a) != weights_sha256(b)
    bins = tmp_path / "bins"
    bins.mkdir()
    (bins / "config.json").write_text("{}")
    (bins / "pytorch_model.bin").write_bytes(b"w1")
    before = weights_sha256(bins)
    (bins / "pytorch_model.bin").write_bytes(b"w2-longer")
    assert weights_sha256(bins) != before
    (a / "model-00002.safetensors").write_bytes(b"w2")
    assert weights_sha256(a) != weights_sha256(tmp_path / "elsewhere" / "b")


def test_file_hash_is_sha256sums_and_follows_an_edit_of_the_same_size(tmp_path):
    import hashlib
    import os

    from simpo_exp.inference.files import file_sha256

    f = tmp_path / "train.jsonl"
    f.write_bytes(b"abc")
    assert file_sha256(f) == hashlib.sha256(b"abc").hexdigest()
    st = f.stat()
    f.write_bytes(b"xyz")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert file_sha256(f) == hashlib.sha256(b"xyz").hexdigest()


def test_manifest_changes_name_new_keys_except_where_only_the_stored_ones_count():
    from simpo_exp.inference.files import manifest_changes

    old, now = {"g": {"t": 1.0}, "n": 3}, {"g": {"t": 1.0, "top_p": 0.9}, "n": 3, "seed": 1}
    assert manifest_changes(old, now) == ["g.top_p: stored None, now 0.9", "seed: stored None, now 1"]
    assert manifest_changes(old, now, stored_only=True) == []
    assert manifest_changes(old, {**now, "g": {"t": 0.5}}, stored_only=True) == ["g.t: stored 1.0, now 0.5"]
    # a key nested deeper keeps the whole path, with the caller's prefix (the generate stage filters by it)
    deep = manifest_changes({"w": {"path": "a"}}, {"w": {"path": "b"}}, prefix="scorer.", said=("there", "here"))
    assert deep == ["scorer.w.path: there 'a', here 'b'"]
    assert manifest_changes({"a": {"b": {"c": 1}}}, {"a": {"b": {"c": 2}}}) == ["a.b.c: stored 1, now 2"]
    # two long paths that differ at their ends: the message shows both ends
    p = "/x" * 60
    (line,) = manifest_changes({"p": p + "/a-rm"}, {"p": p + "/b-rm"})
    assert "a-rm" in line and "b-rm" in line and len(line) < 200


def test_a_models_weights_rewritten_at_one_size_get_another_hash(tmp_path):
    """The weights' hash is kept per process while the files' sizes and times hold: weights rewritten at the same
    size (another step's save over the last) are hashed again, so answers of the old weights are not taken for
    the new ones'."""
    import os

    from simpo_exp.inference.files import weights_sha256

    (tmp_path / "model.safetensors").write_bytes(b"abc")
    (tmp_path / "config.json").write_text("{}")
    before = weights_sha256(tmp_path)
    st = (tmp_path / "model.safetensors").stat()
    (tmp_path / "model.safetensors").write_bytes(b"xyz")
    os.utime(tmp_path / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert weights_sha256(tmp_path) != before


def test_a_damaged_jsonl_line_is_named_by_its_number(tmp_path):
    from simpo_exp.inference.files import DamagedFile, read_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(DamagedFile, match=r"rows.jsonl: line 3 is not valid JSON"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')  # valid JSON, no record: its readers took a list for one
    with pytest.raises(DamagedFile, match=r"rows.jsonl: line 2 holds a JSON list, not a record"):
        read_jsonl(path)


def test_write_atomic_makes_the_folder_and_leaves_no_temporary_file(tmp_path):
    from simpo_exp.inference.files import append_jsonl, read_jsonl, write_json, write_jsonl

    write_json(tmp_path / "new" / "deeper" / "x.json", {"é": 1})
    assert json.loads((tmp_path / "new" / "deeper" / "x.json").read_text(encoding="utf-8")) == {"é": 1}
    write_jsonl(tmp_path / "rows" / "r.jsonl", [{"a": 1}])
    append_jsonl(tmp_path / "rows" / "r.jsonl", {"a": 2})
    append_jsonl(tmp_path / "rows" / "r.jsonl", {"a": 3})
    assert read_jsonl(tmp_path / "rows" / "r.jsonl") == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deeper", "new", "r.jsonl", "rows", "x.json"]
    # a write that fails half-way (a full disk) leaves the old file, and no temporary one beside it
    with pytest.raises(UnicodeEncodeError):
        write_jsonl(tmp_path / "rows" / "r.jsonl", [{"a": "\ud800"}])  # a lone surrogate: not UTF-8
    assert read_jsonl(tmp_path / "rows" / "r.jsonl") == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert sorted(p.name for p in (tmp_path / "rows").iterdir()) == ["r.jsonl"]


def test_write_atomic_syncs_the_whole_text_before_the_rename(tmp_path, monkeypatch):
    """Flushed and fsynced before the rename: a machine going down right after it leaves the old file or the whole
    new one, not a renamed file missing its tail (without the flush, the fsync syncs an empty file)."""
    import os

    from simpo_exp.inference import files

    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_size)) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace",)) or replace(a, b))
    text = '{"a": 1}\n'
    files.write_atomic(tmp_path / "a.json", text)
    assert events == [("fsync", len(text)), ("replace",)]


def test_an_interrupted_write_keeps_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    """A Ctrl-C (no Exception) in the middle of a write: the old file as it was, and no temporary file beside it."""
    import os

    from simpo_exp.inference.files import write_json

    write_json(tmp_path / "x.json", {"old": 1})

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(tmp_path / "x.json", {"new": 2})
    assert json.loads((tmp_path / "x.json").read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_model_folder_without_tokenizer_files_has_no_tokenizer_hash(tmp_path):
    """None, not the hash of no file: the evaluate stage's manifests record None for such a folder."""
    from simpo_exp.inference.files import tokenizer_sha256

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert tokenizer_sha256(tmp_path / "m") is None
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    assert len(tokenizer_sha256(tmp_path / "m")) >= 12


def test_records_read_leniently_and_a_runs_failure_from_its_processes(tmp_path):
    """rundir's readers of run records: a damaged or undecodable JSON file is no record, a JSONL path that is a
    folder has no line, a dotted lookup stops at a value that is no mapping; a failure is told from the main
    process's record with the lowest-numbered other process's own words beside it."""
    path = tmp_path / "summary.json"
    for damaged in (b'{"a": 1', b"\xff\xfe"):
        path.write_bytes(damaged)
        assert rundir.read_json(path) == {} and rundir.read_json_value(path) is None
    (tmp_path / "m.jsonl").mkdir()
    assert rundir.read_jsonl(tmp_path / "m.jsonl") == [] == rundir.read_jsonl(tmp_path / "none.jsonl")
    assert rundir.select({"a": "xyz"}, "a.x", "m") == "m" and rundir.select({"a": None}, "a.b") is None
    assert rundir.select({"a": [1]}, "a.0", "m") == "m" and rundir.select({"a": {"b": 2}}, "a.b") == 2

    job = tmp_path / "job"
    job.mkdir()
    (job / "error-rank10.json").write_text(json.dumps({"error": "b", "type": "X"}))
    (job / "error-rank2.json").write_text(json.dumps({"error": "a", "type": "Y"}))
    assert rundir.failure_record(job)["error"] == "on process 2: a"  # not 10, which sorts first as text
    main = {"error": "connection closed by peer\nTraceback...", "type": "DistBackendError"}
    (job / "error.json").write_text(json.dumps(main))
    (job / "error-rank2.json").write_text(json.dumps({"error": "CUDA out of memory\nmore", "type": "OutOfMemoryError"}))
    said = "connection closed by peer (process 2: OutOfMemoryError: CUDA out of memory)\nTraceback..."
    assert rundir.failure_record(job)["error"] == said
    (job / "error-rank2.json").write_text(json.dumps({"error": "connection closed by peer", "type": "X"}))
    assert rundir.failure_record(job) == main  # the same words: nothing added
