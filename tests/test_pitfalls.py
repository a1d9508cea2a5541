"""The field's known SimPO pitfalls, each provoked on the embedded default."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from simpo_exp.config import ConfigError, resolve_gamma, to_config
from simpo_exp.data import PairCollator, build_datasets
from simpo_exp.model import TINY_CHAT_TEMPLATE, build_tiny_tokenizer
from simpo_exp.rundir import CONF_DIR
from simpo_exp.runinfo import refuse_unused, run_name
from tests.test_run import SMALL, simpo

SMALL_DATA = ["dataset.synthetic.num_train=64", "dataset.synthetic.num_test=16"]


def test_a_template_that_adds_a_second_bos_stops_the_run(compose):
    cfg = to_config(compose(*SMALL_DATA))
    tok = build_tiny_tokenizer()
    tok.chat_template = "{{ bos_token }}" + TINY_CHAT_TEMPLATE
    with pytest.raises(ConfigError, match="64 of 64 train sequences start with two BOS.*allow_double_bos=true"):
        build_datasets(cfg, tok)
    cfg.dataset.allow_double_bos = True
    _, _, report = build_datasets(cfg, tok)
    assert report.tokenization["splits"]["train"]["bos_per_sequence"] == {2: 64}


def test_a_response_without_eos_stops_the_run(compose):
    cfg = to_config(compose(*SMALL_DATA))
    tok = build_tiny_tokenizer()
    tok.chat_template = TINY_CHAT_TEMPLATE.replace("+ eos_token ", "")
    with pytest.raises(ConfigError, match="do not end with an EOS"):
        build_datasets(cfg, tok)
    cfg.dataset.allow_missing_eos = True
    _, _, report = build_datasets(cfg, tok)
    assert report.tokenization["splits"]["train"]["responses_without_end_token"] == 128


def test_tokenization_report_on_the_default(compose):
    cfg = to_config(compose(*SMALL_DATA))
    _, _, report = build_datasets(cfg, build_tiny_tokenizer())
    tr = report.tokenization
    assert len(tr["chat_template_sha256"]) == 12
    assert tr["splits"]["train"]["bos_per_sequence"] == {1: 64}
    assert tr["splits"]["train"]["responses_without_end_token"] == 0
    assert tr["example"]["chosen"].endswith("<|eos|>") and "⟦response⟧" in tr["example"]["rendered_chosen"]
    assert tr["splits"]["test"]["lengths"]["prompt"]["max"] <= cfg.max_prompt_length


def test_a_response_cut_to_the_bone_still_trains_and_none_is_cut_to_nothing(compose):
    """max_prompt_length = max_length - 1: the longest prompt leaves exactly one response token."""
    probe = to_config(compose(*SMALL_DATA))
    train, _, _ = build_datasets(probe, build_tiny_tokenizer())
    longest = max(len(p) for p in train["prompt_input_ids"])
    cfg = to_config(compose(*SMALL_DATA, f"max_length={longest + 1}", f"max_prompt_length={longest}"))
    train, _, report = build_datasets(cfg, build_tiny_tokenizer())
    lengths = [len(c) for c in train["chosen_input_ids"]] + [len(r) for r in train["rejected_input_ids"]]
    assert min(lengths) >= 1  # never zero tokens
    assert report.truncated["train"]["chosen"] > 0
    from simpo_exp.logps import ResponseLogps
    from simpo_exp.model import load_model
    from simpo_exp.objective import batch_loss

    tok = build_tiny_tokenizer()
    policy = ResponseLogps(load_model(cfg, tok, "sdpa"))
    rows = [train[i] for i in range(len(train)) if len(train[i]["chosen_input_ids"]) == 1][:4]
    loss, stats, _ = batch_loss(policy, PairCollator(tok.pad_token_id)(rows), cfg)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)


def test_gamma_and_ratio(compose):
    cfg = to_config(compose("beta=2.5", "gamma=1.0"))
    assert resolve_gamma(cfg) == (1.0, 0.4)
    cfg = to_config(compose("beta=2.5", "gamma_beta_ratio=0.4"))
    assert resolve_gamma(cfg) == (1.0, 0.4)
    with pytest.raises(ConfigError, match="gamma"):
        to_config(compose("gamma=-1"))


def test_gamma_and_ratio_together_are_refused(tmp_path):
    res = simpo("gamma=1.0", "gamma_beta_ratio=0.5", "logger=none", cwd=tmp_path)
    assert res.returncode == 2 and "not both" in res.stderr


@pytest.mark.parametrize(
    "overrides,given,message",
    [
        (["loss=simper", "beta=5"], {"beta"}, r"beta=5.0 would not be used: method='simper' does not read it"),
        (["loss=dpo", "gamma_beta_ratio=0.3"], {"gamma_beta_ratio"}, r"method='dpo' does not read it \(read by simpo"),
        (["loss=ipo", "label_smoothing=0.0"], {"label_smoothing"}, r"label_smoothing=0.0 would not be used"),
        # gamma set by a preset (here: given, but not as the command line's), the ratio on the command line
        (["gamma=1.0", "gamma_beta_ratio=0.3"], {"gamma_beta_ratio"}, r"gamma=1.0 \(an absolute margin.*gamma=null"),
        (["gamma=1.0", "gamma_beta_ratio=0.3"], {"gamma", "gamma_beta_ratio"}, "not both"),
        # the embedded default's model preset sets max_steps=200: an epoch count trained 200 steps without a word
        (["num_train_epochs=0.25"], {"num_train_epochs"}, r"num_train_epochs=0.25 would not be used: max_steps=200"),
        (
            ["experiment=simpo-mistral-7b-base", "hparams=strong-prefs"],
            {"experiment", "hparams"},
            r"hparams=strong-prefs would not be used: experiment=simpo-mistral-7b-base .* "
            r"beta \(5.0 in hparams=strong-prefs, 2.0 in the experiment\)",
        ),
        (  # the recipe's NLL term is SimPOConfig's 0, said in the preset: instruct's 0.1 was quietly added
            ["experiment=simpo-llama3-8b-instruct", "hparams=instruct"],
            {"experiment", "hparams"},
            r"hparams=instruct would not be used: .* sft_weight \(0.1 in hparams=instruct, 0.0 in the experiment\)",
        ),
        (  # a baseline's loss preset sets its own beta after hparams, and DPO reads no gamma_beta_ratio: the sweep
            # hparams=default,strong-prefs loss=dpo trained one run twice
            ["loss=dpo", "hparams=strong-prefs"],
            {"loss", "hparams"},
            r"hparams=strong-prefs would not be used: loss=dpo is composed after it.*beta \(5.0 in "
            r"hparams=strong-prefs, 0.1 in loss=dpo\); gamma_beta_ratio \(0.7 in hparams=strong-prefs\) is not read",
        ),
    ],
)
def test_a_value_given_that_the_run_would_not_use_is_refused(compose, overrides, given, message):
    """A sweep over such a value trains one run under several names: ``loss=simper beta=2,5``, a
    ``gamma_beta_ratio`` where a preset's absolute gamma wins, ``hparams=`` under an experiment that sets the same
    keys after it."""
    cfg = compose(*overrides)
    choices = dict(o.split("=", 1) for o in overrides if o.split("=", 1)[0] in ("experiment", "hparams", "loss"))
    with pytest.raises(ConfigError, match=message):
        refuse_unused(cfg, given, choices, lambda extra: compose(*extra))


@pytest.mark.parametrize("method", ["dpo", "rdpo", "cpo", "orpo", "simper"])
def test_a_method_given_without_its_loss_preset_is_refused(compose, method):
    """``method=dpo`` on the command line replaced the loss group's method and kept its values: DPO trained at
    SimPO's beta 2.0, R-DPO with no length term, CPO and ORPO with no NLL term, each under its baseline's name.
    ``loss=<method>`` (with ``method=`` beside it or not) is taken."""
    with pytest.raises(ConfigError, match=rf"method={method} on the command line keeps loss=simpo's .* loss={method}"):
        refuse_as_the_run_would(compose, f"method={method}")
    refuse_as_the_run_would(compose, f"loss={method}")
    refuse_as_the_run_would(compose, f"loss={method}", f"method={method}")
    refuse_as_the_run_would(compose, "method=simpo")  # the default's own method, said again


def test_an_hparams_preset_a_loss_preset_keeps_some_of_is_taken(compose):
    """An hparams preset some of whose values reach the run (beside a loss preset, or the default loss) is taken."""
    for overrides in (["loss=cpo", "hparams=reasoning"], ["hparams=strong-prefs"], ["loss=simpo", "hparams=instruct"]):
        choices = dict(o.split("=", 1) for o in overrides)
        refuse_unused(compose(*overrides), set(choices), choices, lambda extra: compose(*extra))


def test_an_epoch_count_is_taken_with_max_steps_minus_one_and_a_searched_gamma_is_named(compose):
    """``num_train_epochs`` with ``max_steps=-1`` beside it trains by epochs (not refused); ``gamma`` typed under a
    search space that sets ``gamma_beta_ratio`` said "not both", as if the user had typed both."""
    cfg = compose("num_train_epochs=2", "max_steps=-1")
    refuse_unused(cfg, {"num_train_epochs", "max_steps"}, {"model": "tiny"})
    cfg = compose("gamma=1.0", "gamma_beta_ratio=0.3")
    with pytest.raises(ConfigError, match=r"not both: the sweep's search space sets gamma_beta_ratio; add "):
        refuse_unused(cfg, {"gamma", "gamma_beta_ratio"}, {}, searched={"gamma_beta_ratio"})


def refuse_as_the_run_would(compose, *overrides: str) -> None:
    """``refuse_unused`` with the keys and group choices a run of ``overrides`` would have (loss and model
    included, as Hydra's runtime choices hold them)."""
    cfg = compose(*overrides)
    given = {o.split("=", 1)[0] for o in overrides if not o.startswith("hydra.")}
    chosen = dict(o.split("=", 1) for o in overrides if "." not in o.split("=", 1)[0])
    choices = {"loss": "simpo", "model": "tiny", "hparams": "default", **chosen}
    refuse_unused(cfg, given, choices, lambda extra: compose(*[o for o in overrides if o.startswith("hydra.")], *extra))


def test_what_an_experiment_would_lose_to_the_groups_around_it_is_refused(compose, tmp_path):
    """An experiment preset of the user's that sets ``method: dpo`` trained SimPO (the loss group, composed after
    it, set method back) without a word; with ``loss=dpo`` given, DPO's beta replaced the experiment's; and
    ``experiment=<recipe> model=<another>`` trained the other model with the recipe's chat template."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "my-dpo.yaml").write_text("# @package _global_\nmethod: dpo\nbeta: 0.05\n")
    mine = [f"hydra.searchpath=[file://{tmp_path}]", "experiment=my-dpo"]
    with pytest.raises(ConfigError, match=r"experiment=my-dpo sets method=dpo, which would not be used: .* loss=dpo"):
        refuse_as_the_run_would(compose, *mine)
    with pytest.raises(ConfigError, match=r"replaces its beta \(0.05 in the experiment, 0.1 in loss=dpo\)"):
        refuse_as_the_run_would(compose, *mine, "loss=dpo")
    refuse_as_the_run_would(compose, *mine, "loss=dpo", "beta=0.05")  # said on the command line: as it trains
    refuse_as_the_run_would(compose, *mine, "loss=cpo")  # another method asked for: its own values, as a recipe's
    (tmp_path / "experiment" / "dpo-no-beta.yaml").write_text("# @package _global_\nmethod: dpo\nlearning_rate: 1e-6\n")
    no_beta = [f"hydra.searchpath=[file://{tmp_path}]", "experiment=dpo-no-beta", "loss=dpo"]
    refuse_as_the_run_would(compose, *no_beta)  # DPO's beta: the experiment set none of its own
    gemma = "experiment=simpo-gemma2-9b-it"
    with pytest.raises(ConfigError, match=r"model=tiny with experiment=simpo-gemma2-9b-it: .* model.chat_template="):
        refuse_as_the_run_would(compose, gemma, "model=tiny")
    refuse_as_the_run_would(compose, gemma, "model=tiny", "model.chat_template=auto", "model.attn_implementation=null")
    refuse_as_the_run_would(compose, gemma, "model.path=/my/gemma")  # the recipe's model, from a local folder
    # the recipe's own model named beside it (redundant, as a sweep script writes it): its attention and chat
    # template are the recipe's, which differ from the bare preset's, and were refused as another model's
    own_models = {"simpo-gemma2-9b-it": "gemma2-9b-it", "simpo-llama3-8b-instruct": "llama3-8b-instruct"}
    own_models["simpo-mistral-7b-base"] = "zephyr-7b-sft-full"
    for recipe, own in own_models.items():
        refuse_as_the_run_would(compose, f"experiment={recipe}", f"model={own}")
    with pytest.raises(ConfigError, match=r"model=llama3-8b-instruct with experiment=simpo-gemma2-9b-it: "):
        refuse_as_the_run_would(compose, gemma, "model=llama3-8b-instruct")  # another model still is


@pytest.mark.parametrize("loss", ["simpo", "dpo", "orpo"])
def test_every_shipped_recipe_composes_with_any_loss(compose, loss):
    for recipe in sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")):
        refuse_as_the_run_would(compose, f"experiment={recipe}", f"loss={loss}")


def test_a_value_the_sweepers_search_space_sets_is_named_with_its_removal(tmp_path):
    """+sweep=optuna loss=dpo failed every trial with "gamma_beta_ratio=0.62 would not be used ...; leave it out":
    the user never gave it, Optuna's search space did. The message names the override that removes it."""
    sweep = tmp_path / "optuna"
    args = ["--multirun", "+sweep=optuna", "hydra.sweeper.n_trials=1", "loss=dpo", "logger=none", "max_steps=1"]
    res = simpo(*args, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    error = next(sweep.glob("*/error.json")).read_text()
    assert "would not be used: method='dpo' does not read it" in error
    assert "search without it: add '~hydra.sweeper.params.gamma_beta_ratio'" in error


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss=simpo", "beta=5", "gamma_beta_ratio=0.3", "label_smoothing=0.1"],
        ["loss=alphapo", "alphapo_alpha=0.5"],
        ["gamma=null", "gamma_beta_ratio=0.3"],
        ["experiment=simpo-mistral-7b-base", "hparams=default"],
        ["experiment=simpo-mistral-7b-base", "hparams=strong-prefs", "beta=5", "gamma_beta_ratio=0.7"],
    ],
)
def test_values_the_run_uses_are_accepted(compose, overrides):
    given = {o.split("=", 1)[0] for o in overrides}
    choices = dict(o.split("=", 1) for o in overrides if o.split("=", 1)[0] in ("experiment", "hparams"))
    refuse_unused(compose(*overrides), given, choices, lambda extra: compose(*extra))


