"""A LoRA run's model/ is a full model any tool loads (the adapters merged into the base), with the adapter
alone beside it; the evaluate stage runs on such a run."""

import json

import pytest
import torch

from simpo_exp.config import to_config
from tests.test_evaluate import evaluate
from tests.test_run import simpo

pytest.importorskip("peft")


def _trained_lora_model(compose, *overrides):
    from simpo_exp.model import load_model, load_tokenizer

    cfg = to_config(compose("hardware=cpu-lora", "model.random_init.num_hidden_layers=1", *overrides))
    model = load_model(cfg, load_tokenizer(cfg.model), "sdpa")
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # zero at the start: give the adapters something to add
            p.data.normal_(0, 0.05)
    return model.eval()


def test_the_saved_adapter_names_the_bases_revision(tmp_path):
    """PEFT loads an adapter's base at ``main`` where its config names no revision: an adapter trained on a pinned
    model.revision came back onto whatever main had become."""
    from types import SimpleNamespace

    from simpo_exp.model import add_lora
    from tests.test_perf_paths import make_model

    h = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"])
    add_lora(make_model(), h, revision="0123abc").save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["revision"] == "0123abc"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_the_saved_lora_model_is_the_merged_model_and_its_adapter_reloads_as_trained(compose, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from simpo_exp.model import save_trained

    model = _trained_lora_model(compose)
    ids = torch.randint(5, 40, (2, 12))
    trained = _logits(model, ids)
    base = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora" not in k}
    save_trained(model, tmp_path / "model")

    assert (tmp_path / "model" / "config.json").is_file() and not (tmp_path / "model" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    torch.testing.assert_close(_logits(merged, ids), trained, atol=1e-5, rtol=1e-5)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base[q.replace("q_proj.", "q_proj.base_layer.")])

    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # any weights: the base's are put back
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in base.items()}, strict=False)
    adapted = PeftModel.from_pretrained(fresh, tmp_path / "model" / "adapter").eval()
    torch.testing.assert_close(_logits(adapted, ids), trained, atol=1e-5, rtol=1e-5)


def test_a_lora_run_can_be_evaluated(tmp_path):
    run = tmp_path / "run"
    args = ["hardware=cpu-lora", "max_steps=2", "eval_on_start=false", "num_generations=0", "logger=none"]
    res = simpo(
        *args, "dataset.synthetic.num_train=64", "dataset.synthetic.num_test=16", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "model" / "adapter" / "adapter_model.safetensors").is_file()
    res = evaluate(str(run), "benchmark=rule", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((run / "eval" / "rule" / "results.json").read_text())
    assert results["model"] == str((run / "model").resolve()) and results["metrics"]["n"] == 16


def test_a_lora_model_saved_from_gathered_weights_is_merged_as_peft_merges_it(compose, tmp_path):
    """Under FSDP or ZeRO-3 the model is saved from the weights gathered off the shards: model/ is still the merged
    model (the same weights as PEFT's own merge_and_unload, each layer's scaling used) and model/adapter the
    adapter alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from simpo_exp.model import save_trained

    model = _trained_lora_model(compose, "hardware.lora_alpha=24", "hardware.lora_r=4")
    ids = torch.randint(5, 40, (2, 12))
    trained = _logits(model, ids)
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    save_trained(model, tmp_path / "sharded", state_dict=gathered)
    assert (tmp_path / "sharded" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "sharded" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    torch.testing.assert_close(_logits(merged, ids), trained, atol=1e-5, rtol=1e-5)

    base = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if "lora" not in k}
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    fresh.load_state_dict(base, strict=False)
    adapted = PeftModel.from_pretrained(fresh, tmp_path / "sharded" / "adapter").eval()
    torch.testing.assert_close(_logits(adapted, ids), trained, atol=1e-5, rtol=1e-5)
    peft_merged = adapted.merge_and_unload().state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, peft_merged[key], atol=1e-6, rtol=1e-6, msg=key)


def test_a_bfloat16_base_is_merged_and_stored_in_float32_so_small_updates_stay(compose, tmp_path):
    """At SimPO's learning rates an adapter's update is mostly below a bfloat16 weight's resolution: merged into
    the bf16 base it would round away. model/ holds base + scaling * B A in float32 (as a full fine-tune's
    weights are), tied embeddings still tied, and says float32 in its config."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from simpo_exp.model import save_trained

    model = _trained_lora_model(compose, "model.dtype=bfloat16")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.mul_(1e-3)  # a small update, as a few steps at lr 1e-6 make
    base = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora" not in k}
    q = "model.layers.0.self_attn.q_proj"
    layer = model.get_base_model().get_submodule(q)
    delta = (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()) * layer.scaling["default"]
    w = base[f"{q}.base_layer.weight"]
    assert (((w.float() + delta).to(torch.bfloat16) != w) & (delta != 0)).float().mean() < 0.5  # bf16 loses most
    save_trained(model, tmp_path / "model")

    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in saved.values())
    torch.testing.assert_close(saved[f"{q}.weight"], w.float() + delta, atol=0, rtol=0)
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert merged.dtype == torch.float32
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("gathered", [False, True])
def test_adapters_on_the_tied_head_and_the_embedding_merge_in_both_save_paths(compose, tmp_path, gathered):
    """LoRA on embed_tokens (PEFT's lora_embedding_A/B, [r, vocab]) failed the merge with a KeyError, and on the
    lm_head tied to it, under a sharded engine (whose gathered weights leave the tied copy out), was silently left
    unmerged: 0.91 off in the logits. Both merge now; the saved head and embedding, no longer equal, are untied."""
    from transformers import AutoModelForCausalLM

    from simpo_exp.model import save_trained
    from simpo_exp.train import without_tied_copies

    targets = "hardware.lora_target_modules=[q_proj,embed_tokens,lm_head]"
    # a scaling (alpha / r) of 6, not the default's 2; PEFT starts an embedding's A at zero (B is the random one):
    # both drawn, or the embedding's delta B A is zero and its merge (scaling, transpose) goes unchecked
    model = _trained_lora_model(compose, targets, "hardware.lora_alpha=24", "hardware.lora_r=4")
    for name, p in model.named_parameters():
        if "lora_embedding_A" in name or "lora_embedding_B" in name:
            p.data.normal_(0, 0.05)
    ids = torch.randint(5, 40, (2, 12))
    trained = _logits(model, ids)
    state = without_tied_copies(dict(model.state_dict()), model) if gathered else None
    save_trained(model, tmp_path / "model", state_dict=state)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert not merged.config.tie_word_embeddings
    torch.testing.assert_close(_logits(merged, ids), trained, atol=1e-5, rtol=1e-5)


