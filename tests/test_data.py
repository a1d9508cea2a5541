"""The data layer: sources in the hub schemas -> normalised pairs -> tokens -> filtered splits -> batches.

Every source is a small local file written here in the exact schema of the hub data set it stands
for (JSONL, and Parquet laid out as the hub does), loaded through the config the matching preset in
``conf/dataset`` composes, with only ``path`` pointed at the local copy. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers.processors import TemplateProcessing

from simpo_exp.config import (
    Config,
    ConfigError,
    DatasetConfig,
    HardwareConfig,
    LoggerConfig,
    ModelConfig,
    SourceConfig,
    SyntheticConfig,
    to_config,
)
from simpo_exp.data import MODEL_COLUMNS, DataSourceError, EmptySplitError, PairCollator, build_datasets, synthetic
from simpo_exp.data import sources as sources_mod
from simpo_exp.data.sources import load_split, normalise, normalise_row
from simpo_exp.hub import hub_reachable
from simpo_exp.model import ZEPHYR_CHAT_TEMPLATE, build_tiny_tokenizer

CONF = Path(__file__).resolve().parents[1] / "conf"

# Content that a byte-level round trip must keep exactly: accents, emoji, CJK, newlines, spacing
# that a "clean up tokenization spaces" pass would change.
ODD_TEXT = "Héllo , naïve café . don 't 😀 中文\n\n  indented\ttab"


# ----------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture(scope="module", autouse=True)
def _private_datasets_cache(tmp_path_factory):
    """Keep datasets' cache (prepared files, map() results) out of the user's ~/.cache."""
    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets_cache")
    yield
    datasets.config.HF_DATASETS_CACHE = saved


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def make_config(sources: dict, max_length: int = 256, max_prompt_length: int = 128, **dataset_kw) -> Config:
    return Config(
        model=ModelConfig(name="tiny"),
        dataset=DatasetConfig(name="test", sources=sources, **dataset_kw),
        hardware=HardwareConfig(name="cpu"),
        logger=LoggerConfig(name="none"),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )


def compose_preset(preset: str, *overrides: str) -> Config:
    """Compose ``dataset=<preset>`` (plus overrides) as the command line would, and validate it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        dc = compose(
            config_name="config",
            overrides=[
                "output_dir=/tmp/unused",
                f"dataset={preset}",
                "model=tiny",
                "hardware=cpu",
                "logger=none",
                *overrides,
            ],
        )
    return to_config(dc)


def path_override(source: str, path: Path) -> str:
    return f"dataset.sources.{source}.path='{path}'"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def msgs(prompt: str, answer) -> list[dict]:
    # The hub's structs list "content" before "role".
    return [{"content": prompt, "role": "user"}, {"content": answer, "role": "assistant"}]


def uf_row(prompt: str, chosen: str, rejected: str) -> dict:
    """HuggingFaceH4/ultrafeedback_binarized, *_prefs splits."""
    return {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
        "chosen": msgs(prompt, chosen),
        "rejected": msgs(prompt, rejected),
        "messages": msgs(prompt, chosen),
        "score_chosen": 8.5,
        "score_rejected": 4.0,
    }


def armorm_row(prompt: str, chosen: str, rejected: str) -> dict:
    """princeton-nlp/llama3-ultrafeedback-armorm."""
    responses = [chosen, rejected, f"other answer to {prompt}", f"fourth answer to {prompt}", f"fifth to {prompt}"]
    return {
        "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
        "prompt": prompt,
        "all_generated_responses": responses,
        "all_rm_scores": [0.19, 0.11, 0.15, 0.14, 0.12],
        "chosen": msgs(prompt, chosen),
        "rejected": msgs(prompt, rejected),
    }


def argilla_row(prompt: str, chosen: str, rejected: str) -> dict:
    """argilla/ultrafeedback-binarized-preferences-cleaned (train only)."""
    return {
        "source": "evol_instruct",
        "prompt": prompt,
        "chosen": msgs(prompt, chosen),
        "chosen-rating": 5.0,
        "chosen-model": "gpt-4",
        "rejected": msgs(prompt, rejected),
        "rejected-rating": 2.5,
        "rejected-model": "llama-2-7b-chat",
    }


def distilabel_row(prompt: str, chosen: str, rejected: str) -> dict:
    """argilla/distilabel-math-preference-dpo (train only, plain strings)."""
    return {
        "metadata": json.dumps({"length-input": len(prompt), "generation-model": ["gpt-3.5-turbo"]}),
        "instruction": prompt,
        "chosen_response": chosen,
        "chosen_rating": 9.0,
        "rejected_response": rejected,
        "rejected_rating": 6.5,
    }


def triples(tag: str, n: int) -> list[tuple[str, str, str]]:
    """n distinct (prompt, chosen, rejected); every third one carries ODD_TEXT."""
    out = []
    for i in range(n):
        extra = f" {ODD_TEXT}" if i % 3 == 0 else ""
        out.append((f"{tag} question {i}?{extra}", f"{tag} good answer {i}.{extra}", f"{tag} bad answer {i}"))
    return out


def pairs_of(ds) -> dict[str, tuple]:
    """prompt text -> (prompt messages, chosen, rejected) of a built split."""
    out = {}
    for row in ds:
        assert len(row["prompt"]) == 1 and row["prompt"][0]["role"] == "user", row["prompt"]
        key = row["prompt"][0]["content"]
        assert key not in out, f"prompt {key!r} appears twice"
        out[key] = (row["prompt"], row["chosen"], row["rejected"])
    return out


def assert_tokens_match_template(ds, tok) -> None:
    """prompt+response ids decode to the chat template's text; the response is its content + EOS."""
    for row in ds:
        p, c, r = row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"]
        for response_ids, text in ((c, row["chosen"]), (r, row["rejected"])):
            full = tok.apply_chat_template(row["prompt"] + [{"role": "assistant", "content": text}], tokenize=False)
            assert tok.decode(p + response_ids) == full
            assert tok.decode(response_ids) == text + tok.eos_token
            assert response_ids[-1] == tok.eos_token_id
        assert tok.decode(p) == tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1
        assert tok.bos_token_id not in c and tok.bos_token_id not in r


def check_against(ds, expected: list[tuple[str, str, str]], tok) -> None:
    got = pairs_of(ds)
    assert set(got) == {p for p, _, _ in expected}
    for prompt, chosen, rejected in expected:
        messages, c, r = got[prompt]
        assert messages == [{"role": "user", "content": prompt}]
        assert (c, r) == (chosen, rejected)
    assert_tokens_match_template(ds, tok)


def call_with_alarm(seconds: int, fn, *args):
    """Run fn, failing the test instead of hanging if it takes longer than ``seconds``."""

    def _timeout(signum, frame):
        raise TimeoutError(f"{fn.__name__} did not return within {seconds}s")

    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(seconds)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- hub schemas
def test_ultrafeedback_binarized_hub_parquet_layout(tmp_path, tok):
    train, test = triples("uf-train", 12), triples("uf-test", 4)
    root = tmp_path / "ultrafeedback_binarized"
    write_parquet(root / "data" / "train_prefs-00000-of-00001.parquet", [uf_row(*t) for t in train])
    write_parquet(root / "data" / "test_prefs-00000-of-00001.parquet", [uf_row(*t) for t in test])
    # The hub's other splits sit beside them and must not be picked up.
    for other in ("train_sft", "test_sft", "train_gen", "test_gen"):
        write_parquet(root / "data" / f"{other}-00000-of-00001.parquet", [uf_row(*t) for t in triples(other, 3)])

    cfg = compose_preset("ultrafeedback-binarized", path_override("ultrafeedback_binarized", root))
    src = cfg.dataset.sources["ultrafeedback_binarized"]
    assert (src.format, src.train_split, src.test_split, src.path) == (
        "messages",
        "train_prefs",
        "test_prefs",
        str(root),
    )

    tr, te, report = build_datasets(cfg, tok)
    check_against(tr, train, tok)
    check_against(te, test, tok)
    assert report.kept == {"train": 12, "test": 4}
    assert report.dropped == {"train": {}, "test": {}}
    counts = {k: report.sources["ultrafeedback_binarized"][k] for k in ("train_rows", "test_rows", "fraction")}
    assert counts == {"train_rows": 12, "test_rows": 4, "fraction": 1.0}
    # the files read, by their place in the hub's layout, each with its hash (simpo_exp/finished.py reads them)
    assert sorted(report.sources["ultrafeedback_binarized"]["files"]) == [
        "data/test_prefs-00000-of-00001.parquet", "data/train_prefs-00000-of-00001.parquet"
    ]  # fmt: skip
    assert set(MODEL_COLUMNS) <= set(tr.column_names)
    # shards of one split that disagree in their columns: the error says why, not only "Couldn't cast"
    write_parquet(root / "data" / "train_prefs-00000-of-00002.parquet", [uf_row(*t) for t in train[:6]])
    write_parquet(root / "data" / "train_prefs-00001-of-00002.parquet", [uf_row(*t) | {"extra": 1} for t in train[6:]])
    (root / "data" / "train_prefs-00000-of-00001.parquet").unlink()
    with pytest.raises(DataSourceError, match=r"\(Couldn't cast \.\.\. because column names don't match\)"):
        build_datasets(cfg, tok)


def test_llama3_ultrafeedback_armorm_jsonl_dir(tmp_path, tok):
    train, test = triples("armorm-train", 10), triples("armorm-test", 3)
    root = tmp_path / "llama3-armorm"
    write_jsonl(root / "train.jsonl", [armorm_row(*t) for t in train])
    write_jsonl(root / "test.jsonl", [armorm_row(*t) for t in test])

    cfg = compose_preset("llama3-ultrafeedback-armorm", path_override("llama3_ultrafeedback_armorm", root))
    tr, te, report = build_datasets(cfg, tok)
    check_against(tr, train, tok)
    check_against(te, test, tok)
    assert report.kept == {"train": 10, "test": 3}


@pytest.mark.parametrize(
    "preset,source",
    [
        ("llama3-ultrafeedback", "llama3_ultrafeedback"),
        ("mistral-instruct-ultrafeedback", "mistral_instruct_ultrafeedback"),
    ],
)
def test_pairrm_ultrafeedback_hub_parquet_two_train_shards(tmp_path, tok, preset, source):
    """princeton-nlp/{llama3,mistral-instruct}-ultrafeedback: the armorm schema, train in two shards."""
    train, test = triples(f"{preset}-train", 9), triples(f"{preset}-test", 3)
    root = tmp_path / preset
    write_parquet(root / "data" / "train-00000-of-00002.parquet", [armorm_row(*t) for t in train[:5]])
    write_parquet(root / "data" / "train-00001-of-00002.parquet", [armorm_row(*t) for t in train[5:]])
    write_parquet(root / "data" / "test-00000-of-00001.parquet", [armorm_row(*t) for t in test])

    cfg = compose_preset(preset, path_override(source, root))
    src = cfg.dataset.sources[source]
    assert (src.format, src.train_split, src.test_split) == ("messages", "train", "test")
    tr, te, report = build_datasets(cfg, tok)
    check_against(tr, train, tok)
    check_against(te, test, tok)
    assert report.kept == {"train": 9, "test": 3}
    assert {k: report.sources[source][k] for k in ("train_rows", "test_rows", "fraction")} == {
        "train_rows": 9, "test_rows": 3, "fraction": 1.0
    }  # fmt: skip
    assert len(report.sources[source]["files"]) == 3  # two train shards and the test file


def test_argilla_cleaned_train_only_test_carved(tmp_path, tok):
    rows = triples("argilla", 20)
    root = tmp_path / "argilla-cleaned"
    write_parquet(root / "data" / "train-00000-of-00001.parquet", [argilla_row(*t) for t in rows])

    cfg = compose_preset("argilla-ultrafeedback-cleaned", path_override("argilla_ultrafeedback_cleaned", root))
    assert cfg.dataset.sources["argilla_ultrafeedback_cleaned"].test_split is None
    tr, te, report = build_datasets(cfg, tok)
    # dataset.test_size (0.05 by default) of 20 rows is held out: ceil(1.0) = 1 row.
    assert (len(tr), len(te)) == (19, 1)
    assert not set(pairs_of(tr)) & set(pairs_of(te))
    check_against(datasets.concatenate_datasets([tr, te]), rows, tok)
    assert report.kept == {"train": 19, "test": 1}


def test_distilabel_math_strings_single_file(tmp_path, tok):
    rows = triples("math", 20)
    path = write_jsonl(tmp_path / "distilabel-math.jsonl", [distilabel_row(*t) for t in rows])

    cfg = compose_preset("distilabel-math", path_override("distilabel_math", path))
    src = cfg.dataset.sources["distilabel_math"]
    assert (src.format, src.prompt_column, src.chosen_column, src.rejected_column) == (
        "strings",
        "instruction",
        "chosen_response",
        "rejected_response",
    )
    assert src.test_size == 0.1 and cfg.dataset.test_size == 0.05  # the preset's own share, not every source's
    tr, te, _ = build_datasets(cfg, tok)
    assert (len(tr), len(te)) == (18, 2)
    assert not set(pairs_of(tr)) & set(pairs_of(te))
    check_against(datasets.concatenate_datasets([tr, te]), rows, tok)


def test_local_preset_with_column_mapping(tmp_path, tok):
    rows = triples("local", 8)
    path = write_jsonl(
        tmp_path / "prefs.jsonl", [{"question": p, "good": c, "bad": r, "id": i} for i, (p, c, r) in enumerate(rows)]
    )
    cfg = compose_preset(
        "local",
        path_override("local", path),
        "dataset.sources.local.prompt_column=question",
        "dataset.sources.local.chosen_column=good",
        "dataset.sources.local.rejected_column=bad",
        "dataset.test_size=0.25",
    )
    assert cfg.dataset.sources["local"].format == "auto"
    tr, te, _ = build_datasets(cfg, tok)
    assert (len(tr), len(te)) == (6, 2)
    check_against(datasets.concatenate_datasets([tr, te]), rows, tok)