def test_an_unresolvable_value_or_a_removed_group_is_named(tmp_path):
    """They crashed the error handler itself (a traceback, no error.json)."""
    res = simpo("beta=${oc.env:SIMPO_TEST_NEVER_SET}", "logger=none", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "beta=${oc.env:SIMPO_TEST_NEVER_SET}: cannot be resolved" in res.stderr
    record = json.loads((tmp_path / "a" / "error.json").read_text())
    # the overrides as given (compare names a run without .hydra/ by them), the unresolvable one as text
    assert record["type"] == "ConfigError" and record["overrides"] == [
        "beta=${oc.env:SIMPO_TEST_NEVER_SET}",
        "logger=none",
    ]
    res = simpo("~hardware", "logger=none", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert res.returncode == 2 and "~hardware: the hardware group cannot be removed" in res.stderr, res.stderr[-3000:]


def test_sft_weight_is_visible_in_the_run_name():
    assert run_name(["beta=5"], 0.1) == "beta=5,sft=0.1"
    assert run_name(["sft_weight=0.2"], 0.2) == "sft_weight=0.2"
    assert run_name([], 0.0) == "default"


def test_a_run_is_named_by_what_it_trains_in_training_and_in_evaluation(tmp_path):
    """resume=false, the logger and the cadence do not change what is trained: they were in the name. And the
    evaluate stage named the model card by the run's folder, training by its overrides (the saved config's
    run_name is empty: Hydra saves it before the name is filled in)."""
    import yaml

    from simpo_exp.evaluate.runs import load_run_config
    from simpo_exp.evaluate.runs import run_name as evaluated_name

    given = ["beta=5", "resume=false", "logger=none", "logging_steps=1", "+logger.tags=[a]", "hydra.run.dir=x"]
    assert run_name(given, 0.0) == "beta=5" and run_name([*given, "learning_rate=1e-6"], 0.5) == (
        "beta=5,learning_rate=1e-6,sft=0.5"
    )
    run = tmp_path / "r1"
    (run / ".hydra").mkdir(parents=True)
    saved = {"sft_weight": 0.5, "model": {"name": "tiny"}, "dataset": {"name": "synthetic"}}
    saved |= {"hardware": {"name": "cpu"}, "logger": {"name": "none", "run_name": None}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(given))
    assert evaluated_name(load_run_config(run), run) == "beta=5,sft=0.5"
    named = tmp_path / "named"  # logger.run_name given on the command line: the name training used, kept
    shutil.copytree(run, named)
    (named / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({**saved, "logger": {"name": "none", "run_name": "A"}})
    )
    assert evaluated_name(load_run_config(named), named) == "A"
    # a sweep over an operational key (eval_steps=10,50) named every job "default": the key the sweep varies stays
    assert run_name(["eval_steps=10", "beta=5"], 0.0, frozenset({"eval_steps"})) == "eval_steps=10,beta=5"
    sweep = tmp_path / "sweep"
    job = sweep / "0_eval_steps=10"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**saved, "sft_weight": 0.0}))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["eval_steps=10", "logger=none"]))
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": ["eval_steps=10,50"]}}}))
    assert evaluated_name(load_run_config(job), job) == "eval_steps=10"