def test_peft_target_names_are_taken_as_peft_takes_them(compose):
    """all-linear (PEFT's shorthand) and dotted paths were refused as 'not modules of this model'; a target list in
    another order refused a resume as a different config."""
    from simpo_exp.checkpoint import incompatible_keys
    from simpo_exp.config import ConfigError

    pytest.importorskip("peft")
    every = _trained_lora_model(compose, "hardware.lora_target_modules=[all-linear]")
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in every.named_parameters() if ".lora_A" in n}
    assert any(n.endswith("mlp.down_proj") for n in lora_layers) and not any("lm_head" in n for n in lora_layers)
    one = _trained_lora_model(compose, "hardware.lora_target_modules=[layers.0.self_attn.q_proj]")
    assert {n.rsplit(".lora_A", 1)[0] for n, _ in one.named_parameters() if ".lora_A" in n} == {
        "base_model.model.model.layers.0.self_attn.q_proj"
    }
    own = "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"  # the model's names, its head left out
    with pytest.raises(
        ConfigError,
        match=r"\['nothing_proj'\] are not modules of this model; its linear layers are " + f"named {own} \\(or use",
    ):
        _trained_lora_model(compose, "hardware.lora_target_modules=[nothing_proj]")
    # a list of names: each named module of every layer gets its adapters, and nothing else
    two = _trained_lora_model(compose, "hardware.lora_target_modules=[q_proj,v_proj]")
    adapted = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[1] for n, _ in two.named_parameters() if ".lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}
    # a block of layers: PEFT's ValueError, with the block's repr, came out as a traceback naming no key
    block = r"'mlp' names LlamaMLP, a block of layers, .* \(down_proj, gate_proj, up_proj\) or use \[all-linear\]"
    with pytest.raises(ConfigError, match=r"hardware.lora_target_modules: " + block):
        _trained_lora_model(compose, "hardware.lora_target_modules=[q_proj,mlp]")
    saved = {"hardware": {"lora_target_modules": ["q_proj", "v_proj"]}}
    assert incompatible_keys(saved, {"hardware": {"lora_target_modules": ["v_proj", "q_proj"]}}) == []
    assert incompatible_keys(saved, {"hardware": {"lora_target_modules": ["q_proj"]}})