def test_local_data_in_a_folder_named_with_glob_characters_is_read(tmp_path, tok):
    """A generate sweep job's folder ("1_generate.seeds=[1,2]") held the data its printed command trains on; read as
    a glob pattern, the file matched nothing ("cannot read ...: StopIteration") and the folder no split file."""
    folder = tmp_path / "1_generate.seeds=[1,2]"
    rows = triples("local", 8)
    write_jsonl(folder / "train.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows])
    write_jsonl(folder / "test.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows[:2]])
    for path in (folder / "train.jsonl", folder):
        cfg = compose_preset("local", path_override("local", path), "dataset.test_size=0.25")
        tr, te, _ = build_datasets(cfg, tok)
        assert (len(tr), len(te)) == ((6, 2) if path.is_file() else (8, 2)), path


def test_local_auto_format_message_lists_with_custom_columns(tmp_path, tok):
    rows = triples("msgs", 6)
    root = tmp_path / "local-msgs"
    write_jsonl(root / "train.jsonl", [{"preferred": msgs(p, c), "dispreferred": msgs(p, r)} for p, c, r in rows[:4]])
    write_jsonl(root / "test.jsonl", [{"preferred": msgs(p, c), "dispreferred": msgs(p, r)} for p, c, r in rows[4:]])
    src = SourceConfig(path=str(root), chosen_column="preferred", rejected_column="dispreferred")
    tr, te, _ = build_datasets(make_config({"local": src}), tok)
    check_against(tr, rows[:4], tok)
    check_against(te, rows[4:], tok)


def test_multi_turn_prompt_and_zephyr_template(tmp_path):
    tok = build_tiny_tokenizer()
    tok.chat_template = ZEPHYR_CHAT_TEMPLATE
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    row = {
        "chosen": history + [{"role": "assistant", "content": "6"}],
        "rejected": history + [{"role": "assistant", "content": "7"}],
    }
    root = tmp_path / "multi"
    write_jsonl(root / "train.jsonl", [row])
    write_jsonl(root / "test.jsonl", [row])
    tr, _, _ = build_datasets(make_config({"m": SourceConfig(path=str(root), format="messages")}), tok)
    (out,) = list(tr)
    assert out["prompt"] == history and (out["chosen"], out["rejected"]) == ("6", "7")
    # Zephyr ends each turn with EOS and a newline: that is what the response's tokens hold.
    assert tok.decode(out["chosen_input_ids"]) == "6" + tok.eos_token + "\n"
    assert tok.decode(out["prompt_input_ids"]).endswith("<|user|>\nand 3+3?" + tok.eos_token + "\n<|assistant|>\n")
    assert out["prompt_input_ids"].count(tok.bos_token_id) == 1


# ----------------------------------------------------------------------------- mixer and splits
def _mix_files(tmp_path):
    uf_train, uf_test, arg = triples("uf-train", 20), triples("uf-test", 4), triples("argilla", 40)
    uf = tmp_path / "uf"
    write_parquet(uf / "data" / "train_prefs-00000-of-00001.parquet", [uf_row(*t) for t in uf_train])
    write_parquet(uf / "data" / "test_prefs-00000-of-00001.parquet", [uf_row(*t) for t in uf_test])
    ar = tmp_path / "argilla"
    write_jsonl(ar / "train.jsonl", [argilla_row(*t) for t in arg])
    overrides = (path_override("ultrafeedback_binarized", uf), path_override("argilla_ultrafeedback_cleaned", ar))
    return uf_train, uf_test, arg, overrides


def test_mixer_fractions_and_whole_test_splits(tmp_path, tok):
    uf_train, uf_test, arg, overrides = _mix_files(tmp_path)
    cfg = compose_preset("ultrafeedback-mix", *overrides)
    assert {s.fraction for s in cfg.dataset.sources.values()} == {0.5}
    tr, te, report = build_datasets(cfg, tok)

    # argilla has no test split: ceil(0.05 * 40) = 2 rows are held out first, then half of the 38 kept.
    counts = {n: {k: v for k, v in s.items() if k not in ("files", "files_root")} for n, s in report.sources.items()}
    none = {"train": {}, "test": {}}  # rows dropped while normalising, per source
    assert counts == {
        "ultrafeedback_binarized": {"train_rows": int(0.5 * 20), "test_rows": 4, "fraction": 0.5, "dropped": none},
        "argilla_ultrafeedback_cleaned": {
            "train_rows": int(0.5 * 38),
            "test_rows": 2,
            "fraction": 0.5,
            "dropped": none,
        },
    }
    assert (len(tr), len(te)) == (10 + 19, 4 + 2)
    train_prompts, test_prompts = set(pairs_of(tr)), set(pairs_of(te))
    uf_train_p, uf_test_p, arg_p = ({p for p, _, _ in x} for x in (uf_train, uf_test, arg))
    assert len(train_prompts & uf_train_p) == 10 and len(train_prompts & arg_p) == 19
    # a fraction keeps the split's first rows, as alignment-handbook's mixer does (a shuffled pick kept others)
    assert train_prompts & uf_train_p == {p for p, _, _ in uf_train[:10]}
    # and the mixture trains in a shuffled order: a capped run (max_train_samples) takes its rows from the start
    assert {"ultrafeedback_binarized", "argilla_ultrafeedback_cleaned"} == set(tr["source"][:10])
    assert uf_test_p <= test_prompts and len(test_prompts & arg_p) == 2  # test splits whole
    assert not train_prompts & test_prompts
    assert not train_prompts & uf_test_p
    check_against(
        datasets.concatenate_datasets([tr, te]),
        [t for t in uf_train + uf_test + arg if t[0] in train_prompts | test_prompts],
        tok,
    )

    # Same seed: the same rows in the same order. Another seed: another sample.
    tr2, te2, _ = build_datasets(compose_preset("ultrafeedback-mix", *overrides), tok)
    assert list(tr2["chosen"]) == list(tr["chosen"]) and list(te2["chosen"]) == list(te["chosen"])
    tr3, _, _ = build_datasets(compose_preset("ultrafeedback-mix", *overrides, "dataset.shuffle_seed=7"), tok)
    assert len(tr3) == len(tr) and set(list(tr3["chosen"])) != set(list(tr["chosen"]))


def test_the_shuffle_seed_picks_the_train_pairs_a_cap_keeps(tmp_path, tok):
    """dataset.max_train_samples keeps the first pairs of the shuffled train split: another dataset.shuffle_seed
    keeps others, with a test file read whole too (where no carving draws with the seed)."""
    root = tmp_path / "files"
    write_jsonl(root / "train.jsonl", [uf_row(*t) for t in triples("train", 20)])
    write_jsonl(root / "test.jsonl", [uf_row(*t) for t in triples("test", 4)])
    src = SourceConfig(path=str(root))
    kept = {
        seed: pairs_of(build_datasets(make_config({"s": src}, max_train_samples=5, shuffle_seed=seed), tok)[0])
        for seed in (0, 7)
    }
    assert len(kept[0]) == len(kept[7]) == 5 and set(kept[0]) != set(kept[7])
    # the first five of the uncapped run's order: a capped run trains on a prefix of the uncapped one's data
    assert list(kept[0]) == list(pairs_of(build_datasets(make_config({"s": src}, shuffle_seed=0), tok)[0]))[:5]


def test_test_split_carved_with_test_size_when_null(tmp_path, tok, caplog):
    rows = triples("carve", 20)
    root = tmp_path / "carve"
    write_jsonl(root / "train.jsonl", [uf_row(*t) for t in rows])
    src = SourceConfig(path=str(root), test_split=None)
    with caplog.at_level("INFO", logger="simpo_exp.data"):
        tr, te, _ = build_datasets(make_config({"s": src}, test_size=0.25), tok)
    assert (len(tr), len(te)) == (15, 5)
    assert "dataset.sources.s: no test split read; 5 of its 20 train rows held out as its test split" in caplog.text
    assert not set(pairs_of(tr)) & set(pairs_of(te))
    assert set(pairs_of(tr)) | set(pairs_of(te)) == {p for p, _, _ in rows}
    _, te_again, _ = build_datasets(make_config({"s": src}, test_size=0.25), tok)
    assert list(te_again["chosen"]) == list(te["chosen"])
    _, te_other, _ = build_datasets(make_config({"s": src}, test_size=0.25, shuffle_seed=3), tok)
    assert set(list(te_other["chosen"])) != set(list(te["chosen"]))


def test_a_directory_test_file_is_read_and_a_second_folder_of_a_split_is_refused(tmp_path, tok):
    """test_split null (dataset=local): a directory's test file is the test split, carving only without one.
    Files of one split in two folders (an old copy in a subfolder) would be read twice: refused, naming both."""
    root = tmp_path / "local"
    write_jsonl(root / "train.jsonl", [uf_row(*t) for t in triples("train", 12)])
    write_jsonl(root / "test.jsonl", [uf_row(*t) for t in triples("held", 5)])
    src = SourceConfig(path=str(root), test_split=None)
    tr, te, _ = build_datasets(make_config({"s": src}, test_size=0.25), tok)
    assert (len(tr), len(te)) == (12, 5) and set(pairs_of(te)) == {p for p, _, _ in triples("held", 5)}
    write_jsonl(root / "old" / "train.jsonl", [uf_row(*t) for t in triples("old", 4)])
    with pytest.raises(DataSourceError, match="more than one folder") as err:
        build_datasets(make_config({"s": src}), tok)
    assert str(root / "old") in str(err.value)
    # a hub set's folder read through dataset=local with train_split=train_prefs: its test_prefs is the test split
    hub = tmp_path / "hub" / "data"
    write_parquet(hub / "train_prefs-00000-of-00001.parquet", [uf_row(*t) for t in triples("train", 12)])
    write_parquet(hub / "test_prefs-00000-of-00001.parquet", [uf_row(*t) for t in triples("held", 5)])
    src = SourceConfig(path=str(hub.parent), train_split="train_prefs", test_split=None)
    tr, te, _ = build_datasets(make_config({"s": src}, test_size=0.25), tok)
    assert (len(tr), len(te)) == (12, 5) and set(pairs_of(te)) == {p for p, _, _ in triples("held", 5)}


def test_max_samples_limits(tmp_path, tok):
    root = tmp_path / "limits"
    write_jsonl(root / "train.jsonl", [uf_row(*t) for t in triples("a", 10)])
    write_jsonl(root / "test.jsonl", [uf_row(*t) for t in triples("b", 6)])
    tr, te, report = build_datasets(
        make_config({"s": SourceConfig(path=str(root))}, max_train_samples=4, max_eval_samples=5), tok
    )
    assert (len(tr), len(te)) == (4, 5)
    assert report.kept == {"train": 4, "test": 5}


# ----------------------------------------------------------------------------- dropping and truncating
MAX_LENGTH, MAX_PROMPT = 96, 48
# The tiny template adds 4 tokens to a one-turn prompt (BOS, <|user|>, EOS, <|assistant|>) and one
# (EOS) to a response; every other token is one byte of text.


def test_drops_are_counted_by_reason(tmp_path, tok):
    good = [uf_row(f"ok question {i}?", f"good {i}", f"bad {i}") for i in range(5)]
    fits = "p" * (MAX_PROMPT - 4)  # exactly max_prompt_length tokens: kept
    too_long = "q" * (MAX_PROMPT - 3)  # one token over: dropped
    bad = [
        {**uf_row("no chosen 1", "x", "y"), "chosen": None},
        {k: v for k, v in uf_row("no chosen 2", "x", "y").items() if k != "chosen"},
        uf_row("empty 1", "", "fine"),
        uf_row("empty 2", "fine", "   \n "),
        uf_row("empty 3", "\t", "fine"),
        uf_row("same", "the same answer", "the same answer"),
        uf_row("null answer", None, "fine"),  # content null: not a string
        {**uf_row("null user", "a", "b"), "chosen": msgs(None, "a")},
        uf_row(too_long, "a", "b"),
        uf_row(too_long + "!", "a", "b"),
    ]
    root = tmp_path / "drops"
    write_jsonl(root / "train.jsonl", good[:2] + bad + good[2:] + [uf_row(fits, "a", "b")])
    write_jsonl(root / "test.jsonl", [uf_row(f"test question {i}?", "yes", "no") for i in range(2)])
    cfg = make_config({"s": SourceConfig(path=str(root), format="messages")}, MAX_LENGTH, MAX_PROMPT)
    tr, te, report = build_datasets(cfg, tok)

    assert report.dropped["train"] == {
        "missing chosen/rejected": 2,
        "empty response": 3,
        "identical responses": 1,
        "non-string content": 2,
        "prompt too long": 2,
    }
    assert report.dropped["test"] == {}
    assert report.kept == {"train": 6, "test": 2}
    assert set(pairs_of(tr)) == {r["prompt"] for r in good} | {fits}
    assert max(len(p) for p in tr["prompt_input_ids"]) == MAX_PROMPT
    assert "drop_reason" in tr.column_names and set(tr["drop_reason"]) == {""}
    line = report.lines()[0]
    assert line.startswith("train: kept 6 pairs") and "prompt too long: 2" in line


def test_responses_truncated_to_budget_and_counted(tmp_path, tok):
    P = "short prompt "  # + one digit: 14 bytes -> 18 prompt tokens
    budget = MAX_LENGTH - (len(P) + 1 + 4)  # 78 response tokens fit
    long = "L" * 150
    exact = "E" * (budget - 1)  # + EOS = exactly the budget: not truncated
    rows = [
        uf_row(P + "1", long + "1", "short"),
        uf_row(P + "2", long + "2", "short"),
        uf_row(P + "3", "short", long + "3"),
        uf_row(P + "4", "B" + long, long + "5"),  # both cut, but they differ within the budget
        uf_row(P + "5", exact, "short"),
        # Differ only beyond the budget: identical once cut, so useless as a pair.
        uf_row(P + "6", "A" * 120 + "x", "A" * 120 + "y"),
    ]
    root = tmp_path / "trunc"
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "test.jsonl", rows[:1])
    cfg = make_config({"s": SourceConfig(path=str(root))}, MAX_LENGTH, MAX_PROMPT)
    tr, te, report = build_datasets(cfg, tok)

    assert report.truncated["train"] == {"chosen": 3, "rejected": 2}
    assert report.truncated["test"] == {"chosen": 1, "rejected": 0}
    assert report.dropped["train"] == {"identical after truncation": 1}
    assert report.kept["train"] == 5
    by_prompt = {row["prompt"][0]["content"]: row for row in tr}
    for row in tr:
        p, c, r = row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"]
        assert len(p) == MAX_LENGTH - budget
        for ids, text in ((c, row["chosen"]), (r, row["rejected"])):
            full = tok(text + tok.eos_token, add_special_tokens=False)["input_ids"]
            assert ids == full[:budget]  # a prefix, cut at max_length - len(prompt)
            assert len(p) + len(ids) <= MAX_LENGTH
    assert len(by_prompt[P + "1"]["chosen_input_ids"]) == budget
    assert len(by_prompt[P + "1"]["rejected_input_ids"]) == len("short") + 1
    assert tok.decode(by_prompt[P + "5"]["chosen_input_ids"]) == exact + tok.eos_token
    assert by_prompt[P + "3"]["rejected_input_ids"][-1] != tok.eos_token_id  # its end was cut off
    # counted on the pairs used: after a max_train_samples cut, of those two only
    cfg = make_config({"s": SourceConfig(path=str(root))}, MAX_LENGTH, MAX_PROMPT, max_train_samples=2)
    tr, _, report = build_datasets(cfg, tok)
    longer = lambda text: len(tok(text + tok.eos_token, add_special_tokens=False)["input_ids"]) > budget  # noqa: E731
    cut = {side: sum(longer(row[side]) for row in tr) for side in ("chosen", "rejected")}
    assert report.kept["train"] == 2 and report.truncated["train"] == cut and sum(cut.values()) <= 4


def test_empty_split_error_names_split_and_reasons(tmp_path, tok):
    root = tmp_path / "empty"
    write_jsonl(root / "train.jsonl", [uf_row("a", "same", "same"), uf_row("b", "", "x")])
    write_jsonl(root / "test.jsonl", [uf_row(*t) for t in triples("t", 2)])
    with pytest.raises(EmptySplitError) as err:
        build_datasets(make_config({"s": SourceConfig(path=str(root))}), tok)
    msg = str(err.value)
    assert "train split of dataset.sources.s " in msg and "identical responses" in msg and "empty response" in msg
    assert isinstance(err.value, DataSourceError)

    root2 = tmp_path / "empty-test"
    write_jsonl(root2 / "train.jsonl", [uf_row(f"question {i}?", "yes", "no") for i in range(2)])
    write_jsonl(root2 / "test.jsonl", [uf_row("q" * 300, "a", "b")])
    with pytest.raises(EmptySplitError, match=r"test split.*prompt too long"):
        build_datasets(make_config({"s": SourceConfig(path=str(root2))}, MAX_LENGTH, MAX_PROMPT), tok)


def test_first_writer_batch_all_dropped_does_not_break_types(tmp_path, tok):
    """1000+ dropped rows first (empty prompt lists, empty id lists) and good rows after them.

    Regression: the Arrow types were inferred from the first written batch (list<null>), and the
    rows with real messages / token ids after it could not be cast to them.
    """
    dropped = [uf_row(f"drop {i}", None, "x") for i in range(1001)]
    good = triples("good", 3)
    root = tmp_path / "big"
    write_jsonl(root / "train.jsonl", [uf_row(*t) for t in good])
    write_jsonl(root / "test.jsonl", dropped + [uf_row(*t) for t in good])
    _, te, report = build_datasets(make_config({"s": SourceConfig(path=str(root))}), tok)
    assert report.dropped["test"] == {"non-string content": 1001}
    check_against(te, good, tok)


def test_normalise_row_rules():
    auto, strings = SourceConfig(path="x"), SourceConfig(path="x", format="strings")
    messages = SourceConfig(path="x", format="messages")
    assert normalise_row({"prompt": "p", "chosen": "a", "rejected": "b"}, auto) == {
        "prompt": [{"role": "user", "content": "p"}],
        "chosen": "a",
        "rejected": "b",
        "drop_reason": "",
    }
    # messages carrying other keys (a speaker's "name") keep their role and content alone: the normalised
    # columns' schema has those two (others ended in an Arrow cast error)
    named = lambda p, a: [{"role": "user", "content": p, "name": "u"}, {"role": "assistant", "content": a, "name": "x"}]  # noqa: E731
    row = normalise_row({"chosen": named("q", "a"), "rejected": named("q", "b")}, auto)
    assert row["prompt"] == [{"role": "user", "content": "q"}] and row["drop_reason"] == ""
    # a TRL-format prompt column likewise (its turns are what the chat template and the prompt's id see)
    row = normalise_row({"prompt": named("q", "a")[:1], "chosen": "a", "rejected": "b"}, auto)
    assert row["prompt"] == [{"role": "user", "content": "q"}] and row["drop_reason"] == ""
    # A message list written as a JSON string was trained on as the JSON text; it is dropped and counted
    encoded = {"prompt": "p", "chosen": json.dumps(msgs("p", "a")), "rejected": json.dumps(msgs("p", "b"))}
    assert normalise_row(encoded, auto)["drop_reason"].startswith("message list encoded as a JSON string")
    assert normalise_row(encoded, strings)["drop_reason"] == ""  # format=strings: the text as given
    assert normalise_row({"prompt": "p", "chosen": "[{a} b]", "rejected": "c"}, auto)["drop_reason"] == ""
    # The chosen conversation's earlier turns are the prompt, whatever the prompt column says.
    row = normalise_row({"prompt": "ignored", "chosen": msgs("real", "a"), "rejected": msgs("real", "b")}, messages)
    assert row["prompt"] == [{"role": "user", "content": "real"}] and row["drop_reason"] == ""
    # A conversation of only the assistant turn takes its prompt from the prompt column.
    only = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731
    assert normalise_row({"prompt": "p", "chosen": only("a"), "rejected": only("b")}, auto)["prompt"] == [
        {"role": "user", "content": "p"}
    ]
    # TRL's conversational format: the prompt a message list, the replies alone (turns or strings).
    system_user = [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}]
    for chosen, rejected in ((only("a"), only("b")), ("a", "b"), (only("a"), [*system_user, *only("b")])):
        row = normalise_row({"prompt": system_user, "chosen": chosen, "rejected": rejected}, auto)
        assert row["prompt"] == system_user and row["drop_reason"] == "" and row["chosen"] == "a", row
    # An empty system turn before the question (TRL-format exports write one) is no empty prompt.
    empty_system = [{"role": "system", "content": ""}, {"role": "user", "content": "p"}]
    row = normalise_row(
        {"prompt": None, "chosen": [*empty_system, *only("a")], "rejected": [*empty_system, *only("b")]}, messages
    )
    assert row["drop_reason"] == "" and row["prompt"] == empty_system
    upper = {"role": "User", "content": "p"}
    cases = [
        ({"prompt": "p", "chosen": "a", "rejected": 3}, strings, "non-string content"),
        ({"prompt": "p", "chosen": msgs("p", 5), "rejected": msgs("p", "b")}, auto, "non-string content"),
        ({"prompt": ["p"], "chosen": "a", "rejected": "b"}, strings, "non-string content"),
        (
            {"prompt": None, "chosen": "a", "rejected": "b"},
            auto,
            "no prompt (column 'prompt' empty or missing, no earlier turns in chosen)",
        ),  # fmt: skip
        ({"prompt": "p", "chosen": None, "rejected": "b"}, auto, "missing chosen/rejected"),
        ({"prompt": "p", "chosen": "a", "rejected": None}, auto, "missing chosen/rejected"),
        ({"prompt": "p", "chosen": msgs("p", "a"), "rejected": None}, auto, "missing chosen/rejected"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, messages, "expected message lists"),
        ({"prompt": "p", "chosen": msgs("p", "a"), "rejected": msgs("p", "b")}, strings, "non-string content"),
        ({"prompt": "p", "chosen": msgs("p", "a"), "rejected": "b"}, auto, "chosen and rejected have different shapes"),
        ({"prompt": "p", "chosen": [], "rejected": msgs("p", "b")}, auto, "empty chosen conversation"),
        (
            {"prompt": "p", "chosen": [{"role": "user", "content": "p"}] * 2, "rejected": msgs("p", "b")},
            auto,
            "chosen does not end with an assistant turn",
        ),
        ({"prompt": "   ", "chosen": "a", "rejected": "b"}, auto, "empty prompt"),
        # the rejected reply answers another conversation; a prompt column that says another prompt than chosen
        (
            {
                "prompt": "p",
                "chosen": [*msgs("q", "x"), *msgs("p", "a")],
                "rejected": [*msgs("OTHER", "x"), *msgs("p", "b")],
            },
            auto,
            "chosen and rejected have different earlier turns",
        ),  # fmt: skip
        (
            {
                "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}],
                "chosen": msgs("p", "a"),
                "rejected": msgs("p", "b"),
            },
            auto,
            "prompt column differs from chosen's earlier turns",
        ),  # fmt: skip
        # chosen its reply alone: the rejected conversation was not compared with the prompt, and trained as its reply
        (
            {"prompt": "p", "chosen": only("a"), "rejected": msgs("OTHER", "b")},
            auto,
            "rejected's earlier turns differ from the prompt",
        ),  # fmt: skip
        ({"prompt": "p", "chosen": " ", "rejected": "b"}, auto, "empty response"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, auto, "identical responses"),
        # a misspelt role: a template writing roles as given (Llama-3, ChatML) would train on an unseen header
        (
            {"prompt": [{"role": "usr", "content": "p"}], "chosen": only("a"), "rejected": only("b")},
            auto,
            "unknown role 'usr' in the prompt (chat templates know system, user, assistant, tool, ...)",
        ),  # fmt: skip
        (
            {"prompt": None, "chosen": [upper, *msgs("q", "a")], "rejected": [upper, *msgs("q", "b")]},
            auto,
            "unknown role 'User' in the prompt (chat templates know system, user, assistant, tool, ...)",
        ),  # fmt: skip
    ]
    for row, src, reason in cases:
        assert normalise_row(row, src)["drop_reason"] == reason, row


