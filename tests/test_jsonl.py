"""The JSONL files the stages write and read back (sampled responses and their scores, judgments, metrics,
benchmark prompts): a line ends at "\\n" only. JSON leaves U+2028, U+2029 and U+0085 unescaped inside strings
(the stages write with ensure_ascii=False), and str.splitlines splits at them: a generate run whose tiny policy
sampled one of them stopped with "Invalid \\uXXXX escape" on reading its own shard."""

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
