"""Every preset in conf/ composes and validates, and each states only what it changes.

Defaults live once, in simpo_exp/config.py; a preset file holds what differs from them (or from the
preset it builds on through its defaults list). These tests compose every option of every group.
"""

from __future__ import annotations

import importlib.util

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from simpo_exp.config import Config, DatasetConfig, HardwareConfig, LoggerConfig, ModelConfig, SourceConfig, to_config
from simpo_exp.methods import METHODS
from tests.conftest import CONF, options

GROUPS = ["model", "dataset", "hparams", "loss", "hardware", "logger", "experiment"]
NAMED_GROUPS = ["model", "dataset", "hardware", "logger"]  # groups whose presets carry a ``name``
NEEDS = {("dataset", "local"): ["dataset.sources.local.path=/data/prefs.jsonl"]}

# Methods whose own loss has an NLL term (CPO, ORPO: their presets set sft_weight 1) or whose sft_weight is a
# knob of theirs that an hparams preset sets (SimPO's CPO-SimPO term); every other method's preset resets it to 0.
NLL_METHODS = ("simpo", "cpo", "orpo")
# Values equal to the dataclass default that a preset keeps on purpose.
KEPT_DEFAULTS = {
    ("loss/simpo", "method"): "the loss preset's identity, like a group's name",
    ("loss/ln-dpo", "beta"): "resets an hparams preset's beta (loss comes after hparams)",
    **{
        (f"loss/{m}", "sft_weight"): "resets an hparams preset's NLL weight: the method's loss has none"
        for m in METHODS
        if m not in NLL_METHODS
    },
    ("hparams/reasoning", "gradient_accumulation_steps"): "resets model=tiny's accumulation of 1",
}

# hardware presets built on another: (child, parent) -> the keys the child changes.
HARDWARE_PARENTS = {
    ("cpu-lora", "cpu"): {"name", "lora"},
    ("gpu-lora", "gpu"): {"name", "lora"},
    ("ddp", "gpu"): {"name", "effective_batch_size"},
    ("ddp-lora", "ddp"): {"name", "lora"},
    ("fsdp", "ddp"): {"name"},
    ("zero2", "ddp"): {"name", "deepspeed_config"},
    ("zero3", "ddp"): {"name", "deepspeed_config"},
    ("zero3-offload", "zero3"): {"name", "deepspeed_config"},
}


def every_option():
    return [(group, option) for group in GROUPS for option in options(group)]


@pytest.mark.parametrize("group,option", every_option())
def test_every_preset_composes_and_validates(compose, group, option):
    cfg = to_config(compose(f"{group}={option}", *NEEDS.get((group, option), [])))
    assert cfg.beta > 0
    if group in NAMED_GROUPS:  # a preset built on another still names itself
        assert getattr(cfg, group).name == option


def test_a_local_dataset_needs_its_path(compose):
    from simpo_exp.config import ConfigError

    with pytest.raises(ConfigError, match=r"missing config value dataset.sources.local.path: it has no default"):
        to_config(compose("dataset=local"))


def test_sweep_preset_composes():
    """The +launcher presets: tests/test_scale.py (test_launcher_presets_compose)."""
    plugin = "hydra_plugins.hydra_optuna_sweeper"
    if importlib.util.find_spec(plugin) is None:
        pytest.skip(f"+sweep=optuna needs the optional Hydra plugin {plugin}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(
            config_name="config", overrides=["output_dir=/tmp/unused", "+sweep=optuna"], return_hydra_config=True
        )
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert set(cfg.hydra.sweeper.params) == {"learning_rate", "gamma_beta_ratio", "beta"}
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    assert to_config(job).method == "simpo"


def test_hardware_presets_build_on_each_other(compose):
    for (child, parent), changed in HARDWARE_PARENTS.items():
        got = OmegaConf.to_container(compose(f"hardware={child}").hardware)
        base = OmegaConf.to_container(compose(f"hardware={parent}").hardware)
        assert {k for k in got if got[k] != base[k]} == changed, (child, parent)


def leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if key in ("defaults", "hydra"):
            continue
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def dataclass_default(path: str):
    """The value simpo_exp/config.py gives ``path`` ("<none>" where it declares none)."""
    parts = path.split(".")
    if parts[:2] == ["dataset", "sources"] and len(parts) == 4:
        return OmegaConf.select(OmegaConf.structured(SourceConfig(path="x")), parts[3], default="<none>")
    full = Config(
        model=ModelConfig(name="x"),
        dataset=DatasetConfig(name="x"),
        hardware=HardwareConfig(name="x"),
        logger=LoggerConfig(name="x"),
    )
    return OmegaConf.select(OmegaConf.structured(full), path, default="<none>")


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "experiment"])
def test_presets_state_only_what_differs_from_the_defaults(group):
    """Experiment presets are exempt: they restate their source recipe value for value (test_recipes.py)."""
    restated = []
    for option in options(group):
        path = CONF / group / f"{option}.yaml"
        is_global = path.read_text().startswith("# @package _global_")
        raw = OmegaConf.to_container(OmegaConf.load(path))
        for key, value in leaves(raw, "" if is_global else f"{group}."):
            local_key = key if is_global else key.split(".", 1)[1]
            if key.endswith(".name") and key.count(".") == 1 or (f"{group}/{option}", local_key) in KEPT_DEFAULTS:
                continue
            if value == dataclass_default(key):
                restated.append(f"conf/{group}/{option}.yaml: {key}={value!r}")
    assert not restated, "these equal simpo_exp/config.py's defaults; drop them:\n" + "\n".join(restated)