# ----------------------------------------------------------------------------- errors
def test_missing_path_is_a_clear_error(tmp_path, tok):
    missing_paths = (tmp_path / "nope.jsonl", tmp_path / "no-such-dir", "./relative/missing.parquet", "missing.jsonl")
    for missing in (*missing_paths, "missing.JSONL"):  # an upper-case extension was taken for a hub id
        with pytest.raises(DataSourceError, match="no such file or directory") as err:
            build_datasets(make_config({"src": SourceConfig(path=str(missing))}), tok)
        assert str(missing) in str(err.value) and "dataset.sources.src" in str(err.value)


def test_missing_split_file_in_directory(tmp_path, tok):
    root = tmp_path / "only-train"
    write_jsonl(root / "train.jsonl", [uf_row(*t) for t in triples("a", 3)])
    with pytest.raises(DataSourceError, match=r"no file for split 'test'") as err:
        build_datasets(make_config({"src": SourceConfig(path=str(root))}), tok)
    assert str(root) in str(err.value)
    assert "dataset.sources.src.test_split='test'" in str(err.value) and "the splits there: train)" in str(err.value)
    # a source of the user's own preset reads test_split 'test' by default: the error says how to carve instead
    assert "set dataset.sources.src.test_split=null to hold out test_size of train" in str(err.value)
    build_datasets(make_config({"src": SourceConfig(path=str(root), test_split=None)}), tok)


def test_wrong_columns_name_missing_and_present(tmp_path, tok):
    path = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "q", "answer_a": "a", "answer_b": "b"}] * 4)
    for fmt, missing in (
        ("auto", "['chosen', 'rejected']"),
        ("messages", "['chosen', 'rejected']"),
        ("strings", "['chosen', 'rejected', 'prompt']"),
    ):
        with pytest.raises(DataSourceError) as err:
            build_datasets(make_config({"src": SourceConfig(path=str(path), format=fmt)}), tok)
        msg = str(err.value)
        assert f"missing column(s) {missing}" in msg, msg
        assert "['question', 'answer_a', 'answer_b']" in msg and "dataset.sources.src" in msg


def test_string_responses_need_the_prompt_column_up_front(tmp_path, tok):
    """format auto with plain-string responses: a missing prompt column is a column error, not 100% drops."""
    path = write_jsonl(
        tmp_path / "noprompt.jsonl", [{"instruction": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(4)]
    )
    with pytest.raises(DataSourceError) as err:
        build_datasets(make_config({"src": SourceConfig(path=str(path))}), tok)
    assert not isinstance(err.value, EmptySplitError)
    assert "missing column(s) ['prompt']" in str(err.value) and "'instruction'" in str(err.value)
    assert "not split here" not in str(err.value)  # a column that may hold the prompt: mapping it is the advice
    # HH-RLHF's texts hold the whole conversation, no prompt column: mapping one cannot help, and the error says so
    hh = [
        {"chosen": f"\n\nHuman: q{i}\n\nAssistant: a", "rejected": f"\n\nHuman: q{i}\n\nAssistant: b"} for i in range(4)
    ]
    with pytest.raises(
        DataSourceError, match="whole conversation .* are not split here: convert them to message lists"
    ):
        build_datasets(make_config({"src": SourceConfig(path=str(write_jsonl(tmp_path / "hh.jsonl", hh)))}), tok)
    # Message lists carry their prompt: no prompt column needed.
    ok = write_jsonl(
        tmp_path / "msgs.jsonl", [{"chosen": msgs(f"q{i}", "a"), "rejected": msgs(f"q{i}", "b")} for i in range(4)]
    )
    tr, te, _ = build_datasets(make_config({"src": SourceConfig(path=str(ok))}, test_size=0.5), tok)
    assert len(tr) + len(te) == 4


def test_unsupported_extension_and_unreadable_file(tmp_path, tok, caplog):
    csv = tmp_path / "prefs.csv"
    csv.write_text("prompt,chosen,rejected\np,a,b\n")
    with pytest.raises(DataSourceError, match=r"unsupported extension '\.csv'.*\.jsonl") as err:
        build_datasets(make_config({"src": SourceConfig(path=str(csv))}), tok)
    assert str(csv) in str(err.value)

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p", "chosen": "a", "rejected": \n')
    with pytest.raises(DataSourceError, match="cannot read") as err:
        build_datasets(make_config({"src": SourceConfig(path=str(broken))}), tok)
    # the line, counted from 1; the parser's words (its rows counted from 0) neither in the error nor logged apart
    assert f"first line that is not JSON: {broken}:1 (" in str(err.value) and "row 0" not in str(err.value)
    assert "Failed to load JSON" not in caplog.text
    rows = "".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(3))
    broken.write_text(rows + '{"prompt": "p", "chosen": "a", "rejected": \n' + rows)
    with pytest.raises(DataSourceError) as err:  # the parser counts rows from 0; an editor counts lines from 1
        build_datasets(make_config({"src": SourceConfig(path=str(broken))}), tok)
    assert f"first line that is not JSON: {broken}:4 (" in str(err.value), str(err.value)


def test_a_json_object_of_splits_is_named_as_such(tmp_path, tok):
    both = tmp_path / "both.json"
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    both.write_text(json.dumps({"train": [pair] * 4, "test": [pair] * 2}))
    with pytest.raises(
        DataSourceError, match=r"1 row\(s\) \(columns \['train', 'test'\]\).*a file holds a list of rows"
    ):
        build_datasets(make_config({"src": SourceConfig(path=str(both))}), tok)


def test_a_backup_beside_a_split_file_is_not_read_as_a_shard(tmp_path, tok, caplog):
    """train.orig.jsonl and train-old.jsonl beside train.jsonl were read as shards: every pair trained twice."""
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(12)]
    for name in ("train.jsonl", "train.orig.jsonl", "train-old.jsonl"):
        write_jsonl(tmp_path / "d" / name, rows)
    write_jsonl(tmp_path / "d" / "test.jsonl", rows[:4])
    with caplog.at_level("WARNING"):
        tr, te, _ = build_datasets(make_config({"src": SourceConfig(path=str(tmp_path / "d"))}), tok)
    assert (len(tr), len(te)) == (12, 4)
    assert "train.orig.jsonl" in caplog.text and "train-old.jsonl" in caplog.text
    shards = tmp_path / "hub" / "data"  # hub-style shards are still read together
    write_jsonl(shards / "train-00000-of-00002.jsonl", rows[:6])
    write_jsonl(shards / "train-00001-of-00002-17309c769bfe5733.jsonl", rows[6:])  # the older hub writer's name
    write_jsonl(shards / "test-00000-of-00001.jsonl", rows[:4])
    tr, _, _ = build_datasets(make_config({"src": SourceConfig(path=str(tmp_path / "hub"))}), tok)
    assert len(tr) == 12


def test_uncached_hub_id_fails_fast_with_a_pointer_to_local_files(tok):
    if hub_reachable():
        pytest.skip("the hub is reachable here; this checks the offline path")
    cfg = compose_preset("ultrafeedback-binarized")  # path is the hub id, and nothing is cached
    flags_before = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.raises(DataSourceError) as err:
        build_datasets(cfg, tok)
    msg = str(err.value)
    assert "'HuggingFaceH4/ultrafeedback_binarized'" in msg and "split 'train_prefs'" in msg
    assert "not in datasets' local cache" in msg
    assert "dataset.sources.ultrafeedback_binarized.path=" in msg and "train_prefs.jsonl" in msg
    # The forced offline mode is switched back afterwards.
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == flags_before


def test_a_cached_hub_set_asked_for_a_split_or_config_it_lacks_names_the_key(tok, monkeypatch):
    """Offline, every failure to load a hub set was called a cache miss: a misspelt split of a set in the cache sent
    the user to copy the cache again. datasets' own words (the splits it has) now go with the key to change."""
    cfg = compose_preset("ultrafeedback-binarized")
    cfg.dataset.sources["ultrafeedback_binarized"].train_split = "train_pref"
    said = {
        "Unknown split \"train_pref\". Should be one of ['train_prefs', 'test_prefs'].": (
            r"dataset.sources.ultrafeedback_binarized.train_split='train_pref': .* one of \['train_prefs'"
        ),
        "BuilderConfig 'deafult' not found. Available: ['default']": (
            r"dataset.sources.ultrafeedback_binarized.name=.*BuilderConfig 'deafult' not found"
        ),
    }
    for words, named in said.items():

        def load(*args, words=words, **kwargs):
            raise ValueError(words)

        monkeypatch.setattr(sources_mod, "load_dataset", load)
        with pytest.raises(DataSourceError, match=named) as err:
            build_datasets(cfg, tok)
        assert "local cache" not in str(err.value)


