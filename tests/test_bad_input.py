"""Bad input gets a clear message naming the problem (exit status 2), or a counted drop; never a lost run."""

import json

import pytest

from tests.test_run import simpo

TINY = [
    "max_steps=2",
    "eval_steps=0",
    "logging_steps=1",
    "logger=none",
    "dataset.synthetic.num_train=64",
    "dataset.synthetic.num_test=16",
]


def pref(prompt, chosen, rejected):
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
    }


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_misspelled_key_and_option(tmp_path):
    res = simpo("betta=5", cwd=tmp_path)
    assert res.returncode != 0 and "betta" in res.stderr
    res = simpo("hparams=resoning", cwd=tmp_path)
    assert res.returncode != 0 and "resoning" in res.stderr and "reasoning" in res.stderr  # lists the options


def test_missing_data_file(tmp_path):
    res = simpo("dataset=local", f"dataset.sources.local.path={tmp_path}/nope.jsonl", *TINY, cwd=tmp_path)
    assert res.returncode == 2 and "nope.jsonl" in res.stderr and "no such file" in res.stderr
    assert "Traceback" not in res.stderr


def test_wrong_columns(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"question": "q", "good": "a", "bad": "b"}] * 20)
    res = simpo("dataset=local", f"dataset.sources.local.path={data}", *TINY, cwd=tmp_path)
    assert res.returncode == 2
    assert "missing column(s)" in res.stderr and "'chosen'" in res.stderr and "'good'" in res.stderr