def test_run_records_lengths_gamma_and_environment(tmp_path):
    run = tmp_path / "run"
    res = simpo("max_steps=2", "logger=none", "gamma=0.8", f"hydra.run.dir={run}", *SMALL, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resolved/gamma"] == 0.8 and summary["resolved/gamma_beta_ratio"] == pytest.approx(0.4)
    assert summary["eval/length/chosen"] > 0 and summary["eval/length/rejected"] > 0
    assert -1 <= summary["eval/length/reward_corr"] <= 1 or math.isnan(summary["eval/length/reward_corr"])
    env = json.loads((run / "env.json").read_text())
    assert env["packages"]["torch"] == torch.__version__
    assert env["num_processes"] == 1 and env["attn_implementation"].endswith("sdpa") and env["mixed_precision"] == "no"
    assert env["batch_layout"]["packing"] == "prefix_shared"  # packing=auto on a CPU
    assert env["data"]["pairs_after_filtering"] == {"train": 128, "test": 32}
    assert env["git_commit"] is None or len(env["git_commit"].split("+")[0]) == 40
    assert env["model_commit"] is None  # the model built in code: no hub commit (tests/test_generate names one)
    assert env["model_files"] is None  # nor a folder of files
    report = json.loads((run / "data_report.json").read_text())
    assert report["tokenization"]["splits"]["train"]["pairs"] == 128


def test_dropout_is_off_while_training_unless_asked(compose, tmp_path, caplog):
    """A model whose config has attention dropout trains without it (disable_dropout=true, as TRL and the official
    trainer): two training-mode forwards of the same batch agree, and the config (saved with the model) keeps its
    value. With disable_dropout=false the two forwards differ. LoRA's adapters add none by default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_exp.model import load_model, save_trained

    tok = build_tiny_tokenizer()
    arch = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    arch.num_attention_heads, arch.num_key_value_heads, arch.attention_dropout = 4, 4, 0.5
    LlamaForCausalLM(arch).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    ids = torch.tensor([tok("sort: 3 1 2")["input_ids"]])

    def two_training_forwards(*overrides):
        model = load_model(to_config(compose(f"model.path={tmp_path / 'm'}", *overrides)), tok, "eager").train()
        save_trained(model, tmp_path / "saved")
        assert json.loads((tmp_path / "saved" / "config.json").read_text())["attention_dropout"] == 0.5
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at the start: adapters would add nothing, dropped out or not
                torch.nn.init.normal_(p)
        return model(input_ids=ids).logits, model(input_ids=ids).logits

    assert torch.equal(*two_training_forwards())
    assert not torch.equal(*two_training_forwards("disable_dropout=false"))
    pytest.importorskip("peft")
    assert torch.equal(*two_training_forwards("hardware=cpu-lora"))
    with caplog.at_level("WARNING", logger="simpo_exp.model"):
        assert not torch.equal(*two_training_forwards("hardware=cpu-lora", "hardware.lora_dropout=0.5"))
    assert "hardware.lora_dropout=0.5 stays on beside disable_dropout=true" in caplog.text  # said (TRL zeroes it)


def test_an_attention_kernel_the_model_lacks_is_refused_by_its_key(compose, tmp_path):
    """Gemma 2 has no SDPA path in transformers: model.attn_implementation=sdpa (or the hardware preset's sdpa where
    the model preset's is unset) ended in transformers' traceback, exit 1."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from simpo_exp.config import ConfigError
    from simpo_exp.model import load_model

    tok = build_tiny_tokenizer()
    arch = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16)
    arch.num_attention_heads, arch.num_key_value_heads = 2, 1
    Gemma2ForCausalLM(arch).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    for key in ("model.attn_implementation", "hardware.attn_implementation"):
        others = ["model.attn_implementation=null"] if key.startswith("hardware") else []
        cfg = to_config(compose("model=gemma2-9b-it", f"model.path={tmp_path / 'm'}", f"{key}=sdpa", *others))
        with pytest.raises(ConfigError, match=rf"{key}='sdpa': Gemma2ForCausalLM does not support .*'eager'"):
            load_model(cfg, tok, "sdpa")
    assert load_model(cfg, tok, "eager").config.model_type == "gemma2"
    # flash_attention_2 asked for where flash-attn is missing falls back to sdpa: the refusal says so, not only 'sdpa'
    cfg = to_config(
        compose("model=gemma2-9b-it", f"model.path={tmp_path / 'm'}", "model.attn_implementation=flash_attention_2")
    )
    with pytest.raises(
        ConfigError, match=r"'sdpa' \(its 'flash_attention_2' fell back to it: flash-attn is not install"
    ):
        load_model(cfg, tok, "sdpa")


@pytest.mark.parametrize("family", ["opt", "falcon", "bloom"])
def test_dropout_read_from_float_attributes_or_the_config_is_off_too(family, tmp_path):
    """OPT's layers drop out through float attributes (``dropout``, ``activation_dropout``, and LayerDrop skips whole
    layers), Bloom's through ``hidden_dropout``, Falcon's through its config, read at every forward: only
    ``nn.Dropout`` was zeroed, so they trained with dropout on and each layout's loss differed (OPT's first loss:
    1.352 padded, 1.453 prefix-shared). Two training forwards now agree, and the saved config keeps its values."""
    import transformers

    from simpo_exp.model import disable_dropout, save_trained

    small = {"vocab_size": 300, "hidden_size": 64, "num_attention_heads": 4, "attention_dropout": 0.1}
    arch = {
        "opt": ("OPT", dict(ffn_dim=128, num_hidden_layers=2, word_embed_proj_dim=64, dropout=0.1,
                            activation_dropout=0.1, layerdrop=0.5)),
        "falcon": ("Falcon", dict(num_hidden_layers=2, hidden_dropout=0.1)),
        "bloom": ("Bloom", dict(n_layer=2, n_head=4, hidden_dropout=0.1)),
    }[family]  # fmt: skip
    config = getattr(transformers, f"{arch[0]}Config")(**small, **arch[1])
    model = getattr(transformers, f"{arch[0]}ForCausalLM")(config).train()
    ids = torch.randint(3, 250, (1, 30), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is on
    disable_dropout(model)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    save_trained(model, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert {k: saved[k] for k in {**small, **arch[1]} if "drop" in k} == {
        k: v for k, v in {**small, **arch[1]}.items() if "drop" in k
    }
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # and off again after the save


def test_an_accumulation_the_global_batch_would_override_is_refused(tmp_path):
    """hardware=ddp sets hardware.effective_batch_size, which derives the accumulation: a
    gradient_accumulation_steps given with it was silently replaced."""
    res = simpo("hardware=ddp", "gradient_accumulation_steps=2", "logger=none", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "gradient_accumulation_steps=2 would not be used: hardware.effective_batch_size=128" in res.stderr
    assert "hardware.effective_batch_size=null" in res.stderr


def test_a_presets_accumulation_the_global_batch_replaces_is_said(tmp_path):
    """hparams=reasoning's batch 1 x accumulation 16 became 1 x 128 under a multi-GPU preset's global batch of 128,
    on one GPU: eight times the preset's batch, without a word (the start-up log shows the layout alone)."""
    run = tmp_path / "run"
    args = ("hparams=reasoning", "hardware.effective_batch_size=4", "max_steps=1", "eval_steps=0", "logger=none")
    res = simpo(*args, "dataset.synthetic.num_train=64", f"hydra.run.dir={run}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    log = (run / "__main__.log").read_text()
    assert "hparams=reasoning's gradient_accumulation_steps=16 is not used: hardware.effective_batch_size=4" in log


def _byte_tokenizer(**specials):
    """A byte-level tokenizer with the given special tokens (bos_token=..., additional_special_tokens=[...])."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, **specials)


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _pairs(tmp_path, **dataset_kw):
    from tests.test_data import make_config, write_jsonl

    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)]
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    write_jsonl(tmp_path / "d" / "test.jsonl", rows[:3])
    from simpo_exp.config import SourceConfig

    return make_config({"s": SourceConfig(path=str(tmp_path / "d"))}, **dataset_kw)


@pytest.mark.parametrize("style", ["gpt2", "smollm2-instruct"])
def test_a_bos_that_is_also_eos_or_the_turn_start_does_not_stop_the_run(tmp_path, style):
    """GPT-2/Pythia's <|endoftext|> is BOS, EOS and pad; SmolLM2-Instruct's BOS is chatml's <|im_start|>: every row was
    refused twice over, as 'more than one BOS' and as responses 'without an EOS' (BOS was struck from the end tokens
    even where it is EOS), though every response ends with EOS."""
    from simpo_exp.model import ZEPHYR_CHAT_TEMPLATE

    if style == "gpt2":
        end = "<|endoftext|>"
        tok = _byte_tokenizer(bos_token=end, eos_token=end, pad_token=end, chat_template=ZEPHYR_CHAT_TEMPLATE)
    else:
        tok = _byte_tokenizer(
            bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=CHATML
        )
    train, _, report = build_datasets(_pairs(tmp_path), tok)
    assert len(train) == 8 and report.tokenization["splits"]["train"]["responses_without_end_token"] == 0
    # a template that does double the BOS is still refused
    tok.chat_template = "{{ bos_token }}{{ bos_token }}" + tok.chat_template
    with pytest.raises(ConfigError, match="8 of 8 train sequences start with two BOS"):
        build_datasets(_pairs(tmp_path / "again"), tok)


def test_a_resumed_runs_env_record_keeps_the_earlier_starts_and_names_what_changed():
    """env.json was rewritten at each start: a run resumed under other packages or on other devices kept no trace of
    what its first steps ran on. Each start's record is kept (oldest first) and the drift is named for a warning."""
    from simpo_exp.environment import with_earlier_starts

    first = {"packages": {"torch": "2.13.0", "trl": None}, "device_names": ["H100"], "git_commit": "a", "x": 1}
    env, drift = with_earlier_starts(first, {}, 0)
    assert env == first | {"started_at_step": 0} and drift == []
    second = first | {"packages": {"torch": "2.14.0", "trl": None}, "device_names": ["H200"]}
    env2, drift = with_earlier_starts(second, env, 40)
    assert drift == ["torch 2.13.0 -> 2.14.0", "device_names ['H100'] -> ['H200']"]
    assert env2["started_at_step"] == 40 and env2["earlier_starts"] == [env]
    env3, drift = with_earlier_starts(second, env2, 80)  # the same set-up again: nothing to warn of
    assert drift == [] and [s["started_at_step"] for s in env3["earlier_starts"]] == [0, 40]
    assert "earlier_starts" not in env3["earlier_starts"][1]  # kept once, not nested
    assert with_earlier_starts(second, env2, 0)[0] == second | {"started_at_step": 0}  # no checkpoint: a fresh start
    # an unpinned hub model that moved on main between starts, a new process count: named too
    moved = {"model_commit": "bbb", "num_processes": 2}
    assert sorted(with_earlier_starts(moved, {"model_commit": "aaa", "num_processes": 1}, 10)[1]) == [
        "model_commit aaa -> bbb",
        "num_processes 1 -> 2",
    ]
    # a package uninstalled between starts (peft, liger-kernel): named as gone
    gone = with_earlier_starts({"packages": {"peft": None}}, {"packages": {"peft": "0.13"}}, 10)[1]
    assert gone == ["peft 0.13 -> None"]
    # another CUDA build or another engine under the same packages: named
    _, drift = with_earlier_starts({"torch_cuda": "13.0", "distributed_type": "FSDP"},
                                   {"torch_cuda": "12.8", "distributed_type": "MULTI_GPU"}, 10)  # fmt: skip
    assert drift == ["torch_cuda 12.8 -> 13.0", "distributed_type MULTI_GPU -> FSDP"]


def test_env_json_records_the_torch_build_and_the_accelerators_set_up(compose, monkeypatch):
    """env.json's torch version is the build that runs, with its local tag (a CUDA wheel's metadata says "2.11.0",
    its __version__ "2.11.0+cu130"); a package not installed is None; the device, process count, engine and
    precision are the accelerator's."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from simpo_exp import environment
    from tests.test_perf_paths import make_model

    real_version = environment.metadata.version

    def version(name):
        if name == "flash-attn":
            raise environment.metadata.PackageNotFoundError(name)
        return "2.11.0" if name == "torch" else real_version(name)

    monkeypatch.setattr(environment.metadata, "version", version)
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    versions = environment.package_versions()
    assert versions["torch"] == "2.11.0+cu130" and versions["flash-attn"] is None
    assert versions["transformers"] == real_version("transformers")

    monkeypatch.setattr(environment, "precision_record", lambda model, accelerator: {"weights": "float32"})
    monkeypatch.setattr(environment, "git_commit", lambda: "abc")
    accelerator = SimpleNamespace(device=torch.device("cuda", 3), num_processes=2, mixed_precision="bf16")
    accelerator.distributed_type = DistributedType.MULTI_GPU
    report = SimpleNamespace(sources={"synthetic": {"pairs": 64}}, kept={"train": 60})
    env = environment.environment_record(to_config(compose()), accelerator, make_model(), report)
    assert (env["device"], env["num_processes"], env["distributed_type"]) == ("cuda:3", 2, "MULTI_GPU")
    assert env["mixed_precision"] == "bf16" and env["precision"] == {"weights": "float32"}
    assert env["git_commit"] == "abc"
    assert env["packages"]["torch"] == "2.11.0+cu130" and env["model_commit"] is None  # no hub model
    assert env["data"] == {"sources": {"synthetic": {"pairs": 64}}, "pairs_after_filtering": {"train": 60}}
    # the set-up as asked and as the model holds it; every GPU named; the hub commit of the revision asked for
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"H100-{i}")
    monkeypatch.setattr(environment, "hub_commit", lambda repo, revision: f"{repo}@{revision}")
    cfg = to_config(compose("hardware.gradient_checkpointing=true", "hardware.checkpoint_offload=true"))
    cfg.model.path, cfg.model.revision = "org/m", "abc"
    env = environment.environment_record(cfg, accelerator, make_model().to(torch.bfloat16), report)
    assert env["gradient_checkpointing"] is True and env["checkpoint_offload"] is True
    assert env["model_dtype"] == "torch.bfloat16" and env["device_names"] == ["H100-0", "H100-1"]
    assert env["model_commit"] == "org/m@abc"


def test_the_code_version_names_the_checkouts_commit_and_its_changes(tmp_path, monkeypatch):
    """env.json's git_commit: the checkout's HEAD, ``+dirty`` where a tracked file has changes (files git does not
    track do not count), None outside a checkout of the project (an installed wheel) or outside any repository."""
    import shutil
    import subprocess

    from simpo_exp import rundir
    from simpo_exp.environment import git_commit

    if shutil.which("git") is None:
        pytest.skip("no git here")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path counts
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    monkeypatch.setattr(rundir, "PROJECT_DIR", tmp_path)
    assert git_commit() is None  # not a repository
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "pyproject.toml"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit() == head and len(head) == 40
    (tmp_path / "notes.txt").write_text("untracked")
    assert git_commit() == head  # an untracked file is no change to the code
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    assert git_commit() == head + "+dirty"
    monkeypatch.setattr(rundir, "PROJECT_DIR", tmp_path / "site-packages")  # an installed wheel's folder
    (tmp_path / "site-packages").mkdir()
    assert git_commit() is None


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        (
            ["hardware.fused_head=liger", "hardware.logps_chunk_size=4"],
            "hardware.logps_chunk_size",
            "in its own chunks",
        ),
        (["hardware.packing=prefix_shared", "hardware.measure_layouts=true"], "hardware.measure_layouts", "packs as"),
        (["save_model=false", "save_dtype=bfloat16"], "save_dtype", "save_model=false writes no model"),
    ],
)
def test_a_key_the_runs_other_settings_leave_unread_is_refused_when_given(compose, overrides, key, message):
    """Each was accepted and the run came out bit-identical without it (a sweep over it trained one run under several
    names); the same key where it is read is taken."""
    with pytest.raises(ConfigError, match=f"{key}=.* would not be used: .*{message}"):
        refuse_unused(compose(*overrides), {o.split("=", 1)[0] for o in overrides}, {})
    read = {
        "hardware.logps_chunk_size": ["loss=dpo", "hardware.fused_head=liger", "hardware.logps_chunk_size=4"],
        "hardware.measure_layouts": ["hardware.measure_layouts=true"],
        "save_dtype": ["save_dtype=bfloat16"],
    }[key]
    refuse_unused(compose(*read), {o.split("=", 1)[0] for o in read}, {})


def test_synthetic_sizes_beside_data_that_is_not_synthetic_are_said_to_be_unread(compose, caplog, tmp_path):
    """``dataset=local dataset.synthetic.num_train=64`` trained on the whole local file without a word."""
    import logging

    data = tmp_path / "prefs.jsonl"
    given = ["dataset=local", f"dataset.sources.local.path={data}", "dataset.synthetic.num_train=64"]
    with caplog.at_level(logging.WARNING, logger="simpo_exp.runinfo"):
        refuse_unused(compose(*given), {o.split("=", 1)[0] for o in given}, {})
        said = "dataset.synthetic.num_train not read: no data source is synthetic (dataset.sources: local)"
        assert said in caplog.text
        caplog.clear()
        refuse_unused(compose("dataset.synthetic.num_train=64"), {"dataset.synthetic.num_train"}, {})
        assert "not read" not in caplog.text


def test_simpos_beta_range_searched_for_a_dpo_family_method_is_said(compose, caplog):
    """+sweep=optuna loss=dpo searched DPO's beta over SimPO's 2-10 (20 to 100 times its usual scale) unsaid. Each
    such trial says so, naming the range to search; a SimPO trial, or a beta the user typed, is not warned about."""
    cfg = compose("loss=dpo", "beta=4.2")
    with caplog.at_level("WARNING", logger="simpo_exp.runinfo"):
        refuse_unused(cfg, {"loss"}, {"loss": "dpo"}, searched={"beta", "learning_rate"})
    assert "beta=4.2 comes from the sweep's search space" in caplog.text and "interval(0.01, 0.5)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="simpo_exp.runinfo"):
        refuse_unused(compose("beta=4.2"), set(), {}, searched={"beta"})  # SimPO: its own scale
        refuse_unused(compose("loss=dpo", "beta=0.2"), {"loss"}, {"loss": "dpo"}, searched={"beta"})
        refuse_unused(cfg, {"loss", "beta"}, {"loss": "dpo"})  # typed, no search space: the user's word
    assert "search space" not in caplog.text
    for method in ("ipo", "rdpo", "cpo", "orpo"):  # every method of DPO's beta scale
        caplog.clear()
        with caplog.at_level("WARNING", logger="simpo_exp.runinfo"):
            refuse_unused(compose(f"loss={method}", "beta=4.2"), {"loss"}, {"loss": method}, searched={"beta"})
        assert "beta=4.2 comes from the sweep's search space" in caplog.text, method