@pytest.fixture
def cached_hub_set(tmp_path, monkeypatch):
    """``HuggingFaceH4/ultrafeedback_binarized`` in datasets' own cache, as a download of commit ``"b" * 40`` leaves
    it (``<org>___<name>/default/0.0.0/<sha>/``), read offline by the real ``load_dataset``."""
    import huggingface_hub

    cache = tmp_path / "datasets-cache"
    parts = {}
    for split in ("train_prefs", "test_prefs"):
        parts[split] = tmp_path / "src" / f"{split}.parquet"
        write_parquet(parts[split], [uf_row(*t) for t in triples(split, 6)])
    datasets.load_dataset("parquet", data_files={k: str(v) for k, v in parts.items()}, cache_dir=str(tmp_path / "pq"))
    (built,) = [p for p in (tmp_path / "pq" / "parquet").glob("*/*/*") if p.is_dir()]
    sha = "b" * 40
    folder = cache / "HuggingFaceH4___ultrafeedback_binarized" / "default" / "0.0.0" / sha
    folder.mkdir(parents=True)
    for f in built.iterdir():
        shutil.copy(f, folder / f.name.replace("parquet-", "ultrafeedback_binarized-"))
    info = json.loads((folder / "dataset_info.json").read_text())
    info |= {
        "builder_name": "ultrafeedback_binarized",
        "config_name": "default",
        "dataset_name": "ultrafeedback_binarized",
    }
    (folder / "dataset_info.json").write_text(json.dumps(info))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(sources_mod, "hub_reachable", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return sha


def test_a_pinned_revision_the_offline_cache_does_not_hold_is_refused(cached_hub_set, tok, caplog):
    """Offline, datasets reads its latest cached copy of a hub set whatever the revision asks: a run pinned to one
    commit trained on another without a word."""
    from simpo_exp.data.sources import load_mixture

    key = "dataset.sources.ultrafeedback_binarized.revision"
    _, sizes = load_mixture(compose_preset("ultrafeedback-binarized", f"{key}={cached_hub_set[:10]}").dataset)
    assert sizes["ultrafeedback_binarized"]["hub_commit"] == cached_hub_set  # the commit pinned is read
    with pytest.raises(DataSourceError, match=rf"{key}='cccccc.*datasets read commit {cached_hub_set} from its cache"):
        load_mixture(compose_preset("ultrafeedback-binarized", f"{key}={'c' * 40}").dataset)
    with caplog.at_level("WARNING", logger="simpo_exp.data"):
        load_mixture(compose_preset("ultrafeedback-binarized", f"{key}=v1.0").dataset)
    assert f"revision='v1.0': read offline from datasets' latest cached copy, commit {cached_hub_set}" in caplog.text


def test_a_config_name_the_offline_cache_lacks_is_named_not_called_a_cache_miss(cached_hub_set, tok):
    """Offline, datasets says a wrong config name in words of its own ("Couldn't find cache ... for config"); the
    error sent the user to download a set that was in the cache."""
    cfg = compose_preset("ultrafeedback-binarized", "dataset.sources.ultrafeedback_binarized.name=deafult")
    with pytest.raises(
        DataSourceError, match=r"sources.ultrafeedback_binarized.name='deafult': .*configs in the cache"
    ):
        build_datasets(cfg, tok)


def test_a_mistyped_local_folder_taken_for_a_hub_id_is_said_to_be_no_local_path(
    cached_hub_set, tok, tmp_path, monkeypatch
):
    """``data/dpo_mix_7k`` (the folder is ``data/dpo mix 7k``) reads as a hub id: the error only said to download
    it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "dpo mix 7k").mkdir(parents=True)
    cfg = compose_preset("local", "dataset.sources.local.path=data/dpo_mix_7k")
    with pytest.raises(DataSourceError, match=r"no local path 'data/dpo_mix_7k' either, though ./data is a folder"):
        build_datasets(cfg, tok)


def test_a_hub_set_records_the_commit_it_was_read_at_and_a_resume_notices_another(tok, monkeypatch, tmp_path):
    """The data presets pin no revision: a connected machine's cache moved on between a run's start and its resume,
    and the run went on with its data position on other data, saying nothing (only local files were compared).
    datasets keeps a hub set's Arrow files under a folder named by its commit: the run records it, a resume
    compares it."""
    from simpo_exp.data.sources import file_changes, load_mixture

    def cached_at(sha: str):
        """A load_dataset reading each split from an Arrow file in datasets' cache layout for commit ``sha``."""

        def load(path, name=None, split=None, revision=None):
            folder = tmp_path / "cache" / "HuggingFaceH4___ultrafeedback_binarized" / "default" / "0.0.0" / sha
            rows = [uf_row(f"{split} {i}", "good answer", "bad answer") for i in range(6)]
            datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved" / sha / split)
            folder.mkdir(parents=True, exist_ok=True)
            arrow = folder / f"ultrafeedback_binarized-{split}.arrow"  # as datasets names a split's file there
            shutil.copy(next((tmp_path / "saved" / sha / split).glob("*.arrow")), arrow)
            return datasets.Dataset.from_file(str(arrow))

        return load

    cfg = compose_preset("ultrafeedback-binarized")
    monkeypatch.setattr(sources_mod, "load_dataset", cached_at("a" * 40))
    _, then = load_mixture(cfg.dataset)
    assert then["ultrafeedback_binarized"]["hub_commit"] == "a" * 40
    monkeypatch.setattr(sources_mod, "load_dataset", cached_at("b" * 40))
    _, now = load_mixture(cfg.dataset)
    assert file_changes(then, now) == [
        "dataset.sources.ultrafeedback_binarized: the hub data set was read at commit aaaaaaaaaaaa then, "
        "bbbbbbbbbbbb now"
    ]
    assert file_changes(then, then) == []
    older = {"ultrafeedback_binarized": {"train_rows": 6, "test_rows": 6}}  # a run from before the record: unchecked
    assert file_changes(older, now) == []
    # a set read from elsewhere than datasets' hub cache layout records nothing it cannot vouch for
    monkeypatch.setattr(sources_mod, "load_dataset", lambda *a, split=None, **k: datasets.Dataset.from_list(
        [uf_row(f"{split} {i}", "good answer", "bad answer") for i in range(6)]))  # fmt: skip
    assert "hub_commit" not in load_mixture(cfg.dataset)[1]["ultrafeedback_binarized"]


# ----------------------------------------------------------------------------- synthetic
def _digits(text: str) -> list[int]:
    return [int(x) for x in text.removeprefix("sort: ").split()]


def test_synthetic_generate_properties():
    cfg = SyntheticConfig(num_train=300, num_test=40, min_digits=3, max_digits=6, seed=5)
    rows = synthetic.generate(cfg)
    assert rows == synthetic.generate(cfg)  # deterministic
    other = synthetic.generate(SyntheticConfig(num_train=300, num_test=40, min_digits=3, max_digits=6, seed=6))
    assert [r["prompt"] for r in other["train_prefs"]] != [r["prompt"] for r in rows["train_prefs"]]
    assert (len(rows["train_prefs"]), len(rows["test_prefs"])) == (300, 40)
    train_p = [r["prompt"] for r in rows["train_prefs"]]
    test_p = [r["prompt"] for r in rows["test_prefs"]]
    assert len(set(train_p)) == 300 and len(set(test_p)) == 40 and not set(train_p) & set(test_p)
    for r in rows["train_prefs"] + rows["test_prefs"]:
        digits = _digits(r["prompt"])
        assert 3 <= len(digits) <= 6
        assert r["chosen"][0] == r["rejected"][0] == {"role": "user", "content": r["prompt"]}
        chosen = [int(x) for x in r["chosen"][1]["content"].split()]
        rejected = [int(x) for x in r["rejected"][1]["content"].split()]
        assert chosen == sorted(digits)
        diff = [i for i in range(len(chosen)) if chosen[i] != rejected[i]]
        assert len(diff) == 2 and diff[1] == diff[0] + 1, (chosen, rejected)
        i = diff[0]
        assert (rejected[i], rejected[i + 1]) == (chosen[i + 1], chosen[i])
        assert r["prompt_id"] == hashlib.sha256(r["prompt"].encode()).hexdigest()
        assert r["messages"] == r["chosen"]


def test_synthetic_too_many_rows_for_the_digit_range_is_refused():
    # Two-digit lists give 100 - 10 = 90 distinct prompts; asking for 91 used to loop forever.
    call_with_alarm(20, synthetic.generate, SyntheticConfig(num_train=80, num_test=10, min_digits=2, max_digits=2))
    with pytest.raises(ConfigError, match="num_train"):
        call_with_alarm(20, synthetic.generate, SyntheticConfig(num_train=81, num_test=10, min_digits=2, max_digits=2))


def test_synthetic_preset_through_build_datasets(tok):
    cfg = compose_preset("synthetic", "dataset.synthetic.num_train=64", "dataset.synthetic.num_test=16")
    tr, te, report = build_datasets(cfg, tok)
    assert report.kept == {"train": 64, "test": 16}
    assert report.dropped == {"train": {}, "test": {}}
    assert not set(pairs_of(tr)) & set(pairs_of(te))
    assert_tokens_match_template(tr, tok)
    tr2, _, _ = build_datasets(cfg, tok)
    assert list(tr2["prompt_input_ids"]) == list(tr["prompt_input_ids"])


# ----------------------------------------------------------------------------- BOS, collator, cache
def test_exactly_one_bos_even_if_the_tokenizer_adds_one(tmp_path):
    tok = build_tiny_tokenizer()
    root = tmp_path / "bos"
    write_jsonl(root / "train.jsonl", [uf_row(*t) for t in triples("b", 3)])
    write_jsonl(root / "test.jsonl", [uf_row(*t) for t in triples("c", 2)])
    cfg = make_config({"s": SourceConfig(path=str(root))})
    tr, _, _ = build_datasets(cfg, tok)
    for p in list(tr["prompt_input_ids"]):
        assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1

    # A tokenizer whose post-processor adds BOS (as Llama's do) must not get a second one.
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)]
    )
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2  # what a naive call would do
    root2 = tmp_path / "bos2"  # other files: nothing cached from the first build
    write_jsonl(root2 / "train.jsonl", [uf_row(*t) for t in triples("d", 3)])
    write_jsonl(root2 / "test.jsonl", [uf_row(*t) for t in triples("e", 2)])
    tr, _, _ = build_datasets(make_config({"s": SourceConfig(path=str(root2))}), tok)
    assert len(tr) == 3
    for p, c in zip(tr["prompt_input_ids"], tr["chosen_input_ids"]):
        assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1 and tok.bos_token_id not in c


def test_a_template_without_bos_gets_one_in_front_of_the_prompt(tmp_path):
    """Mistral-Instruct's template in the official recipe and zephyr-7b-sft-full's write no BOS: the prompt gets
    the tokenizer's BOS in front (as the official SimPO trainer and TRL do), so every sequence has exactly one."""
    tok = build_tiny_tokenizer()
    tok.chat_template = tok.chat_template.replace("{{ bos_token }}", "")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert tok.bos_token not in text  # the template itself writes none
    root = tmp_path / "nobos"
    write_jsonl(root / "train.jsonl", [uf_row(*t) for t in triples("f", 3)])
    write_jsonl(root / "test.jsonl", [uf_row(*t) for t in triples("g", 2)])
    tr, _, report = build_datasets(make_config({"s": SourceConfig(path=str(root))}), tok)
    for p, c in zip(tr["prompt_input_ids"], tr["chosen_input_ids"]):
        assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1 and tok.bos_token_id not in c
    assert report.tokenization["splits"]["train"]["bos_per_sequence"] == {1: 3}


def test_a_bos_the_template_writes_after_leading_whitespace_gets_no_second_one(tmp_path):
    """A hand-written template that opens with a newline before its {{ bos_token }}: the BOS is the template's own,
    and none is put in front (it made ``BOS \\n BOS``, past the double-BOS guard)."""
    tok = build_tiny_tokenizer()
    tok.chat_template = "\n" + tok.chat_template
    root = tmp_path / "leadbos"
    write_jsonl(root / "train.jsonl", [uf_row(*t) for t in triples("f", 3)])
    write_jsonl(root / "test.jsonl", [uf_row(*t) for t in triples("g", 2)])
    tr, _, report = build_datasets(make_config({"s": SourceConfig(path=str(root))}), tok)
    for p in tr["prompt_input_ids"]:
        assert p.count(tok.bos_token_id) == 1 and p[0] != tok.bos_token_id
    assert report.tokenization["splits"]["train"]["bos_per_sequence"] == {1: 3}


def test_collator_layout_padding_and_scored_tokens(tmp_path, tok):
    root = tmp_path / "coll"
    rows = [
        uf_row("p", "a", "a much longer rejected answer"),
        uf_row("a longer prompt here", "chosen!", "r"),
        uf_row("mid prompt", "c", "rr"),
    ]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "test.jsonl", rows)
    _, te, _ = build_datasets(make_config({"s": SourceConfig(path=str(root))}), tok)
    pairs = list(te.select_columns(MODEL_COLUMNS))
    pad = tok.pad_token_id
    batch = PairCollator(pad)(pairs)
    B = len(pairs)
    lengths = [
        len(p["prompt_input_ids"]) + len(p[k]) for k in ("chosen_input_ids", "rejected_input_ids") for p in pairs
    ]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2 * B, max(lengths))
    width = batch["input_ids"].shape[1]
    flat = batch["input_ids"].flatten()
    for i in range(2 * B):
        pair = pairs[i % B]
        response = pair["chosen_input_ids"] if i < B else pair["rejected_input_ids"]
        prompt = pair["prompt_input_ids"]
        n, lp = len(prompt) + len(response), len(prompt)
        assert batch["input_ids"][i, :n].tolist() == prompt + response  # chosen rows first, then rejected
        assert (batch["input_ids"][i, n:] == pad).all()  # right padding
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        # the scored tokens: this row's response, each predicted by the position before it
        mine = batch["target_rows"] == i
        assert batch["target_ids"][mine].tolist() == response
        assert batch["target_sources"][mine].tolist() == [i * width + lp + j - 1 for j in range(len(response))]
        assert flat[batch["target_sources"][mine] + 1].tolist() == response
        assert batch["row_tokens"][i] == batch["row_lengths"][i] == len(response)
    assert batch["target_rows"].tolist() == sorted(batch["target_rows"].tolist())  # row-major order


def test_map_cache_follows_code_changes(tmp_path, monkeypatch):
    """Normalised results are cached by datasets; an edit to the rules must not reuse the old ones."""
    path = write_jsonl(tmp_path / "c.jsonl", [uf_row(*t) for t in triples("c", 4)])
    src = SourceConfig(path=str(path))
    raw = load_split(src, "c", "train", None)
    first = normalise(raw, src, "c")
    again = normalise(raw, src, "c")
    assert first.cache_files and again.cache_files[0]["filename"] == first.cache_files[0]["filename"]
    monkeypatch.setattr(sources_mod, "CODE_VERSION", "edited")
    edited = normalise(raw, src, "c")
    assert edited.cache_files[0]["filename"] != first.cache_files[0]["filename"]


def test_report_counts_are_plain_ints_for_json(tmp_path, tok):
    root = tmp_path / "json"
    write_jsonl(root / "train.jsonl", [uf_row(*t) for t in triples("a", 4)] + [uf_row("x", "s", "s")])
    write_jsonl(root / "test.jsonl", [uf_row(*t) for t in triples("b", 2)])
    _, _, report = build_datasets(make_config({"s": SourceConfig(path=str(root))}), tok)
    back = json.loads(json.dumps(report.__dict__))  # train.py writes it as data_report.json
    assert back["dropped"] == {"train": {"identical responses": 1}, "test": {}}
    assert back["kept"] == {"train": 4, "test": 2}


def test_a_template_that_raises_drops_the_row_with_its_reason():
    from datasets import Dataset

    from simpo_exp.data.tokenize import tokenise
    from simpo_exp.model import TINY_CHAT_TEMPLATE, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}" + TINY_CHAT_TEMPLATE
    )
    rows = [
        {
            "prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}],
            "chosen": "a",
            "rejected": "b",
            "drop_reason": "",
        },
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b", "drop_reason": ""},
    ]
    out = tokenise(Dataset.from_list(rows), tok, max_length=64, max_prompt_length=32)
    assert out[0]["drop_reason"] == "chat template error: System role not supported"
    assert out[1]["drop_reason"] == "" and out[1]["chosen_input_ids"]