def test_a_lora_run_at_a_full_fine_tunes_learning_rate_is_warned(compose):
    """The rate follows the model's size or preset whether LoRA is on or not: the README's 8B LoRA recipe trained
    at 3e-7, and a 20-step tiny LoRA run moved the eval loss 15x less than the full fine-tune at the same rate,
    with nothing said."""
    from simpo_exp.config import lora_rate_note, resolve_learning_rate, to_config

    cfg = to_config(compose("hardware=cpu-lora", "model=llama3-8b", "hparams=reasoning"))
    lr, source = resolve_learning_rate(cfg)
    assert lr <= 1e-6
    note = lora_rate_note(cfg, lr, source)
    assert note and f"learning_rate={lr:g} (from {source}), a full fine-tune's rate" in note
    assert (
        lora_rate_note(cfg, 5e-6, "learning_rate: the command line or a preset (hparams, experiment)") is None
    )  # a LoRA rate
    full = to_config(compose("hardware=cpu", "model=llama3-8b", "hparams=reasoning"))
    assert lora_rate_note(full, *resolve_learning_rate(full)) is None  # a full fine-tune at its own rate


def test_a_lora_checkpoint_holds_the_adapters_alone_and_resumes_on_the_same_base(tmp_path):
    """Every LoRA checkpoint wrote the whole frozen base beside the adapters (16 GB an 8B checkpoint, hashed at each
    save). The adapters alone are written; the base is recorded by a hash of its values, and a resume on another
    base is refused."""
    import copy

    from safetensors.torch import load_file

    from simpo_exp import checkpoint

    peft = pytest.importorskip("peft")
    from tests.test_perf_paths import make_model

    def lora_model():
        model = peft.get_peft_model(make_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        return model

    def optimizer_of(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    model = lora_model()
    opt, sched = optimizer_of(model)
    model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()
    opt.step()
    path = checkpoint.save(tmp_path / "run", model, opt, sched, checkpoint.TrainState(step=1), {}, keep=2)
    saved = load_file(path / "model.safetensors")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trained and all("lora_" in n for n in saved)  # no base weight

    again = lora_model()  # the same base (make_model is seeded), other adapters
    opt2, sched2 = optimizer_of(again)
    checkpoint.load(path, again, opt2, sched2, {})
    for (name, a), b in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(a, b), name
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])

    other = copy.deepcopy(again)
    with torch.no_grad():
        next(p for p in other.parameters() if not p.requires_grad).add_(1.0)  # another base
    opt3, sched3 = optimizer_of(other)
    with pytest.raises(checkpoint.CheckpointError, match="frozen base weights differ"):
        checkpoint.load(path, other, opt3, sched3, {})