def test_bad_rows_are_dropped_and_counted(tmp_path):
    rows = [pref(f"sort: {i} 3 1", "1 3 " + str(i), "3 1 " + str(i)) for i in range(40)]
    rows += [pref("p", "same", "same")] * 3  # identical responses
    rows += [pref("p", "", "x")] * 2  # empty response
    rows += [{"prompt": "p", "chosen": None, "rejected": None}]  # missing
    rows += [pref("x" * 400, "a", "b")]  # prompt longer than max_prompt_length (128 tokens for tiny)
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    run = tmp_path / "run"
    res = simpo(
        "dataset=local",
        f"dataset.sources.local.path={data}",
        "dataset.test_size=0.2",
        "eval_on_start=false",  # only the data report is checked
        "num_generations=0",
        f"hydra.run.dir={run}",
        *TINY,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((run / "data_report.json").read_text())
    dropped = {}
    for split in ("train", "test"):
        for reason, n in report["dropped"][split].items():
            dropped[reason] = dropped.get(reason, 0) + n
    assert dropped == {
        "identical responses": 3,
        "empty response": 2,
        "missing chosen/rejected": 1,
        "prompt too long": 1,
    }
    assert report["kept"]["train"] + report["kept"]["test"] == 40


def test_nothing_usable_left(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", [pref("p", "same", "same")] * 10)
    res = simpo("dataset=local", f"dataset.sources.local.path={data}", *TINY, cwd=tmp_path)
    assert res.returncode == 2 and "no usable preference pair" in res.stderr and "identical responses" in res.stderr


@pytest.fixture(scope="module")
def saved_model_without_template(tmp_path_factory):
    from tests.tiny import save_tiny_llama

    path = tmp_path_factory.mktemp("m") / "plain-model"
    tok = save_tiny_llama(path)
    tok.chat_template = None
    tok.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


def test_tokenizer_without_chat_template(tmp_path, saved_model_without_template):
    res = simpo("model=qwen2.5-0.5b-instruct", f"model.path={saved_model_without_template}", *TINY, cwd=tmp_path)
    assert res.returncode == 2
    assert "no chat template" in res.stderr and "model.chat_template=zephyr" in res.stderr


def test_local_model_with_a_template_trains(tmp_path, saved_model_without_template):
    """The real-model path (from_pretrained on a local directory) end to end."""
    run = tmp_path / "run"
    res = simpo(
        "model=qwen2.5-0.5b-instruct",
        f"model.path={saved_model_without_template}",
        "model.chat_template=zephyr",
        "model.dtype=float32",
        f"hydra.run.dir={run}",
        "max_length=256",
        "max_prompt_length=128",
        "per_device_train_batch_size=4",
        "gradient_accumulation_steps=1",
        *TINY,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["train/global_step"] == 2


def test_a_model_directory_without_a_tokenizer_or_with_a_larger_one_is_named(tmp_path, saved_model_without_template):
    """Weights without tokenizer files; a tokenizer with more tokens than the embedding has rows; a file given
    for the model directory: each stops before training, naming the key and the directory."""
    import shutil

    from transformers import AutoTokenizer

    model = ["model=qwen2.5-0.5b-instruct", "model.chat_template=zephyr", *TINY]
    bare = tmp_path / "weights-only"
    shutil.copytree(saved_model_without_template, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tok*"))
    res = simpo(*model, f"model.path={bare}", cwd=tmp_path)
    assert res.returncode == 2 and "has no tokenizer files" in res.stderr and str(bare) in res.stderr, res.stderr
    assert "model.tokenizer_path" in res.stderr and "Traceback" not in res.stderr

    bigger = tmp_path / "bigger-tokenizer"
    shutil.copytree(saved_model_without_template, bigger)
    tok = AutoTokenizer.from_pretrained(bigger)
    tok.add_tokens([f"<extra_{i}>" for i in range(8)])
    tok.save_pretrained(bigger)
    res = simpo(*model, f"model.path={bigger}", cwd=tmp_path)
    assert res.returncode == 2 and f"the tokenizer has {len(tok)} tokens" in res.stderr, res.stderr[-3000:]

    res = simpo(*model, f"model.path={bigger / 'config.json'}", cwd=tmp_path)
    assert res.returncode == 2 and "is a file" in res.stderr


def test_a_model_config_transformers_cannot_read_is_named_before_the_data(tmp_path, saved_model_without_template):
    """config.json that is not JSON, a model_type this transformers does not know (a typo), or model code of its
    own without trust_remote_code: transformers' traceback, after the data was tokenised, named a Python argument
    rather than the key. Each is now named before anything loads; a family transformers runs itself loads whatever
    auto_map its config carries (Phi-3's)."""
    import shutil

    from simpo_exp.hub import ModelNotFoundError, check_model_available

    def edited(name: str, change):
        folder = tmp_path / name
        shutil.copytree(saved_model_without_template, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(change(config))
        return folder

    broken = edited("broken", lambda c: json.dumps(c)[:-5])
    with pytest.raises(ModelNotFoundError, match=r"config.json cannot be read as JSON"):
        check_model_available(str(broken))
    typo = edited("typo", lambda c: json.dumps(c | {"model_type": "qwen22"}))
    with pytest.raises(ModelNotFoundError, match=r"model_type='qwen22', which transformers 5\.\d+"):
        check_model_available(str(typo))
    own = edited("own", lambda c: json.dumps(c | {"model_type": "mine", "auto_map": {"AutoConfig": "m.C"}}))
    with pytest.raises(ModelNotFoundError, match="model.trust_remote_code=true"):
        check_model_available(str(own), trust_remote_code=False)
    check_model_available(str(own), trust_remote_code=True)  # transformers runs its code then
    native = edited("native", lambda c: json.dumps(c | {"auto_map": {"AutoConfig": "m.C"}}))
    check_model_available(str(native), trust_remote_code=False)
    from simpo_exp.config import ModelConfig
    from simpo_exp.model import load_tokenizer  # what training calls before the data step

    with pytest.raises(ModelNotFoundError, match="model_type='qwen22'"):
        load_tokenizer(ModelConfig(name="m", path=str(typo)))
    with pytest.raises(ModelNotFoundError, match="model.trust_remote_code=true"):  # its tokenizer given apart too
        load_tokenizer(ModelConfig(name="m", path=str(own), tokenizer_path=str(native)))


def test_output_dir_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = simpo(f"output_dir={blocker}/run", *TINY, cwd=tmp_path)
    assert res.returncode == 2 and "output_dir=" in res.stderr and "not a writable directory" in res.stderr


@pytest.mark.parametrize(
    "stage, args",
    [
        ("simpo_exp", ["hydra.run.dir={blocker}/run"]),
        ("simpo_exp", ["--multirun", "hydra.sweep.dir={blocker}/sweep", "beta=2,3"]),
        ("simpo_exp.generate", ["hydra.run.dir={blocker}/gen"]),
    ],
)
def test_a_run_or_sweep_folder_that_cannot_be_written_is_named(tmp_path, stage, args):
    """The README's way of choosing the folder (hydra.run.dir, hydra.sweep.dir): Hydra makes it before the stage's
    own check, and stopped with its traceback and exit status 1."""
    from tests.runs import run_module

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = run_module(stage, *[a.format(blocker=blocker) for a in args], cwd=tmp_path)
    key = "hydra.sweep.dir" if "--multirun" in args else "hydra.run.dir"
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"error: {key}='{blocker}/" in res.stderr and "is not a writable directory (Not a directory)" in res.stderr


def test_processes_checking_one_output_dir_at_once_do_not_fail_each_other(tmp_path, monkeypatch):
    """Every process of a run checks that the run directory is writable, at about the same moment. Here a second
    process (another pid) makes its whole check while the first has written its probe file and not yet removed
    it: both pass. With one probe name for all, the second removed the first's file and the first failed with
    "not a writable directory (No such file or directory)" (seen in CI on two processes)."""
    import os
    from pathlib import Path

    from simpo_exp.train import check_writable

    real_write, pids, writes = Path.write_text, iter([111, 222]), []
    monkeypatch.setattr(os, "getpid", lambda: next(pids))

    def write_then_let_the_other_process_check(self, *args, **kwargs):
        out = real_write(self, *args, **kwargs)
        writes.append(self.name)
        if len(writes) == 1:
            check_writable(tmp_path)  # the other process, between this one's write and unlink
        return out

    monkeypatch.setattr(Path, "write_text", write_then_let_the_other_process_check)
    assert check_writable(tmp_path) == tmp_path
    assert len(writes) == 2
    assert not list(tmp_path.iterdir())  # each probe removed by its own process


def test_unreachable_wandb_does_not_stop_the_run(tmp_path):
    run = tmp_path / "run"
    res = simpo(
        *TINY,
        "logger=wandb",
        "logger.mode=online",
        "logger.init_timeout=2",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        env={"WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "W&B online start failed" in (run / "__main__.log").read_text()
    assert "logging offline instead" in (run / "__main__.log").read_text()
    assert json.loads((run / "summary.json").read_text())["train/global_step"] == 2
    assert json.loads((run / "wandb_run.json").read_text())["mode"] == "offline"  # a record to sync later


def test_trust_remote_code_is_off_by_default(compose):
    from simpo_exp.config import to_config

    for model in ("llama3-8b", "qwen2.5-0.5b-instruct", "tiny"):
        assert to_config(compose(f"model={model}")).model.trust_remote_code is False


def test_a_model_whose_weights_were_cut_short_is_named(tmp_path, compose):
    """A run killed while saving its model leaves model/ with weights cut short: training on it, sampling from it and
    evaluating it ended in safetensors' "incomplete metadata" traceback."""
    import os

    from simpo_exp.config import to_config
    from simpo_exp.hub import ModelNotFoundError
    from simpo_exp.model import load_model, load_tokenizer
    from tests.tiny import save_tiny_llama

    path = tmp_path / "run" / "model"
    save_tiny_llama(path)
    (tmp_path / "run" / ".hydra").mkdir()  # a training run's model/: the hint names how to finish the run
    weights = path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    cfg = to_config(compose("model=qwen2.5-0.5b-instruct", f"model.path={path}", "model.chat_template=zephyr"))
    with pytest.raises(
        ModelNotFoundError, match=r"its weights cannot be read \(SafetensorError.*killed while it saved"
    ):
        load_model(cfg, load_tokenizer(cfg.model), "sdpa")
    weights.unlink()  # the save cut before the weights were written
    with pytest.raises(ModelNotFoundError, match=r"its weights cannot be read \(OSError"):
        load_model(cfg, load_tokenizer(cfg.model), "sdpa")


def test_a_checkpoint_without_the_lm_head_is_refused_as_the_policy(tmp_path, compose):
    """A reward model (its score head, no lm_head) given as model.path loaded as a causal LM with the output head
    drawn at random, and the run trained, sampled and finished with rc=0 (transformers only logged it); the set-up
    log-prob check cannot see it, as the model's own forward uses the same random head. A whole causal LM loads."""
    from transformers import LlamaForSequenceClassification

    from simpo_exp.config import ConfigError, to_config
    from simpo_exp.model import load_model, load_tokenizer
    from tests.tiny import save_tiny_llama

    save_tiny_llama(tmp_path / "rm", LlamaForSequenceClassification, num_labels=1)
    save_tiny_llama(tmp_path / "lm")
    for name in ("rm", "lm"):
        path = tmp_path / name
        cfg = to_config(compose("model=qwen2.5-0.5b-instruct", f"model.path={path}", "model.chat_template=zephyr"))
        if name == "lm":
            assert load_model(cfg, load_tokenizer(cfg.model), "sdpa").lm_head.weight.shape[0] > 0
            continue
        with pytest.raises(
            ConfigError, match=r"model.path=.*rm': its checkpoint has no lm_head.weight, .*LlamaForSequenceClass"
        ):
            load_model(cfg, load_tokenizer(cfg.model), "sdpa")


def test_a_model_path_from_the_home_folder_is_the_home_folders(compose, monkeypatch, tmp_path):
    """``model.path: ~/models/x`` (in a preset, or quoted on the command line) was taken as written: the folder did
    not exist for check_model_available and transformers took it for a hub id. Data sources expanded it."""
    from simpo_exp.config import to_config
    from simpo_exp.generate.config import ScorerConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = to_config(compose("model=qwen2.5-0.5b-instruct", "model.path='~/models/x'", "model.tokenizer_path='~/t'"))
    assert (cfg.model.path, cfg.model.tokenizer_path) == (f"{tmp_path}/models/x", f"{tmp_path}/t")
    assert ScorerConfig(name="rm", path="~/rm").path == f"{tmp_path}/rm"


def test_a_relative_path_under_chdir_says_where_it_was_looked_for(tmp_path):
    """``hydra.job.chdir=true`` runs the job in its folder, where a path relative to the command's folder is not:
    the message named neither the folder nor the setting."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    args = ["dataset=local", "dataset.sources.local.path=data/mine.jsonl", "logger=none", "hydra.job.chdir=true"]
    res = simpo(*args, "hydra.run.dir=runs/c", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"looked for in {(tmp_path / 'runs' / 'c').resolve()}: hydra.job.chdir=true" in res.stderr, res.stderr
    assert "${hydra:runtime.cwd}/data/mine.jsonl" in res.stderr


@pytest.mark.parametrize(
    "stage, arg, use",
    [
        ("simpo_exp", "+experiment=simpo-llama3-8b-instruct", "experiment=simpo-llama3-8b-instruct"),
        ("simpo_exp", "+model=tiny", "model=tiny"),
        ("simpo_exp.generate", "+scorer=rule", "scorer=rule"),
        ("simpo_exp.evaluate", "+benchmark=rule", "benchmark=rule"),
    ],
)
def test_a_plus_on_a_group_the_stage_already_chooses_names_the_form_to_use(tmp_path, stage, arg, use):
    """``+experiment=NAME``, as other Hydra projects write it, got Hydra's "Multiple values for experiment. To
    override a value use 'override experiment: ...'": a defaults-list line, not something to type."""
    from tests.runs import run_module

    res = run_module(stage, *([str(tmp_path)] if stage.endswith("evaluate") else []), arg, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"give it without '+': {use}" in res.stderr and "Multiple values" not in res.stderr


def test_multirun_with_cfg_is_one_line_naming_what_to_do(tmp_path):
    """``--multirun beta=2,3 --cfg job`` ended in Hydra's ValueError traceback."""
    res = simpo("--multirun", "beta=2,3", "--cfg", "job", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "--multirun and --cfg given" in res.stderr and "give each swept key one of its values" in res.stderr


def test_a_run_folder_given_as_model_path_names_its_model_folder(tmp_path):
    """model.path=outputs/runs/R0 (the run, not its model/) said only "a directory without a config.json"."""
    from simpo_exp.hub import ModelNotFoundError, check_model_available

    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"the run's trained model is model.path='.*run/model'"):
        check_model_available(str(tmp_path / "run"))
    with pytest.raises(ModelNotFoundError, match=r"not a saved model$"):  # no model/ inside: nothing to name
        check_model_available(str(tmp_path))