# ----------------------------------------------------------------------------- prompt/response token boundary
MISTRAL_STYLE_TEMPLATE = (  # Mistral-7B-Instruct-v0.2's shape: plain-text [INST] markers, the answer right after
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def sentencepiece_style_tokenizer():
    """A BPE tokenizer with a Metaspace pre-tokenizer (``▁`` marks a word start and one is put in front of
    the text), the way Llama-2's and Mistral's tokenizers read text, trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = ["[INST] name a colour [/INST] red is a colour", "the sky is blue and grass is green"] * 20
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
        chat_template=MISTRAL_STYLE_TEMPLATE,
    )  # fmt: skip


def pair_rows(items):
    return [
        {"prompt": [{"role": "user", "content": p}], "chosen": c, "rejected": r, "drop_reason": ""} for p, c, r in items
    ]


def test_sentencepiece_responses_are_tokenised_as_the_whole_conversation_is():
    """Prompt + response ids are the tokenizer's ids for the whole conversation, not the prompt's ids followed
    by the response encoded alone: alone, a Metaspace tokenizer starts the response with an extra ``▁``."""
    from datasets import Dataset

    from simpo_exp.data.tokenize import render, tokenise

    tok = sentencepiece_style_tokenizer()
    items = [("name a colour", "red is a colour", "the sky"), ("name a sky", "blue", "green grass")]
    out = tokenise(Dataset.from_list(pair_rows(items)), tok, max_length=64, max_prompt_length=32)
    alone_differs = 0
    for row, (prompt, *responses) in zip(out, items):
        assert row["drop_reason"] == "" and row["prompt_tokens_moved"] == 0
        conversation = [{"role": "user", "content": prompt}]
        for key, text in zip(("chosen_input_ids", "rejected_input_ids"), responses):
            full = tok.apply_chat_template(conversation + [{"role": "assistant", "content": text}], tokenize=False)
            whole = tok(full, add_special_tokens=False)["input_ids"]
            assert row["prompt_input_ids"] + row[key] == whole
            alone = tok(render(tok, conversation, text)[1], add_special_tokens=False)["input_ids"]
            alone_differs += alone != row[key]
        assert row["prompt_input_ids"][0] == tok.bos_token_id and row["prompt_input_ids"].count(tok.bos_token_id) == 1
    assert alone_differs == 4  # the case this guards against is real for this tokenizer: every response differs


def merging_tokenizer(template: str, bos: str | None = "<s>"):
    """A byte-level tokenizer that merges ': ' into one token (a prompt ending in ':' and an answer starting with a
    space meet inside it), with ``template`` as its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[":Ġ"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[(":", "Ġ")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    special = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="</s>", pad_token="</s>", chat_template=template, **special
    )


def test_a_prompt_that_is_one_token_merged_into_the_answer_is_dropped():
    """No BOS and a prompt whose only token merges with the answer's first: the split would go back to nothing, and
    the whole conversation would train as the answer with an empty prompt. The pair is dropped, saying why."""
    from simpo_exp.data.tokenize import _tokenise_batch

    tok = merging_tokenizer("{% for m in messages %}{{ m['content'] }}{% endfor %}", bos=None)
    assert tok.bos_token_id is None
    batch = {"prompt": [[{"role": "user", "content": ":"}]], "chosen": [" yes"], "rejected": [" no"]}
    out = _tokenise_batch(batch | {"drop_reason": [None]}, tok, 64, 32, chat_format="generation_prompt")
    assert out["drop_reason"] == ["prompt and response tokens merge at the boundary"]


def test_a_response_that_renders_to_no_tokens_is_dropped_on_either_side():
    """A template that writes the messages' contents alone renders an empty answer to no tokens: the pair is dropped
    and counted, on the rejected side as on the chosen one (it stopped the run later, in the collator)."""
    from simpo_exp.data.tokenize import _tokenise_batch

    tok = merging_tokenizer("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    prompt = [{"role": "user", "content": "q"}]
    for chosen, rejected in (("yes", ""), ("", "yes"), ("yes", "no")):
        batch = {"prompt": [prompt], "chosen": [chosen], "rejected": [rejected], "drop_reason": [None]}
        out = _tokenise_batch(batch, tok, 64, 32, chat_format="generation_prompt")
        assert out["drop_reason"] == [None if chosen and rejected else "response has no tokens"], (chosen, rejected)


def test_a_prompt_token_merged_with_the_response_moves_the_split_back_and_is_counted(tmp_path):
    """A template ending in ':' before an answer starting with ' ' under a tokenizer that merges ': ': the split
    goes back one token (the merged token counts as response, as TRL does); prompt ids stay shared by both
    responses, prompt + response ids are the whole conversation's, and the report counts the pair."""
    from datasets import Dataset

    from simpo_exp.data.report import report_lines, tokenization_report
    from simpo_exp.data.tokenize import tokenise

    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tok = merging_tokenizer(template)
    items = [("hi", " yes", " no"), ("hey", "yes", " no")]  # the second chosen answer starts without a space
    out = tokenise(Dataset.from_list(pair_rows(items)), tok, max_length=64, max_prompt_length=32)
    for row, (prompt, *responses) in zip(out, items):
        assert row["drop_reason"] == "" and row["prompt_tokens_moved"] == 1
        rendered_prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)  # fmt: skip
        assert tok.decode(row["prompt_input_ids"]) == rendered_prompt[:-1]  # ends before 'assistant:'s colon
        for key, text in zip(("chosen_input_ids", "rejected_input_ids"), responses):
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
            full = tok.apply_chat_template(msgs, tokenize=False)
            assert tok.decode(row["prompt_input_ids"] + row[key]) == full
    report = tokenization_report({"train": out}, tok, DatasetConfig(name="t", allow_missing_eos=True))
    assert report["splits"]["train"]["prompts_split_inside_a_token"] == 2
    assert "2 prompts end inside a token" in report_lines(report)[1]


def test_an_end_of_turn_token_marked_special_only_among_the_added_tokens_ends_a_response(tmp_path):
    """Meta's Llama-3 files mark <|eot_id|> special in added_tokens_decoder alone (all_special_ids leaves it out
    where EOS is <|end_of_text|>): responses ending in it have their end token, and sampling stops at it."""
    from tokenizers import AddedToken

    from simpo_exp.inference.sampling import end_of_turn_ids

    tok = build_tiny_tokenizer()
    tok.backend_tokenizer.add_special_tokens([AddedToken("<|eot_id|>", special=True)])
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    tok.chat_template = tok.chat_template.replace("+ eos_token", "+ '<|eot_id|>'")
    assert eot not in tok.all_special_ids and tok.added_tokens_decoder[eot].special
    root = tmp_path / "eot"
    write_jsonl(root / "train.jsonl", [uf_row(*t) for t in triples("h", 3)])
    write_jsonl(root / "test.jsonl", [uf_row(*t) for t in triples("i", 2)])
    tr, _, report = build_datasets(make_config({"s": SourceConfig(path=str(root))}), tok)
    assert all(c[-1] == eot for c in tr["chosen_input_ids"])
    assert report.tokenization["splits"]["train"]["responses_without_end_token"] == 0
    assert end_of_turn_ids(tok) == [eot]


def test_the_templates_end_of_turn_token_ends_a_response_when_it_is_also_the_pad_token(tmp_path):
    """A Llama-3 tokenizer whose EOS is <|end_of_text|> and whose pad token was set to <|eot_id|> (a common SFT
    fix-up): the template closes every turn with <|eot_id|>, sampling stops there, and the responses have their end
    token; they were all counted without one and the run refused."""
    from tokenizers import AddedToken

    tok = build_tiny_tokenizer()
    tok.backend_tokenizer.add_special_tokens([AddedToken("<|eot_id|>", special=True)])
    tok.pad_token = "<|eot_id|>"
    eot = tok.pad_token_id
    tok.chat_template = tok.chat_template.replace("+ eos_token", "+ '<|eot_id|>'")
    assert eot != tok.eos_token_id
    root = tmp_path / "padeot"
    write_jsonl(root / "train.jsonl", [uf_row(*t) for t in triples("h", 3)])
    write_jsonl(root / "test.jsonl", [uf_row(*t) for t in triples("i", 2)])
    tr, _, report = build_datasets(make_config({"s": SourceConfig(path=str(root))}), tok)
    assert all(c[-1] == eot for c in tr["chosen_input_ids"])
    assert report.tokenization["splits"]["train"]["responses_without_end_token"] == 0


# A zephyr-style template that renders any role the same way, and names no system turn.
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# A zephyr-style template with a system branch, as zephyr-7b-sft-full's (alignment-handbook's default) has one.
SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + eos_token + '\n' }}"
    "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template", [NO_SYSTEM_TEMPLATE, SYSTEM_TEMPLATE, ZEPHYR_CHAT_TEMPLATE], ids=["no-system", "system", "zephyr"]
)
def test_simpo_repo_chat_format_cuts_prompt_and_responses_as_the_official_script(template):
    """dataset.chat_format=simpo_repo: the prompt without the generation prompt (an empty system turn first where
    the template has a system branch), each response its assistant turn rendered alone, header included, so the
    header's tokens count in |y|; the default keeps the header in the prompt, as TRL does."""
    from simpo_exp.data.tokenize import _tokenise_batch

    tok = build_tiny_tokenizer()
    tok.chat_template = template
    batch = {"prompt": [[{"role": "user", "content": "sort 3 1 2"}]], "chosen": ["1 2 3"], "rejected": ["3 2 1"]}
    batch["drop_reason"] = [None]
    trl = _tokenise_batch(batch, tok, 256, 128)
    repo = _tokenise_batch(batch, tok, 256, 128, chat_format="simpo_repo")
    text = lambda out, col: tok.decode(out[col][0])  # noqa: E731
    assert (
        text(trl, "prompt_input_ids").endswith("<|assistant|>\n") and text(trl, "chosen_input_ids") == "1 2 3<|eos|>\n"
    )
    # the official trainer puts EOS after a response that does not end with it (here the template's newline)
    assert text(repo, "chosen_input_ids") == "<|assistant|>\n1 2 3<|eos|>\n<|eos|>"
    assert text(repo, "rejected_input_ids") == "<|assistant|>\n3 2 1<|eos|>\n<|eos|>"
    # the built-in zephyr template is alignment-handbook's default, system branch included (it had none: no turn)
    system = "" if template == NO_SYSTEM_TEMPLATE else "<|system|>\n<|eos|>\n"
    assert text(repo, "prompt_input_ids") == f"<|bos|>{system}<|user|>\nsort 3 1 2<|eos|>\n"
    if not system:  # the same tokens (and the EOS), cut elsewhere
        whole = lambda out: out["prompt_input_ids"][0] + out["chosen_input_ids"][0]  # noqa: E731
        assert whole(repo) == whole(trl) + [tok.eos_token_id]
        assert len(repo["chosen_input_ids"][0]) > len(trl["chosen_input_ids"][0])


def test_simpo_repo_cuts_responses_to_the_official_budget_and_leaves_an_exact_fit_whole():
    """The official tokenize_row cuts the responses to max_length - max_prompt_length whenever a pair is too long,
    a short prompt's too (not to what the prompt leaves), and cuts nothing from a pair of exactly max_length."""
    from simpo_exp.data.tokenize import _tokenise_batch

    tok = build_tiny_tokenizer()
    tok.chat_template = ZEPHYR_CHAT_TEMPLATE
    batch = {"prompt": [[{"role": "user", "content": "hi"}]], "chosen": ["1 " * 40], "rejected": ["2"]}
    batch["drop_reason"] = [None]
    whole = _tokenise_batch(batch, tok, 4096, 2048, chat_format="simpo_repo")
    p, c = len(whole["prompt_input_ids"][0]), len(whole["chosen_input_ids"][0])
    assert p < 32 < c
    short = _tokenise_batch(batch, tok, p + 40, 32, chat_format="simpo_repo")  # too long by c - 40 tokens
    assert short["prompt_input_ids"] == whole["prompt_input_ids"] and short["prompt_truncated"] == [False]
    assert len(short["chosen_input_ids"][0]) == 40 + p - 32 and short["chosen_truncated"] == [True]
    exact = _tokenise_batch(batch, tok, p + c, p - 2, chat_format="simpo_repo")
    assert (
        exact["prompt_input_ids"] == whole["prompt_input_ids"]
        and exact["chosen_input_ids"] == whole["chosen_input_ids"]
    )
    assert exact["prompt_truncated"] == exact["chosen_truncated"] == [False]


# A Qwen2.5-style template: a default system turn of its own wherever the first message is not a system turn
# (Llama-3.1's templates write a dated one the same way).
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_simpo_repo_is_refused_for_a_template_that_writes_its_own_system_turn(tmp_path):
    """Rendered alone, the assistant turn of such a template starts with the whole default system turn: every
    response carried it, in |y|, the reward and the SFT term, and nothing said so. The recipes' own templates
    pass; the default chat format takes this one."""
    from simpo_exp.config import ConfigError
    from simpo_exp.data.tokenize import _tokenise_batch, check_chat_format

    tok = build_tiny_tokenizer()
    for template in (ZEPHYR_CHAT_TEMPLATE, SYSTEM_TEMPLATE):
        tok.chat_template = template
        check_chat_format(tok, "simpo_repo")
    tok.chat_template = DEFAULT_SYSTEM_TEMPLATE
    check_chat_format(tok, "generation_prompt")
    batch = {"prompt": [[{"role": "user", "content": "sort 3 1 2"}]], "chosen": ["1 2 3"], "rejected": ["3 2 1"]}
    batch["drop_reason"] = [None]
    repo = _tokenise_batch(batch, tok, 256, 128, chat_format="simpo_repo")
    assert "You are helpful." in tok.decode(repo["chosen_input_ids"][0])  # what the refusal keeps out of training
    with pytest.raises(ConfigError, match="dataset.chat_format=simpo_repo .*You are helpful.*generation_prompt"):
        check_chat_format(tok, "simpo_repo")
    root = tmp_path / "own-system"
    write_jsonl(root / "train.jsonl", [uf_row(*t) for t in triples("h", 3)])
    write_jsonl(root / "test.jsonl", [uf_row(*t) for t in triples("i", 2)])
    cfg = make_config({"s": SourceConfig(path=str(root))})
    cfg.dataset.chat_format = "simpo_repo"
    with pytest.raises(ConfigError, match="dataset.chat_format=simpo_repo"):
        build_datasets(cfg, tok)
    # Gemma's template names "system" only to refuse it: the probe died with a bare jinja TemplateError
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + SYSTEM_TEMPLATE
    )
    with pytest.raises(ConfigError, match="refuses it .*System role not supported.*simpo-gemma2-9b-it"):
        check_chat_format(tok, "simpo_repo")
    # Mistral-Instruct's own template: roles alternate from a user turn, no system turn is put in (the message said
    # the template refused one)
    tok.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ConfigError, match="lone assistant turn .*must alternate.*simpo-mistral-7b-instruct") as e:
        check_chat_format(tok, "simpo_repo")
    assert "system" not in str(e.value)


def test_a_generation_prompt_the_conversation_does_not_start_with_names_its_rows_reason():
    """DeepSeek-R1-style templates add "<think>\\n" to the generation prompt only: the answer's start cannot be told
    from the prompt, and every row drops under a reason that says so (it said the template "does not extend the
    prompt")."""
    from simpo_exp.data.tokenize import _tokenise_batch

    tok = build_tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|><think>\\n' }}{% endif %}"
    )
    batch = {"prompt": [[{"role": "user", "content": "sort 3 1 2"}]], "chosen": ["1 2 3"], "rejected": ["3 2 1"]}
    out = _tokenise_batch(batch | {"drop_reason": [None]}, tok, 256, 128, chat_format="generation_prompt")
    assert out["drop_reason"] == [
        "chat template's generation prompt is not how the conversation renders the answer's start"
    ]
    # one answer of the two that starts as the generation prompt ends: the other still names the template, not
    # "response has no tokens" (which sent users to their data)
    for chosen, rejected in (("<think>\n1 2 3", "3 2 1"), ("1 2 3", "<think>\n3 2 1")):
        one = batch | {"chosen": [chosen], "rejected": [rejected], "drop_reason": [None]}
        out = _tokenise_batch(one, tok, 256, 128, chat_format="generation_prompt")
        assert out["drop_reason"] == [
            "chat template's generation prompt is not how the conversation renders the answer's start"
        ]