def test_a_lora_run_resumed_from_an_adapters_only_checkpoint_is_the_uninterrupted_run(tmp_path):
    """Bit for bit on the CPU: the metrics, the summary and the saved (merged) weights of a LoRA run killed after
    its step-6 checkpoint and run again equal those of the run that was not interrupted."""
    import shutil

    pytest.importorskip("peft")
    from tests.test_faults import killed_copy
    from tests.test_reliability import RUN, assert_same_run

    args = [*RUN, "hardware=cpu-lora", "learning_rate=1e-3"]
    done = tmp_path / "done"
    res = simpo(*args, f"hydra.run.dir={done}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = killed_copy(done, tmp_path / "run")
    for later in ("step-000009", "step-000012"):
        shutil.rmtree(run / "checkpoints" / later, ignore_errors=True)
    res = simpo(*args, f"hydra.run.dir={run}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(step 6)" in (run / "__main__.log").read_text()
    assert_same_run(done, run)


def test_a_gathered_state_is_the_one_merged_and_a_lora_layer_without_its_base_weight_is_refused(compose, tmp_path):
    """Under FSDP or ZeRO-3 the model's own parameters are shards: the merge must take the gathered state given to
    it, adapter and base alike. A LoRA layer whose base weight is not in that state was saved without it (drawn at
    random at load): refused by name, nothing written."""
    from safetensors.torch import load_file

    from simpo_exp.model import save_trained

    model = _trained_lora_model(compose)
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    base, a, b = (gathered[f"{q}.{n}"] for n in ("base_layer.weight", "lora_A.default.weight", "lora_B.default.weight"))
    scaling = model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    gathered[f"{q}.lora_B.default.weight"] = 2 * b  # the gathered adapter is not the one on this process
    save_trained(model, tmp_path / "model", state_dict=gathered)
    saved = load_file(tmp_path / "model" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(saved, base + 2 * scaling * (b @ a), atol=1e-6, rtol=1e-6)
    adapter = load_file(tmp_path / "model" / "adapter" / "adapter_model.safetensors")
    torch.testing.assert_close(adapter[f"{q}.lora_B.weight"], 2 * b)
    del gathered[f"{q}.base_layer.weight"]
    with pytest.raises(RuntimeError, match="q_proj"):
        save_trained(model, tmp_path / "other", state_dict=gathered)
    assert not (tmp_path / "other" / "config.json").exists()


def test_a_lora_run_saved_in_bf16_saves_its_merge_rounded_once(compose, tmp_path):
    """save_dtype=bfloat16 on a LoRA run: the merged weights (base + scaling B A, in float32) are rounded once, last;
    rounding the model's own state (the base without the adapters) saved a model without its training."""
    from safetensors.torch import load_file

    from simpo_exp.model import save_trained

    model = _trained_lora_model(compose)
    state = model.state_dict()
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    base, a, b = (state[f"{q}.{n}"] for n in ("base_layer.weight", "lora_A.default.weight", "lora_B.default.weight"))
    scaling = model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    expected = (base.float() + scaling * (b.float() @ a.float())).to(torch.bfloat16)
    save_trained(model, tmp_path / "model", dtype="bfloat16")
    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.bfloat16}
    assert torch.equal(saved["model.layers.0.self_attn.q_proj.weight"], expected)
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_head_adapters_smallest_update_unties_the_saved_head(compose, tmp_path):
    """At SimPO's learning rates a head adapter's update is tiny: the merged head differs from the embeddings by
    little, but it differs, and a merge that left them tied saved the embeddings as the head, its training lost."""
    from safetensors.torch import load_file

    from simpo_exp.model import save_trained

    model = _trained_lora_model(compose, "hardware.lora_target_modules=[lm_head]")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(1e-5)
    save_trained(model, tmp_path / "model")
    assert not json.loads((tmp_path / "model" / "config.json").read_text()).get("tie_word_embeddings")
    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert not torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])


MOE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE |= dict(vocab_size=64, num_experts=4, moe_intermediate_size=16, num_experts_per_tok=2)


def test_lora_on_fused_expert_weights_is_refused_before_training():
    """``all-linear`` on Qwen3-MoE wraps each layer's fused 3-D expert weights (peft's ParamWrapper), which the merged
    save has no rule for: the run trained to its end, then failed to save anything loadable."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from simpo_exp.config import ConfigError, HardwareConfig
    from simpo_exp.model import add_lora

    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**MOE))
    with pytest.raises(ConfigError, match=r"adapts \d+ fused weight\(s\) that are not linear layers \(model\.layers"):
        add_lora(model, HardwareConfig(name="t", lora=True, lora_target_modules=["all-linear"]))


def test_routed_experts_no_adapter_covers_are_said(caplog):
    """Qwen2-MoE's default targets match its shared expert alone: the routed experts trained nothing, unsaid."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    from simpo_exp.config import HardwareConfig
    from simpo_exp.model import add_lora

    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**MOE, shared_expert_intermediate_size=16))
    add_lora(model, HardwareConfig(name="t", lora=True))
    assert "LoRA adapts none of this mixture of experts' routed experts (" in caplog.text
    assert "shared_expert.gate_proj" in caplog.text and "self_attn.q_proj" in caplog.text
    caplog.clear()
    dense = LlamaForCausalLM(LlamaConfig(**{k: MOE[k] for k in list(MOE)[:6]}))
    add_lora(dense, HardwareConfig(name="t", lora=True))
    assert "routed experts" not in caplog.text
    # experts as linear layers of their own (remote code, older layouts) that the targets match: covered, unsaid
    from peft import LoraConfig, get_peft_model

    from simpo_exp.model import check_expert_adapters

    toy = torch.nn.Module()
    toy.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
    toy.shared = torch.nn.Linear(4, 4)
    check_expert_adapters(get_peft_model(toy, LoraConfig(r=2, target_modules=["0", "1", "shared"])), ["0", "1"])
    assert "routed experts" not in caplog.text