def test_a_baseline_over_a_recipe_takes_its_own_beta(compose):
    """``experiment=<SimPO recipe> loss=dpo``: DPO with its usual beta (0.1), not the recipe's SimPO beta (2.0);
    the recipe's other values stay, and without a loss override the recipe's beta is kept."""
    cfg = compose("experiment=simpo-mistral-7b-base", "loss=dpo")
    assert (cfg.method, cfg.beta, cfg.learning_rate) == ("dpo", 0.1, 3.0e-7)
    cfg = compose("experiment=guide-llama3-8b-instruct", "loss=cpo")
    assert (cfg.method, cfg.beta, cfg.sft_weight) == ("cpo", 0.1, 1.0)
    cfg = compose("experiment=simpo-mistral-7b-base")
    assert (cfg.method, cfg.beta) == ("simpo", 2.0)


def test_a_list_of_dataset_presets_is_a_mixture_of_their_sources(compose):
    """``dataset=[synthetic,local]`` from the command line: both presets' sources, each with its own fraction."""
    cfg = compose(
        "dataset=[synthetic,local]", "dataset.sources.local.path=/data/mine.jsonl", "dataset.sources.local.fraction=0.5"
    )
    sources = cfg.dataset.sources
    assert (
        set(sources) == {"synthetic", "local"} and sources.local.fraction == 0.5 and sources.synthetic.fraction == 1.0
    )


def stage_presets():
    from simpo_exp.evaluate.config import BenchmarkConfig
    from simpo_exp.generate.config import GenerateConfig, ScorerConfig

    schemas = {"generate": GenerateConfig, "scorer": ScorerConfig, "benchmark": BenchmarkConfig}
    return [(group, schemas[group], option) for group in schemas for option in options(group)]


# the official on-policy recipe, restated value for value as the experiment presets restate theirs
STAGE_RECIPES = {("generate", "paper")}


@pytest.mark.parametrize("group,schema,option", stage_presets())
def test_the_other_stages_presets_state_only_what_differs_from_the_defaults(group, schema, option):
    if (group, option) in STAGE_RECIPES:
        pytest.skip("a recipe restates its source")
    defaults = OmegaConf.structured(schema(name="x", **({"kind": "x"} if group == "benchmark" else {})))
    raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    restated = [
        f"conf/{group}/{option}.yaml: {key}={value!r}"
        for key, value in leaves(raw)
        if key not in ("name", "kind") and value == OmegaConf.select(defaults, key, default="<none>")
    ]
    assert not restated, "these equal their schema's defaults; drop them:\n" + "\n".join(restated)


def test_a_preset_of_ones_own_named_like_a_shipped_one_is_named_as_not_read(tmp_path):
    """The project's conf/ comes first in Hydra's search path: ``--config-dir myconf`` with ``hparams/instruct.yaml``
    trains with the shipped instruct preset, which the README says; the run now warns, naming both files."""
    from types import SimpleNamespace

    from simpo_exp.runinfo import shadowed_presets

    (tmp_path / "hparams").mkdir()
    (tmp_path / "hparams" / "instruct.yaml").write_text("# @package _global_\nbeta: 9.0\n")
    (tmp_path / "hparams" / "mine.yaml").write_text("# @package _global_\nbeta: 9.0\n")
    sources = [SimpleNamespace(path=str(CONF), schema="file"), SimpleNamespace(path=str(tmp_path), schema="file")]
    sources.append(SimpleNamespace(path="hydra.conf", schema="pkg"))
    found = shadowed_presets(sources, {"hparams": "instruct", "model": "tiny", "hydra/launcher": "basic"})
    assert found == [(tmp_path / "hparams" / "instruct.yaml", CONF.resolve() / "hparams" / "instruct.yaml")]
    assert shadowed_presets(sources, {"hparams": "mine"}) == []


def test_each_stage_help_lists_its_own_groups_and_ones_own_presets(tmp_path):
    """``--help`` lists the groups the stage composes and those it takes with ``+`` (Hydra's own listing named
    every group in conf/: ``benchmark`` under training, which refuses it), with a ``--config-dir`` preset."""
    from tests.runs import run_module

    (tmp_path / "hparams").mkdir()
    (tmp_path / "hparams" / "mine.yaml").write_text("# @package _global_\nbeta: 9.0\n")
    listed = {}
    for stage in ("simpo_exp", "simpo_exp.generate", "simpo_exp.evaluate"):
        res = run_module(stage, "--config-dir", str(tmp_path), "--help", cwd=tmp_path, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        groups = res.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
        listed[stage] = dict(line.split(": ", 1) for line in groups.strip().splitlines()[1:] if ": " in line)
    train, generate, evaluate = listed.values()
    assert sorted(train) == ["+launcher", "+sweep", "dataset", "experiment", "hardware", "hparams", "logger", "loss",
                             "model"]  # fmt: skip
    assert train["hparams"].split(", ") == sorted([*options("hparams"), "mine"])
    assert sorted(generate) == ["+launcher", "dataset", "generate", "hardware", "logger", "model", "scorer"]
    assert sorted(evaluate) == ["+launcher", "benchmark"] and evaluate["benchmark"].split(", ") == options("benchmark")