def test_a_tokenizer_with_several_named_templates_trains(tmp_path):
    """Hermes-2-Pro's and Command-R's tokenizers ship a default and a tool-use template: transformers loads them as
    a dict, which the template hash took for a string (AttributeError in the data step), and simpo_repo's "does the
    template mention a system turn" read the dict's keys."""
    from simpo_exp.data.tokenize import prompt_messages
    from simpo_exp.model import chat_template_hash

    tok = build_tiny_tokenizer()
    tok.chat_template = {"default": SYSTEM_TEMPLATE, "tool_use": ZEPHYR_CHAT_TEMPLATE}
    assert len(chat_template_hash(tok)) == 12
    assert chat_template_hash(tok) != chat_template_hash(build_tiny_tokenizer())
    user = [{"role": "user", "content": "hi"}]
    assert prompt_messages(tok, user, "simpo_repo")[0] == {"role": "system", "content": ""}
    root = tmp_path / "named"
    write_jsonl(root / "train.jsonl", [uf_row(*t) for t in triples("h", 3)])
    write_jsonl(root / "test.jsonl", [uf_row(*t) for t in triples("i", 2)])
    train, _, report = build_datasets(make_config({"s": SourceConfig(path=str(root))}), tok)
    assert len(train) == 3 and report.tokenization["chat_template_sha256"] == chat_template_hash(tok)


def test_model_revision_is_the_models_commit_not_a_separate_tokenizers(monkeypatch):
    """A commit pinned for model.path was looked up in model.tokenizer_path's repo too: "not on this machine" for
    a tokenizer repo that was in the cache."""
    import transformers

    from simpo_exp import model as model_module
    from simpo_exp.config import ModelConfig

    asked = []
    monkeypatch.setattr(model_module, "check_model_available", lambda path, revision, *_, **__: asked.append(revision))
    monkeypatch.setattr(model_module, "check_tokenizer_files", lambda path, what: None)
    monkeypatch.setattr(
        transformers.AutoTokenizer,
        "from_pretrained",
        lambda path, **kw: asked.append(kw["revision"]) or build_tiny_tokenizer(),
    )
    commit = "a" * 40
    model_module.load_tokenizer(ModelConfig(name="m", path="org/model", revision=commit))
    model_module.load_tokenizer(ModelConfig(name="m", path="org/model", revision=commit, tokenizer_path="org/tok"))
    assert asked == [commit, commit, commit, None, None]  # the model's own config at its commit, the tokenizer's not


def test_simpo_repo_chat_format_truncates_as_the_official_trainer():
    """SimPOTrainer.tokenize_row (keep_end): a prompt that does not fit beside the longer response keeps its last
    max_prompt_length tokens (kept, not dropped); where they still do not fit, both responses are cut to
    max_length - max_prompt_length, the shorter one too."""
    from simpo_exp.data.tokenize import _tokenise_batch

    tok = build_tiny_tokenizer()
    tok.chat_template = ZEPHYR_CHAT_TEMPLATE
    question = " ".join(str(i % 10) for i in range(40))
    batch = {"prompt": [[{"role": "user", "content": question}]], "chosen": ["1 " * 30], "rejected": ["2"]}
    batch["drop_reason"] = [None]
    ours = _tokenise_batch(batch, tok, 64, 32)
    assert ours["drop_reason"] == ["prompt too long"]
    repo = _tokenise_batch(batch, tok, 64, 32, chat_format="simpo_repo")
    full_prompt = _tokenise_batch(batch, tok, 4096, 2048, chat_format="simpo_repo")["prompt_input_ids"][0]
    assert repo["drop_reason"] == [None] and repo["prompt_input_ids"][0] == full_prompt[-32:]
    assert len(repo["chosen_input_ids"][0]) == 64 - 32 and repo["chosen_truncated"] == [True]
    assert len(repo["rejected_input_ids"][0]) < 32 and repo["rejected_truncated"] == [False]
    assert repo["prompt_truncated"] == [True] and full_prompt != repo["prompt_input_ids"][0]  # counted in the report
    assert ours["prompt_truncated"] == [False]


def test_the_official_recipes_cut_pairs_as_the_official_script(compose):
    for name in ("simpo-mistral-7b-base", "simpo-llama3-8b-instruct", "simpo-gemma2-9b-it"):
        assert compose(f"experiment={name}").dataset.chat_format == "simpo_repo"
    assert compose().dataset.chat_format == "generation_prompt"
    with pytest.raises(ConfigError, match="dataset.chat_format='chatml'"):
        to_config(compose("dataset.chat_format=chatml"))


def test_max_eval_samples_on_a_mixture_draws_from_every_source_and_the_cut_is_reported(tmp_path, tok):
    """The test split is the sources one after another: the first max_eval_samples pairs were all the first
    source's. The pairs a limit leaves out were in no count of data_report.json."""
    for name in ("a", "b"):
        rows = [{"prompt": f"{name}{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
        write_jsonl(tmp_path / name / "train.jsonl", rows)
        write_jsonl(tmp_path / name / "test.jsonl", rows)
    sources = {n: SourceConfig(path=str(tmp_path / n)) for n in ("a", "b")}
    tr, te, report = build_datasets(make_config(sources, max_eval_samples=10, max_train_samples=30), tok)
    firsts = {p[0]["content"][0] for p in te["prompt"]}
    assert len(te) == 10 and firsts == {"a", "b"}
    assert report.cut == {"train": 10, "test": 30} and report.kept == {"train": 30, "test": 10}
    assert "10 more left out by dataset.max_*_samples" in report.lines()[0]
    again = build_datasets(make_config(sources, max_eval_samples=10, max_train_samples=30), tok)[1]
    assert again["prompt"] == te["prompt"]  # the same draw every time (dataset.shuffle_seed)
    whole = [p[0]["content"] for p in build_datasets(make_config(sources), tok)[1]["prompt"]]
    drawn = [whole.index(p[0]["content"]) for p in te["prompt"]]
    assert drawn == sorted(drawn)  # kept in the split's order (a source's pairs together), not in the draw's
    other = build_datasets(make_config(sources, max_eval_samples=10, max_train_samples=30, shuffle_seed=7), tok)[1]
    assert other["prompt"] != te["prompt"]  # the draw is the seed's, as the train shuffle is


def test_the_truncated_prompt_count_is_of_the_pairs_kept_after_a_cut(tmp_path, tok):
    """dataset.chat_format=simpo_repo keeps a long prompt's last tokens and the report counts the prompts it cut:
    counted, as the responses' cuts are, on the pairs a max_train_samples cut leaves."""
    rows = [
        {"prompt": ("long question " * 40 if i % 2 else "short") + f" {i}", "chosen": "good", "rejected": "bad"}
        for i in range(12)
    ]
    write_jsonl(tmp_path / "s" / "train.jsonl", rows)
    write_jsonl(tmp_path / "s" / "test.jsonl", rows[:4])
    cfg = make_config({"s": SourceConfig(path=str(tmp_path / "s"))}, 192, 64, chat_format="simpo_repo")
    whole = build_datasets(cfg, tok)[2].truncated["train"]["prompt"]
    assert whole == 6  # every long prompt, before a cut
    cfg = make_config(
        {"s": SourceConfig(path=str(tmp_path / "s"))}, 192, 64, chat_format="simpo_repo", max_train_samples=5
    )
    tr, _, report = build_datasets(cfg, tok)
    assert report.truncated["train"]["prompt"] == sum(tr["prompt_truncated"]) < whole


def test_text_that_is_not_utf8_names_the_source_and_row(tmp_path, tok):
    """pyarrow loads the bytes as they are; a bare UnicodeDecodeError came out of the normalising map."""
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(12)]
    text = write_jsonl(tmp_path / "utf8.jsonl", rows).read_bytes()
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(text.replace(b"good 3", "gööd 3".encode("latin-1")))
    with pytest.raises(
        DataSourceError, match=r"dataset.sources.src \(.*latin1.jsonl\): .*latin1.jsonl line 4 holds text that is not"
    ):
        build_datasets(make_config({"src": SourceConfig(path=str(bad))}, test_size=0.25), tok)


def test_a_test_split_that_is_not_read_is_said_so(tmp_path, tok, caplog):
    """A single file with test_split set, or a directory with a validation file but no test file: the test split
    was carved out of train without a word."""
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(12)]
    one = write_jsonl(tmp_path / "train_prefs.jsonl", rows)
    with caplog.at_level("WARNING"):
        build_datasets(make_config({"src": SourceConfig(path=str(one), test_split="test_prefs")}, test_size=0.25), tok)
    assert "test_split='test_prefs' is not read" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # a train split named for one file: the file is the train split whatever it says
        build_datasets(make_config({"src": SourceConfig(path=str(one), train_split="train_sft")}, test_size=0.25), tok)
    assert "train_split='train_sft' names nothing in it" in caplog.text
    caplog.clear()
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    write_jsonl(tmp_path / "d" / "validation.jsonl", rows[:4])
    with caplog.at_level("WARNING"):
        build_datasets(
            make_config({"src": SourceConfig(path=str(tmp_path / "d"), test_split=None)}, test_size=0.25), tok
        )
    assert "set dataset.sources.src.test_split=validation" in caplog.text


def test_a_presets_own_test_share_stays_its_own_in_a_mixture(tmp_path, tok):
    """distilabel-math's 0.1 was dataset.test_size, so in dataset=[local,distilabel-math] the local source lost
    0.1 of its train rows to the test split instead of 0.05."""
    mine = write_jsonl(
        tmp_path / "mine.jsonl", [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(40)]
    )
    math = write_jsonl(tmp_path / "math.jsonl", [distilabel_row(*t) for t in triples("math", 20)])
    cfg = compose_preset(
        "[local,distilabel-math]", f"dataset.sources.local.path={mine}", path_override("distilabel_math", math)
    )
    _, te, report = build_datasets(cfg, tok)
    assert len(te) == 2 + 2  # 0.05 of 40 and 0.1 of 20


def test_length_percentiles_interpolate_between_neighbours():
    """The median of a two-pair split was reported as its larger length (a nearest-rank pick, rounded up)."""
    from simpo_exp.data.report import _quantiles

    assert _quantiles([27, 19]) == {"min": 19, "p50": 23.0, "p90": 26.2, "max": 27, "mean": 23.0}
    ten = _quantiles(list(range(1, 11)))
    assert (ten["p50"], ten["p90"]) == (5.5, 9.1)  # numpy.percentile's default (linear) gives the same
    assert _quantiles([7])["p50"] == 7 and _quantiles([]) == {}


def test_a_data_fingerprint_names_files_by_their_place_in_the_source(tmp_path):
    """The same files under another folder are the same data; a changed or renamed one is named."""
    from simpo_exp.config import SourceConfig
    from simpo_exp.data.sources import file_changes, fingerprint

    for folder in ("a", "b"):
        (tmp_path / folder / "data").mkdir(parents=True)
        for split in ("train", "test"):
            (tmp_path / folder / "data" / f"{split}.jsonl").write_text(f'{{"split": "{split}"}}\n')
    a, b = (fingerprint(SourceConfig(path=str(tmp_path / f))) for f in ("a", "b"))
    assert a["files"] == b["files"] and sorted(a["files"]) == ["data/test.jsonl", "data/train.jsonl"]
    assert file_changes({"s": a}, {"s": b}) == []
    (tmp_path / "b" / "data" / "train.jsonl").write_text('{"split": "other"}\n')
    (tmp_path / "b" / "data" / "test.jsonl").rename(tmp_path / "b" / "data" / "test-00000.jsonl")
    changes = file_changes({"s": a}, {"s": fingerprint(SourceConfig(path=str(tmp_path / "b")))})
    where = f"dataset.sources.s ({tmp_path / 'b'})"
    assert changes[0] == f"{where}: data/test-00000.jsonl is read now and was not then"
    assert changes[1] == f"{where}: data/test.jsonl is no longer read (gone or renamed)"
    assert changes[2].startswith(f"{where}: data/train.jsonl changed (sha256 ")
    one = fingerprint(SourceConfig(path=str(tmp_path / "a" / "data" / "train.jsonl")))
    assert list(one["files"]) == ["train.jsonl"] and fingerprint(SourceConfig(path="synthetic")) == {}


def test_data_reached_through_links_is_fingerprinted_and_loads(tmp_path):
    """A hub snapshot's data/*.parquet are links into blobs/: naming a file by its resolved path under the source's
    folder failed (not a subpath), and every run on such data with it."""
    from simpo_exp.config import SourceConfig
    from simpo_exp.data.sources import fingerprint, load_split

    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc" / "data"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    row = uf_row("p", "good", "bad")
    write_jsonl(blobs / "1f2e3d", [row])
    (snapshot / "train.jsonl").symlink_to(blobs / "1f2e3d")
    src = SourceConfig(path=str(tmp_path / "snapshots" / "abc"))
    assert list(fingerprint(src)["files"]) == ["data/train.jsonl"]
    assert len(load_split(src, "s", "train", None)) == 1


def test_an_edit_that_keeps_a_files_time_is_read_anew_and_fingerprinted_as_sha256sum_would(tmp_path, monkeypatch):
    """datasets knows a local file by path and time: rewritten with its time kept (cp -p, rsync -a), it was read
    from the cache as it was, and resume=false trained on the old rows while recording the new file's hash."""
    import hashlib
    import os

    import datasets

    from simpo_exp.config import SourceConfig
    from simpo_exp.data.sources import fingerprint, load_split
    from simpo_exp.inference.files import _sha256_cached

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "prefs.jsonl"
    write_jsonl(data, [uf_row(f"p{i}", "good", "bad") for i in range(4)])
    src = SourceConfig(path=str(data))
    assert len(load_split(src, "s", "train", None)) == 4
    kept = os.stat(data)
    write_jsonl(data, [uf_row(f"q{i}", "good", "bad") for i in range(2)])
    os.utime(data, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    _sha256_cached.cache_clear()  # as a new process starts
    assert [r["prompt"] for r in load_split(src, "s", "train", None)] == ["q0", "q1"]
    assert fingerprint(src)["files"] == {"prefs.jsonl": hashlib.sha256(data.read_bytes()).hexdigest()}


def test_a_mixture_source_of_no_usable_rows_is_named_and_test_prompts_seen_in_training_are_counted(
    tmp_path, tok, caplog
):
    """A source of another schema (ShareGPT's roles) loses every row: the run trained on the other sources alone
    and exited 0. Now refused, naming the source; its drops are kept per source. Test pairs whose prompt training
    also reads (two sets built from the same prompts) are counted and warned about."""
    uf_train, uf_test, arg, overrides = _mix_files(tmp_path)
    turns = lambda p, reply: [{"role": "human", "content": p}, {"role": "gpt", "content": reply}]  # noqa: E731
    sharegpt = [{"prompt": p, "chosen": turns(p, c), "rejected": turns(p, r)} for p, c, r in arg]
    write_jsonl(tmp_path / "argilla" / "train.jsonl", sharegpt)
    said = r"none of its 19 train rows is a usable pair \(dropped: \{'chosen does not end with an assistant turn': 19"
    with pytest.raises(DataSourceError, match=rf"dataset.sources.argilla_ultrafeedback_cleaned: {said}"):
        build_datasets(compose_preset("ultrafeedback-mix", *overrides), tok)

    # argilla's train rows carry the UltraFeedback test prompts (other answers): read in training, held out in test
    leaked = [argilla_row(*t) for t in arg[:30]] + [argilla_row(p, c + " again", r) for p, c, r in uf_test]
    write_jsonl(tmp_path / "argilla" / "train.jsonl", leaked)
    cfg = compose_preset("ultrafeedback-mix", *overrides, "dataset.sources.argilla_ultrafeedback_cleaned.fraction=1")
    with caplog.at_level("WARNING", logger="simpo_exp.data"):
        tr, te, report = build_datasets(cfg, tok)
    test_prompts = [row["prompt"][0]["content"] for row in te]
    expected = sum(p in {row["prompt"][0]["content"] for row in tr} for p in test_prompts)
    assert report.test_prompts_in_train == expected >= len(uf_test) - 1  # one may be carved into argilla's test
    assert f"{expected} of the test pairs have a prompt that training also reads" in caplog.text
    assert report.sources["argilla_ultrafeedback_cleaned"]["dropped"] == {"train": {}, "test": {}}


def test_dropped_rows_are_named_by_file_and_line(tmp_path, tok, caplog):
    """Dropped rows were named by their running number over a source's files: in a folder of shards, or a JSON lines
    file with blank lines, not where to look. Now by file and line (JSON lines) or row in the file (parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    long = " ".join(["word"] * 200)
    row = lambda i, prompt="q": {"prompt": f"{prompt} {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}  # noqa: E731
    lines = [row(0), row(1), row(2, long), row(3), row(4, long)]
    text = "\n".join(json.dumps(r) for r in lines[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in lines[2:]) + "\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.jsonl").write_text(text)  # a blank line after the second row
    (tmp_path / "a" / "test.jsonl").write_text(json.dumps(row(9)) + "\n")
    shards = tmp_path / "b" / "data"
    shards.mkdir(parents=True)
    for n, rows in enumerate(([row(i) for i in range(4)], [row(4), row(5, long), row(6)])):
        pq.write_table(pa.Table.from_pylist(rows), shards / f"train-{n:05d}-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([row(9)]), shards / "test-00000-of-00001.parquet")
    sources = {n: SourceConfig(path=str(tmp_path / n)) for n in ("a", "b")}
    with caplog.at_level("INFO", logger="simpo_exp.data"):
        build_datasets(make_config(sources, max_length=256, max_prompt_length=64), tok)
    said = "dataset.sources.a train: 2 rows dropped (prompt too long): train.jsonl line 4, train.jsonl line 6\n"
    assert said in caplog.text, caplog.text
    said = "dataset.sources.b train: 1 rows dropped (prompt too long): data/train-00001-of-00002.parquet row 1\n"
    assert said in caplog.text, caplog.text


def test_a_mixture_source_that_tokenising_empties_is_named_and_its_drops_are_counted_per_source(tmp_path, tok, caplog):
    """Drops made while tokenising (prompt too long, a chat template's refusal) were counted per split only: a
    source all of whose prompts were too long left the run on the other source with data_report.json saying it
    dropped nothing. They are now counted per source, and such a source is refused as at normalising."""
    long = " ".join(["word"] * 200)
    for name, prompt in (("a", "short {i}"), ("b", long + " {i}")):
        rows = [{"prompt": prompt.format(i=i), "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
        write_jsonl(tmp_path / name / "train.jsonl", rows)
        write_jsonl(tmp_path / name / "test.jsonl", rows[:4])
    sources = {n: SourceConfig(path=str(tmp_path / n)) for n in ("a", "b")}
    said = r"dataset.sources.b: none of its 20 train rows is a usable pair \(dropped: \{'prompt too long': 20\}\)"
    with pytest.raises(DataSourceError, match=said):
        build_datasets(make_config(sources, max_length=256, max_prompt_length=64), tok)

    half = [
        {"prompt": (long if i % 2 else "b") + f" {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)
    ]
    write_jsonl(tmp_path / "b" / "train.jsonl", half)  # every other prompt too long; its test rows all are
    with caplog.at_level("INFO", logger="simpo_exp.data"):
        tr, te, report = build_datasets(make_config(sources, max_length=256, max_prompt_length=64), tok)
    # where the dropped rows are: their files and lines (counts alone left 60k rows to search)
    said = "dataset.sources.b train: 10 rows dropped (prompt too long): train.jsonl line 2, train.jsonl line 4, "
    assert said + "train.jsonl line 6, train.jsonl line 8, train.jsonl line 10, ..." in caplog.text
    said = "dataset.sources.b test: 4 rows dropped (prompt too long): test.jsonl line 1, test.jsonl line 2, "
    assert said + "test.jsonl line 3, test.jsonl line 4\n" in caplog.text
    assert report.sources["a"]["dropped"] == {"train": {}, "test": {}}
    assert report.sources["b"]["dropped"] == {"train": {"prompt too long": 10}, "test": {"prompt too long": 4}}
    assert len(tr) == 30 and set(tr["source"]) == {"a", "b"}
    assert report.lines()[-1] == "dataset.sources.b: usable train pairs 10 of 20, test 0 of 4"


def test_hub_shard_sets_that_are_incomplete_or_mixed_are_refused(tmp_path, tok):
    """A download cut short (shard 1 of 2 missing) trained on half the data; an old set beside a new one trained on
    every row twice. Both refused, naming the shards."""
    rows = [armorm_row(*t) for t in triples("a", 6)]
    data = tmp_path / "armorm" / "data"
    write_parquet(data / "train-00000-of-00002.parquet", rows[:3])
    write_parquet(data / "test-00000-of-00001.parquet", rows[3:])
    cfg = compose_preset("llama3-ultrafeedback-armorm", path_override("llama3_ultrafeedback_armorm", data.parent))
    with pytest.raises(DataSourceError, match=r"split 'train' lacks shard\(s\) 00001 of 2"):
        build_datasets(cfg, tok)
    (data / "train-00000-of-00002.parquet").rename(data / "kept")  # the first shard missing is named as well
    write_parquet(data / "train-00001-of-00002.parquet", rows[3:])
    with pytest.raises(DataSourceError, match=r"split 'train' lacks shard\(s\) 00000 of 2"):
        build_datasets(cfg, tok)
    (data / "kept").rename(data / "train-00000-of-00002.parquet")
    build_datasets(cfg, tok)  # whole: read
    write_parquet(data / "train-00000-of-00001.parquet", rows)
    with pytest.raises(DataSourceError, match=r"split 'train' has shards of 2 sets \(-of-00001, -of-00002"):
        build_datasets(cfg, tok)
    # a set of the same count under other names: the older hub writer's hashed names beside a re-upload's
    (data / "train-00000-of-00001.parquet").unlink()
    for n in (0, 1):
        (data / f"train-0000{n}-of-00002.parquet").rename(data / f"train-0000{n}-of-00002-f198c941cb94b0ba.parquet")
    build_datasets(cfg, tok)  # one set, hashed names: read
    write_parquet(data / "train-00000-of-00002.parquet", rows[:3])
    write_parquet(data / "train-00001-of-00002.parquet", rows[3:])
    with pytest.raises(DataSourceError, match=r"split 'train' has shard 00000 more than once \(train-00000-of-00002-f"):
        build_datasets(cfg, tok)


def test_a_split_written_twice_in_one_folder_is_refused(tmp_path, tok):
    """A merged train.parquet saved beside the hub's shards, or train.json beside train.jsonl: every file was read,
    so every pair trained twice (an INFO line on repeated pairs the only sign)."""
    rows = [armorm_row(*t) for t in triples("a", 6)]
    data = tmp_path / "armorm" / "data"
    write_parquet(data / "train-00000-of-00002.parquet", rows[:3])
    write_parquet(data / "train-00001-of-00002.parquet", rows[3:])
    write_parquet(data / "test-00000-of-00001.parquet", rows[:2])
    write_parquet(data / "train.parquet", rows)
    cfg = compose_preset("llama3-ultrafeedback-armorm", path_override("llama3_ultrafeedback_armorm", data.parent))
    with pytest.raises(DataSourceError, match=r"split 'train' is in .*train.parquet alone can hold all of it"):
        build_datasets(cfg, tok)
    (data / "train.parquet").unlink()
    assert build_datasets(cfg, tok)[2].sources["llama3_ultrafeedback_armorm"]["train_rows"] == 6
    local = tmp_path / "local"
    write_jsonl(local / "train.jsonl", [uf_row(*t) for t in triples("b", 6)])
    (local / "train.json").write_text(json.dumps([uf_row(*t) for t in triples("b", 6)]))
    write_jsonl(local / "test.jsonl", [uf_row(*t) for t in triples("c", 2)])
    with pytest.raises(DataSourceError, match=r"split 'train' is in \['train.json', 'train.jsonl'\]"):
        build_datasets(compose_preset("local", f"dataset.sources.local.path={local}"), tok)


def test_a_test_file_read_as_the_train_splits_counterpart_binds_the_run(tmp_path):
    """train_split=train_prefs beside test_prefs.jsonl: the test pairs were read from it, but only the train file
    was fingerprinted, so an edited test file neither stopped a resume nor made a finished run train again."""
    from simpo_exp.data.sources import fingerprint, source_files

    local = tmp_path / "uf"
    write_jsonl(local / "train_prefs.jsonl", [uf_row(*t) for t in triples("a", 4)])
    write_jsonl(local / "test_prefs.jsonl", [uf_row(*t) for t in triples("b", 2)])
    src = SourceConfig(path=str(local), train_split="train_prefs", test_split=None)
    assert [f.name for f in source_files(src)] == ["test_prefs.jsonl", "train_prefs.jsonl"]
    assert set(fingerprint(src)["files"]) == {"test_prefs.jsonl", "train_prefs.jsonl"}


def test_held_out_overlap_is_counted_on_the_pairs_used_and_inert_dataset_keys_are_said(tmp_path, tok, caplog):
    """test_prompts_in_train was counted before the drops and the max_*_samples cuts: it said several times the
    overlap of the pairs trained and evaluated on. And a test_size that no source carves with, or a hub name and
    revision on a local folder, were taken without a word (a sweep over one trains one run under several names)."""
    local = tmp_path / "local"
    shared = triples("a", 40)
    write_jsonl(local / "train.jsonl", [uf_row(*t) for t in shared])
    # train's prompts, each in two test pairs: the count is of test pairs, not of prompts
    write_jsonl(local / "test.jsonl", [uf_row(p, c + again, r) for p, c, r in shared for again in (" a", " b")])
    overrides = [f"dataset.sources.local.path={local}", "dataset.max_train_samples=3", "dataset.shuffle_seed=1"]
    with caplog.at_level("WARNING", logger="simpo_exp.data"):
        train, test, report = build_datasets(compose_preset("local", *overrides), tok)
    used = {row["prompt"][0]["content"] for row in train}
    assert report.test_prompts_in_train == sum(row["prompt"][0]["content"] in used for row in test) < len(test)
    assert report.test_prompts_in_train == 2 * len(used) == 6  # the 3 pairs trained on, not the 40 before the cut
    assert "is not used" not in caplog.text
    inert = ["dataset.test_size=0.5", "dataset.sources.local.test_size=0.3", "+dataset.sources.local.revision=v1"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="simpo_exp.data"):
        build_datasets(compose_preset("local", *overrides, *inert), tok)
    assert "dataset.test_size=0.5 is not used" in caplog.text
    assert "dataset.sources.local.test_size=0.3 is not used: the source's test split is read ('test')" in caplog.text
    assert "revision='v1' are a hub data set's" in caplog.text


def test_files_that_hold_no_rows_or_no_objects_and_a_share_that_empties_a_side_are_named(tmp_path, tok):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    with pytest.raises(DataSourceError, match=r"blank.jsonl holds no rows \(blank lines only\)"):
        build_datasets(make_config({"s": SourceConfig(path=str(blank))}), tok)
    listed = write_jsonl(tmp_path / "listed.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3)
    listed.write_text(listed.read_text() + "[1, 2]\n")
    with pytest.raises(DataSourceError, match=r"first line that is not a JSON object: .*listed.jsonl:4 \(a list"):
        build_datasets(make_config({"s": SourceConfig(path=str(listed))}), tok)
    small = write_jsonl(
        tmp_path / "small.jsonl", [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    )
    with pytest.raises(DataSourceError, match=r"dataset.test_size=0.99 cannot carve a test split out of the 3 train"):
        build_datasets(make_config({"s": SourceConfig(path=str(small))}, test_size=0.99), tok)
    with pytest.raises(DataSourceError, match=r"dataset.sources.s.test_size=0.99 cannot carve"):
        build_datasets(make_config({"s": SourceConfig(path=str(small), test_size=0.99)}), tok)


def test_the_token_report_read_from_arrow_batches_counts_what_a_row_by_row_reading_does():
    """The report reads id columns as numpy arrays in batches of 4096 rows (Python lists of every id took 2.1 GB
    per process at UltraFeedback's size): on 9000 random rows and 20 repeated, across batch edges, with BOS at the
    start, inside and doubled, responses closed or not, cut or not, its counts equal a plain row-by-row count."""
    import random
    from collections import Counter
    from types import SimpleNamespace

    from datasets import Dataset

    from simpo_exp.data import report

    rng = random.Random(0)
    bos, eos, blank = 1, 2, 3  # 3 decodes to whitespace: a closed turn may end "<eos> " as chatml's does
    rows = []
    for _ in range(9000):
        prompt = [bos] * rng.choice([0, 1, 1, 1, 2]) + [rng.randrange(4, 50) for _ in range(rng.randrange(0, 6))]
        chosen = [rng.choice([4, 5, bos]) for _ in range(rng.randrange(1, 5))] + rng.choice([[eos], [eos, blank], []])
        rejected = [rng.randrange(4, 50) for _ in range(rng.randrange(1, 40))] + rng.choice([[eos], [7]])
        rows.append((prompt, chosen, rejected, rng.random() < 0.1, rng.random() < 0.1, rng.choice([0, 0, 1])))
    rows += rows[4090:4110]  # repeated pairs, one of each across a batch edge from its first
    n = len(rows)
    ds = Dataset.from_dict(
        {
            k: [r[i] for r in rows]
            for i, k in enumerate(
                ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "chosen_truncated",
                 "rejected_truncated", "prompt_tokens_moved"]
            )
        }
    )  # fmt: skip
    tok = SimpleNamespace(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=0, bos_token="<s>", chat_template="",
        decode=lambda ids: " " if ids == [blank] else "x", convert_ids_to_tokens=lambda ids: [str(i) for i in ids],
    )  # fmt: skip
    ends = lambda ids: bool(ids) and (ids[-1] == eos or ids[-2:] == [eos, blank])  # noqa: E731
    dcfg = SimpleNamespace(allow_double_bos=True, allow_missing_eos=True)
    real = report.end_token_ids
    try:
        report.end_token_ids = lambda t: {eos}
        got = report.tokenization_report({"train": ds}, tok, dcfg)["splits"]["train"]
    finally:
        report.end_token_ids = real
    assert got["bos_per_sequence"] == dict(sorted(Counter(p.count(bos) + c.count(bos) for p, c, *_ in rows).items()))
    missing = sum(not cut and not ends(ids) for p, c, r, ct, rt, _ in rows for ids, cut in ((c, ct), (r, rt)))
    assert got["responses_without_end_token"] == missing > 0
    assert got["prompts_split_inside_a_token"] == sum(1 for *_, moved in rows if moved)
    assert got["truncated_share"] == {
        "chosen": sum(r[3] for r in rows) / n,
        "rejected": sum(r[4] for r in rows) / n,
    }
    assert got["lengths"]["rejected"]["max"] == max(len(r[2]) for r in rows)
    pairs = [(tuple(p), tuple(c), tuple(r)) for p, c, r, *_ in rows]
    assert got["duplicate_pairs"] == len(pairs) - len(set(pairs)) >= 20
    assert "pairs repeat an earlier one token for token" in " ".join(
        report.report_lines({"chat_template_sha256": "-", "splits": {"train": got}})
    )
    doubled = sum(1 for p, c, *_ in rows if report.doubled_bos(p[:2] + c[:2], bos))
    dcfg.allow_double_bos = False
    with pytest.raises(ConfigError, match=f"{doubled} of {n} train sequences start with two BOS"):
        report.end_token_ids = lambda t: {eos}
        try:
            report.tokenization_report({"train": ds}, tok, dcfg)
        finally:
            report.end_token_ids = real


def test_the_saved_chat_template_writes_the_bos_training_put_first(tmp_path):
    """Where the chat template writes no BOS, training puts the tokenizer's before every sequence; the saved
    model/ kept the template as it was, and apply_chat_template(tokenize=True) (no special tokens added) prompted
    the trained model without it. The saved template writes it: the ids are training's."""
    from transformers import AutoTokenizer

    from simpo_exp.data.tokenize import render, with_bos
    from simpo_exp.model import TINY_CHAT_TEMPLATE, save_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = TINY_CHAT_TEMPLATE.removeprefix("{{ bos_token }}")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sort 3 1 2"}]
    prompt_text, _ = render(tok, messages, "1 2 3")
    trained = with_bos(tok, tok(prompt_text, add_special_tokens=False)["input_ids"])
    assert trained[0] == tok.bos_token_id and not prompt_text.startswith(tok.bos_token)
    assert save_tokenizer(tok, tmp_path / "model") and tok.chat_template == TINY_CHAT_TEMPLATE.removeprefix(
        "{{ bos_token }}"
    )  # the tokenizer in memory as it was
    saved = AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = saved.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == trained
    tok.chat_template = TINY_CHAT_TEMPLATE  # writes its own BOS: saved as it is
    assert not save_tokenizer(tok, tmp_path / "own")
    assert AutoTokenizer.from_pretrained(tmp_path / "own").chat_template == TINY_CHAT_TEMPLATE
    # its own BOS after a leading newline: written, as training counted it (a second one made the saved model's
    # prompts BOS \n BOS, which training never saw)
    tok.chat_template = "\n" + TINY_CHAT_TEMPLATE
    trained = with_bos(tok, tok(render(tok, messages, "1 2 3")[0], add_special_tokens=False)["input_ids"])
    assert not save_tokenizer(tok, tmp_path / "newline")
    saved = AutoTokenizer.from_pretrained(tmp_path / "newline")
    ids = saved.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == trained


def test_a_prompt_turn_the_chat_template_leaves_out_drops_its_pair():
    """Qwen2.5's and Zephyr's templates render the roles they know and skip any other without a word: rows whose
    prompt turns said ``User`` or ``human`` trained with the question missing (the prompt was the template's header
    alone). Such pairs drop under a reason naming the role."""
    from simpo_exp.data.tokenize import _tokenise_batch

    tok = build_tiny_tokenizer()
    tok.chat_template = (  # renders user, system and assistant turns, nothing of any other
        "{{ bos_token }}{% for m in messages %}{% if m['role'] in ['user', 'system', 'assistant'] %}"
        "{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    prompts = [
        [{"role": "user", "content": "sort 3 1 2"}],
        [{"role": "User", "content": "sort 3 1 2"}],
        [{"role": "system", "content": "Be brief."}, {"role": "human", "content": "sort 9 8"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think>hello"},
         {"role": "user", "content": "sort 5 4"}],
    ]  # fmt: skip
    batch = {"prompt": prompts, "chosen": ["1 2 3"] * 4, "rejected": ["3 2 1"] * 4, "drop_reason": [None] * 4}
    out = _tokenise_batch(batch, tok, 256, 128, chat_format="generation_prompt")
    assert out["drop_reason"] == [
        None,
        "chat template leaves out the prompt's 'User' turn",
        "chat template leaves out the prompt's 'human' turn",
        None,
    ]


def test_a_column_of_mixed_kinds_is_refused_naming_its_line(tmp_path, tok):
    """datasets reads a JSON column whose rows differ in kind as Json and decodes every string in it that parses:
    with one number among the answers, "42" became 42 (dropped as non-string, beside the real culprit) and '"Yes"'
    trained as Yes, and the rows named were the wrong ones. The file is refused at its first other kind of value;
    without that row the strings are read as written."""
    rows = [{"prompt": f"question {i}?", "chosen": f"answer {i}", "rejected": f"no {i}"} for i in range(8)]
    rows[5]["chosen"], rows[6]["chosen"] = "42", '"Yes"'
    path = write_jsonl(tmp_path / "clean" / "prefs.jsonl", rows)
    tr, te, _ = build_datasets(make_config({"s": SourceConfig(path=str(path), format="strings")}, test_size=0.25), tok)
    texts = {tok.decode(ids) for ids in [*tr["chosen_input_ids"], *te["chosen_input_ids"]]}
    assert any("42" in t for t in texts) and any('"Yes"' in t for t in texts)
    rows[3]["chosen"] = 123
    path = write_jsonl(tmp_path / "mixed" / "prefs.jsonl", rows)
    with pytest.raises(DataSourceError, match=rf"column 'chosen' holds values of more than one kind .*int at {path}:4"):
        build_datasets(make_config({"s": SourceConfig(path=str(path), format="strings")}, test_size=0.25), tok)
    # the hub's message lists: one number among the contents typed the column List({role, content: Json}), which
    # decoded every content that parses ("41" dropped as non-string, '"No"' trained as No): refused the same way
    turns = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    rows = [
        {"prompt": f"q{i}", "chosen": turns(f"q{i}", f"yes {i}"), "rejected": turns(f"q{i}", f"no {i}")}
        for i in range(8)
    ]
    rows[2]["rejected"] = turns("q2", '"No"')
    path = write_jsonl(tmp_path / "turns" / "prefs.jsonl", rows)
    tr, te, _ = build_datasets(make_config({"s": SourceConfig(path=str(path))}, test_size=0.25), tok)
    assert any('"No"' in tok.decode(ids) for ids in [*tr["rejected_input_ids"], *te["rejected_input_ids"]])
    rows[6]["rejected"][1]["content"] = 7
    path = write_jsonl(tmp_path / "dirty" / "prefs.jsonl", rows)
    with pytest.raises(
        DataSourceError, match=rf"'rejected' holds .*\(a list of str at {path}:1, a list of int/str at {path}:7"
    ):
        build_datasets(make_config({"s": SourceConfig(path=str(path))}, test_size=0.25), tok)


def test_a_response_ends_a_turn_only_where_its_end_token_is_last_but_for_whitespace(tok):
    """The report's "responses without end token" guard (a model trained on them never learns to stop): an end
    token followed by the template's newline ends the turn; one followed by more text does not."""
    from simpo_exp.data.report import ends_a_turn

    ends = ends_a_turn(tok, {tok.eos_token_id})
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ends(ids(f"a b{tok.eos_token}\n")) and ends(ids(f"a b{tok.eos_token}"))
    assert not ends(ids(f"a{tok.eos_token}b c")) and not ends(ids("a b"))


def test_a_tokenizer_without_a_pad_token_pads_with_its_eos(tmp_path):
    """Llama's and Mistral's hub tokenizers name no pad token: the collator needs one, so EOS stands in."""
    from transformers import AutoTokenizer

    from simpo_exp.config import ModelConfig
    from simpo_exp.model import load_tokenizer
    from tests.tiny import save_tiny_llama

    save_tiny_llama(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token_id is None
    loaded = load_tokenizer(ModelConfig(name="m", path=str(tmp_path)))
    assert loaded.pad_token_id == loaded.eos_token_id is not None


def test_a_pair_the_template_renders_alike_is_said_to_be_so_not_truncated():
    """Responses that differ only in whitespace a template trims (Llama-3-Instruct's ``| trim``) render alike: the
    pair was dropped as "identical after truncation" with no response truncated, a report that contradicts itself."""
    from simpo_exp.data.tokenize import _tokenise_batch

    tok = build_tiny_tokenizer()
    tok.chat_template = NO_SYSTEM_TEMPLATE.replace("m['content']", "(m['content'] | trim)")
    prompt = [{"role": "user", "content": "sort 3 1 2"}]
    batch = {"prompt": [prompt, prompt], "chosen": ["1 2 3", "A" * 120 + "x"], "rejected": ["1 2 3\n", "A" * 120 + "y"]}
    batch["drop_reason"] = [None, None]
    out = _tokenise_batch(batch, tok, 96, 32)
    assert out["drop_reason"] == ["identical once rendered by the chat template", "identical after truncation"]
    assert out["chosen_truncated"] == [False, True]


def test_the_tokenised_cache_is_keyed_by_the_tokenising_code(tmp_path, monkeypatch):
    """datasets keys a map's cache by the function's name, not its code: an edited tokenising rule reused the ids
    cached before the edit. The file's hash (``CODE_VERSION``) is in the key: the same code reads its cache back,
    other code tokenises again."""
    from simpo_exp.data import tokenize

    rows = {"prompt": [[{"role": "user", "content": "hi"}]], "chosen": ["a"], "rejected": ["b"], "drop_reason": [None]}
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "rows")
    ds = datasets.load_from_disk(str(tmp_path / "rows"))  # on disk: map caches its result beside it
    tok = build_tiny_tokenizer()
    first = tokenize.tokenise(ds, tok, 64, 32)
    assert tokenize.tokenise(ds, tok, 64, 32)._fingerprint == first._fingerprint
    monkeypatch.setattr(tokenize, "CODE_VERSION", "edited")
    assert tokenize.tokenise(ds, tok, 64, 32)._fingerprint != first._fingerprint


def test_a_template_that_writes_todays_date_is_warned_about_and_keys_the_cache_by_day(monkeypatch, caplog):
    """Llama-3.1 to 3.3 Instruct's templates write 'Today Date' into every prompt: the same data tokenised to other
    ids on another day, silently, and datasets' cache handed a later run the first day's prompts."""
    import datetime as dt

    from transformers.utils import chat_template_utils

    from simpo_exp.data.tokenize import dated_template, tokenise

    tok = build_tiny_tokenizer()
    tok.chat_template = "{{ bos_token }}Today Date: {{ strftime_now('%d %b %Y') }}" + NO_SYSTEM_TEMPLATE.removeprefix(
        "{{ bos_token }}"
    )
    assert dated_template(build_tiny_tokenizer()) is None
    seen = []
    ds = datasets.Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": "hi"}]], "chosen": ["a"], "rejected": ["b"], "drop_reason": [None]}
    )
    real = datasets.Dataset.map

    def spy(self, *args, **kwargs):
        seen.append(kwargs["fn_kwargs"]["rendered_on"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    for day in (dt.date(2026, 12, 4), dt.date(2026, 12, 5)):
        monkeypatch.setattr(dt, "date", type("D", (dt.date,), {"today": staticmethod(lambda day=day: day)}))
        monkeypatch.setattr(
            chat_template_utils,
            "datetime",
            type("T", (), {"now": staticmethod(lambda day=day: dt.datetime(day.year, day.month, day.day))}),
        )
        with caplog.at_level("WARNING"):
            out = tokenise(ds, tok, 64, 32)
        assert f"Today Date: {day.strftime('%d %b %Y')}" in tok.decode(out[0]["prompt_input_ids"])
    assert seen == ["2026-12-04", "2026-12-05"]  # in the cache key: the second day is not the first day's cache
    assert "writes today's date into every prompt" in caplog.text


# ----------------------------------------------------------------------------- from a mutation review of sources.py
def test_a_small_fraction_keeps_at_least_one_row_of_its_source(tmp_path):
    """fraction=0.1 of a 3-row train split was 0 rows: the mixture trained on the other sources without a word."""
    from simpo_exp.data.sources import load_source

    file = write_jsonl(tmp_path / "train.jsonl", [uf_row(*t) for t in triples("f", 6)])
    src = SourceConfig(path=str(file), test_split=None, fraction=0.1)
    train, test = load_source("s", src, DatasetConfig(test_size=0.5))
    assert (len(train), len(test)) == (1, 3)


def test_the_synthetic_source_by_path_alone_and_a_split_it_lacks():
    import re

    from simpo_exp.data.sources import source_files

    assert len(load_split(SourceConfig(path="synthetic"), "s", "train_prefs", SyntheticConfig())) > 0
    assert source_files(SourceConfig(path="synthetic")) == []
    said = (
        f"dataset.sources.s: the synthetic source has splits {list(synthetic.generate(SyntheticConfig()))}, not 'train'"
    )
    with pytest.raises(DataSourceError, match=re.escape(said)):
        load_split(SourceConfig(path="synthetic", format="synthetic"), "s", "train", SyntheticConfig())


def test_a_folder_of_two_file_types_for_one_split_is_named(tmp_path):
    from simpo_exp.data.sources import load_source

    rows = [uf_row(*t) for t in triples("m", 4)]
    write_jsonl(tmp_path / "train-00000-of-00002.jsonl", rows[:2])
    pq.write_table(pa.Table.from_pylist(rows[2:]), tmp_path / "train-00001-of-00002.parquet")
    with pytest.raises(DataSourceError, match="mixed file types"):
        load_source("s", SourceConfig(path=str(tmp_path), test_split=None), DatasetConfig())


def test_a_provenance_record_beside_the_files_read_is_found_and_an_unreadable_task_skipped(tmp_path, caplog):
    """A hub-style data/ subfolder holds the files and their provenance.json; a task record of unknown keys (another
    version's) is skipped for the next readable one, with a warning."""
    import logging

    from simpo_exp.data.sources import provenance, recorded_task, source_files

    write_jsonl(tmp_path / "data" / "train-00000-of-00001.jsonl", [uf_row(*t) for t in triples("p", 2)])
    (tmp_path / "data" / "provenance.json").write_text(json.dumps({"synthetic_task": {"seed": 3}}))
    src = SourceConfig(path=str(tmp_path), test_split=None)
    record = provenance(str(tmp_path), source_files(src))
    assert record["provenance"]["file"].endswith("data/provenance.json")
    with caplog.at_level(logging.WARNING, logger="simpo_exp.data.sources"):
        task = recorded_task([{"provenance": {"synthetic_task": {"bogus": 1}}}, record])
    assert task.seed == 3 and "unreadable synthetic_task record" in caplog.text


def test_the_held_out_overlap_counts_test_pairs_not_distinct_prompts():
    """The warning counts the test pairs whose prompt a train pair has: a prompt two test pairs share counts twice
    (several pairs per prompt, or two sources sharing it), train pairs repeating one count nothing extra, and the
    role is part of the prompt."""
    from datasets import Dataset

    from simpo_exp.data import _test_prompts_in_train

    conv = lambda text, role="user": [{"role": role, "content": text}]  # noqa: E731
    train = Dataset.from_dict({"prompt": [conv("a"), conv("c"), conv("d")]})
    test = Dataset.from_dict({"prompt": [conv("a"), conv("a"), conv("b")]})
    assert _test_prompts_in_train(train, test) == 2
    train = Dataset.from_dict({"prompt": [conv("a"), conv("a")]})
    assert _test_prompts_in_train(train, Dataset.from_dict({"prompt": [conv("a"), conv("b")]})) == 1
    assert _test_prompts_in_train(train, Dataset.from_dict({"prompt": [conv("a", "system")]})) == 0


def test_a_kind_that_changes_past_the_first_chunk_or_shard_is_refused_not_quoted(tmp_path, tok):
    """datasets checks a JSON column's kinds chunk by chunk (10 MB) and shard by shard: a number in the second shard,
    or past the first 10 MB of one file, turned that chunk's column into JSON text while its type still read string,
    so every answer of the chunk trained in quotes ('"good 3"') and nothing was refused. Refused now, naming the
    line."""
    rows = [{"prompt": f"q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    shards = tmp_path / "shards"
    write_jsonl(shards / "train-00000-of-00002.jsonl", rows)
    second = write_jsonl(shards / "train-00001-of-00002.jsonl", [*rows[:4], {**rows[4], "chosen": 42}])
    with pytest.raises(DataSourceError, match=rf"column 'chosen' holds values of more than one .*int at {second}:5"):
        build_datasets(make_config({"s": SourceConfig(path=str(shards), format="strings")}, test_size=0.25), tok)
    filler = "x" * 1000  # about 12 MB: the number lands in datasets' second chunk of the file
    many = [{"prompt": f"q{i}?", "chosen": f"good {i} {filler}", "rejected": f"bad {i}"} for i in range(12_000)]
    many[-1]["chosen"] = 7
    big = write_jsonl(tmp_path / "big" / "prefs.jsonl", many)
    with pytest.raises(DataSourceError, match=rf"column 'chosen' holds .*int at {big}:12000"):
        build_datasets(make_config({"s": SourceConfig(path=str(big), format="strings")}, test_size=0.25), tok)


def test_a_save_to_disk_folder_is_named_as_such(tmp_path, tok):
    """A folder written by datasets' save_to_disk was refused as having no file for the split, listing its metadata
    files as the splits there ("dataset_dict, dataset_info, state"): it is named for what it is, with the way out."""
    from simpo_exp.data.sources import splits_in

    rows = [{"prompt": f"q{i}?", "chosen": "a", "rejected": "b"} for i in range(4)]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    with pytest.raises(DataSourceError, match=r"written by datasets' save_to_disk \(dataset_dict.json\).*to_json"):
        build_datasets(make_config({"src": SourceConfig(path=str(saved))}), tok)
    write_jsonl(tmp_path / "mixed" / "train.jsonl", rows)
    (tmp_path / "mixed" / "dataset_info.json").write_text("{}")  # metadata beside a data file: no split of its own
    assert splits_in(tmp_path / "mixed") == ["train"]
