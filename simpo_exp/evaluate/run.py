"""The evaluate stage: for each run, each benchmark: generate (resumable shards), judge, write results.

Per run directory and benchmark, under ``eval/<benchmark>/``:
    shards/<policy>-manifest.json, shards/<policy>-00000.jsonl   generations, one shard file at a time
    generations.jsonl                                           prompt, answer(s), score or verdict per prompt
    model_outputs.json (alpacaeval) | model_answer/<model>.jsonl (arena_hard)   the benchmark's own format
    verdicts/<judge>.jsonl (alpacaeval)                         judge verdicts, a line appended as each arrives
    annotations.json (alpacaeval)                               judged pairs (alpaca-eval's annotation format)
    model_judgment/<judge>/<model>.jsonl (arena_hard)           judgments (arena-hard-auto's format; arena.py)
    results.json                                                metrics (simpo_exp/inference/results.py)
    results.previous.json                                       the results before the last re-evaluation (kept)
and ``model/README.md`` (the model card). Generations are written before any judge runs, so a judge
that fails leaves them in place and ``evaluate.judge_only=true`` judges them again without sampling;
verdicts and judgments are kept as they arrive, so that re-run asks only for the missing ones.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.util
import logging
import shlex
import types
from pathlib import Path

from simpo_exp.config import ConfigError
from simpo_exp.evaluate import benchmarks as bm
from simpo_exp.evaluate.arena import judge_arena_hard
from simpo_exp.evaluate.config import decoding_for
from simpo_exp.evaluate.judge import (
    NO_LC,
    UNJUDGED,
    JudgeError,
    PairwiseJudge,
    annotations,
    awaiting_judge,
    judge_file_name,
    lc_missing_note,
    lc_subset_note,
    length_controlled,
    package_annotations_path,
    package_judge,
    rule_preferences,
    standard_error,
    unjudged_note,
    win_rate,
)
from simpo_exp.evaluate.runs import (
    find_runs,
    has_model,
    load_run_config,
    run_name,
    saved_config,
    starting_policy,
    trained_policy,
)
from simpo_exp.inference.files import (
    DamagedFile,
    manifest_changes,
    probe_writable,
    read_jsonl,
    tokenizer_sha256,
    weights_sha256,
    write_json,
    write_jsonl,
)
from simpo_exp.inference.results import (
    EVAL_DIR,
    HEADLINE,
    PREFIX,
    answer_decoding,
    is_lower_score,
    results_path,
    set_aside,
)
from simpo_exp.rundir import hold_folder, output_stage, read_json, read_json_value, records_dir
from simpo_exp.rundir import read_jsonl as read_lines

log = logging.getLogger(__name__)


def _weights_id(cfg) -> dict:
    """What identifies a policy's weights: a hash of a local model's weight files and config (wherever the
    directory lies, so a copied or moved run reuses its answers), the hub id and revision, or the random init."""
    m = cfg.model
    if not m.path:
        return {"random_init": dataclasses.asdict(m.random_init), "seed": cfg.seed}
    path = Path(m.path)
    if path.is_dir():
        return {"sha256": weights_sha256(path)}
    return {"path": m.path, "revision": m.revision}


def _tokenizer_id(cfg) -> dict | None:
    """What renders the policy's prompts and ends its answers, beside its weights: the hash of a local model's (or
    separate tokenizer's) tokenizer files, and a chat template the config gives in their place. None for a hub id
    (its revision in the weights' id says it) or the embedded random init."""
    m = cfg.model
    folder = Path(m.tokenizer_path or m.path) if (m.tokenizer_path or m.path) else None
    files = tokenizer_sha256(folder) if folder is not None and folder.is_dir() else None
    template = m.chat_template if m.chat_template not in (None, "auto") else None
    return {"files": files, "chat_template": template} if files or template else None


def _legacy_weights_id(cfg) -> dict | None:
    """The id manifests written before the hash held for a local model: its path and its files' sizes and times."""
    path = Path(cfg.model.path)
    if not (cfg.model.path and path.is_dir()):
        return None
    files = sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in path.glob("*.safetensors"))
    return {"path": str(path), "files": files}


def _backend(dec, cfg) -> str:
    if dec.backend != "auto":
        return dec.backend
    from simpo_exp.inference.sampling import pick_device

    # on the device the run asks for (evaluate.device=cpu on a GPU machine: transformers on the CPU, not vLLM on the
    # GPU in float32)
    on_gpu = pick_device(cfg.hardware.device).type == "cuda"
    vllm = importlib.util.find_spec("vllm") is not None and on_gpu and bool(cfg.model.path)
    return "vllm" if vllm else "hf"


def generate(
    cfg,
    prompts: list[dict],
    dec,
    shard_dir: Path,
    tag: str,
    judge_only: bool,
    chat_format: str | None = None,
    backend_key: str = "decoding.backend",
) -> list[dict]:
    """Answers of the policy ``cfg`` to ``prompts``, one record per prompt, in resumable shards; ``chat_format``:
    how the prompts are rendered (default: as the policy was trained, ``dataset.chat_format``); ``backend_key``:
    the key of ``dec.backend``, as messages name it."""
    from simpo_exp.inference.sampling import (
        derive_seed,
        effective_precision,
        make_sampler,
        pick_device,
        prompt_token_ids,
        sampling_dtype,
    )
    from simpo_exp.model import load_tokenizer

    size = dec.shard_size
    shards = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    files = [shard_dir / f"{tag}-{i:05d}.jsonl" for i in range(len(shards))]
    manifest = {
        "weights": _weights_id(cfg),
        "tokenizer": _tokenizer_id(cfg),  # a chat template fixed in model/ gives other answers from the same weights
        # the dtype the weights are loaded in (answers of a float32 model loaded as bf16 are another model's)
        "model_dtype": cfg.model.dtype,
        # and the precision they compute in: the samplers run a GPU's answers in bf16, a CPU's in the weights' own
        "mixed_precision": effective_precision(cfg.hardware.mixed_precision, pick_device(cfg.hardware.device)),
        "sampling_dtype": str(sampling_dtype(cfg, pick_device(cfg.hardware.device))).removeprefix("torch."),
        "decoding": answer_decoding(vars(dec)),
        "chat_format": chat_format or cfg.dataset.chat_format,
        "prompts": hashlib.sha256("\n".join(p["id"] + p["instruction"] for p in prompts).encode()).hexdigest(),
        # each prompt's own hash: answers stored for the first N prompts serve a command that asks for more
        "prompt_hashes": [hashlib.sha256((p["id"] + p["instruction"]).encode()).hexdigest()[:16] for p in prompts],
    }
    # judge_only reads stored answers wherever they were made (another backend, another machine)
    keys = ("weights", "prompts") if judge_only else None
    _upgrade_manifest(shard_dir / f"{tag}-manifest.json", cfg, manifest["weights"])
    stored = sorted(shard_dir.glob(f"{tag}-0*.jsonl"))
    _check_manifest(shard_dir / f"{tag}-manifest.json", manifest, bool(stored), keys, size)
    if judge_only:  # the stored answers are judged as they were made: say which of the command's settings go unused
        unused = manifest_changes(
            read_json(shard_dir / f"{tag}-manifest.json"),
            manifest,
            ("decoding", "model_dtype", "mixed_precision", "sampling_dtype"),
        )
        if unused:
            log.warning(
                "evaluate.judge_only=true judges the stored %s answers as they were made; the command's own settings "
                "are not used: %s",
                tag,
                "; ".join(unused),
            )
    todo = [i for i, f in enumerate(files) if not f.exists()]
    if todo and judge_only:
        raise ConfigError(
            f"evaluate.judge_only=true, but {files[todo[0]]} holds no stored generations; run once "
            "without judge_only to generate them"
        )
    if todo:
        tokenizer = load_tokenizer(cfg.model)
        ids = {
            i: prompt_token_ids(tokenizer, [p["messages"] for p in shards[i]], manifest["chat_format"]) for i in todo
        }
        longest = max((len(p) for i in todo for p in ids[i]), default=0)
        sampler = make_sampler(cfg, tokenizer, dec, backend_key, longest_prompt=longest)
        for i in todo:
            outs = sampler.sample(ids[i], [p["id"] for p in shards[i]], derive_seed(dec.seed, tag, i))
            write_jsonl(files[i], [{"id": p["id"], **o[0]} for p, o in zip(shards[i], outs)])
            log.info("%s: shard %d of %d (%d prompts)", tag, i + 1, len(shards), len(shards[i]))
        sampler.close()
    rows = []
    for f, shard in zip(files, shards):
        got = read_jsonl(f)
        if [r.get("id") for r in got] != [p["id"] for p in shard]:  # answers must pair with their own prompts
            raise DamagedFile(
                f"{f} holds {len(got)} answers for prompts {[r.get('id') for r in got][:3]}..., not the shard's "
                f"{len(shard)} prompts {[p['id'] for p in shard][:3]}...: delete it and re-run the same command"
            )
        rows += got
    return rows


def _upgrade_manifest(path: Path, cfg, weights: dict) -> None:
    """A manifest that names the same weights the older way (path and file times) is given their hash, so the
    answers it guards stay in use."""
    old = read_json(path)  # {} when missing or unreadable
    if old.get("weights") is not None and old["weights"] == _legacy_weights_id(cfg):
        write_json(path, {**old, "weights": weights})


def _check_manifest(
    path: Path, manifest: dict, has_answers: bool, keys: tuple | None = None, shard_size: int = 1
) -> None:
    """Refuse to add answers to ones made with other settings (only ``keys`` compared, when given). A manifest
    without any answer shard beside it (left by a run that failed before its first shard) binds nothing: it is
    replaced. Answers stored for fewer prompts than the command asks for (``max_prompts`` raised after a smoke
    test) are kept: the complete shards are what this command would make, a shard cut short by the smaller set is
    made again whole; fewer prompts than stored are served from the complete shards where they end on a shard's
    end (a shard cut short would be another sample)."""
    if not (has_answers and path.exists()):
        if has_answers:  # shards copied without it, or it deleted: what they were made with is not known
            log.warning(
                "%s: the stored answers beside it have no record of how they were made; they are taken as made with "
                "this command's settings (delete them to generate them again)",
                path,
            )
        write_json(path, manifest)
        return
    old = read_json_value(path)
    if not isinstance(old, dict):  # cut short or edited: what the stored answers were made with is unknown
        raise DamagedFile(
            f"{path} does not read back as the record of the stored generations beside it; delete {path.parent} to "
            "generate them again"
        )
    if isinstance(old.get("decoding"), dict):  # older manifests recorded every setting, or none of FREE_DECODING
        if "batch_size" not in old["decoding"]:  # (a sampled one made before its batch size was recorded: kept)
            manifest = manifest | {"decoding": {k: v for k, v in manifest["decoding"].items() if k != "batch_size"}}
        old["decoding"] = answer_decoding(old["decoding"])
    # a key an older manifest lacks is not held against it (written before that key was recorded), as in generate
    compared = set(manifest if keys is None else keys) & set(old) - {"prompt_hashes"}
    differ = manifest_changes(old, manifest, compared, stored_only=True)
    if differ and all(d.startswith("prompts:") for d in differ):
        have, want = old.get("prompt_hashes") or [], manifest.get("prompt_hashes") or []
        # more prompts than stored, the stored ones first (judge_only generates nothing: refused below)
        if have and want[: len(have)] == have and keys is None:
            if len(have) % shard_size:  # the stored set's last shard: made again for the whole shard
                path.with_name(path.name.replace("manifest.json", f"{len(have) // shard_size:05d}.jsonl")).unlink(
                    missing_ok=True
                )
            write_json(path, manifest)
            return
        if have and have[: len(want)] == want:
            if len(want) % shard_size == 0:
                return  # the first shards of the stored answers, as this command would make them
            differ = [
                f"prompts: the stored answers were made for {len(have)} prompts; the first {len(want)} end inside a "
                f"shard of {shard_size}, whose answers would be another sample (ask for a multiple of shard_size, or "
                f"all {len(have)})"
            ]
    if differ:
        prompts = "prompts: another set (prompts_path, its file, or max_prompts)"  # its hash would say no more
        said = [prompts if d.startswith("prompts: stored") else d for d in differ]
        advice = (
            f"delete {path.parent} to generate again with the new settings"
            if keys is None  # judge_only: the stored answers are what it has to judge; never advised away
            else "evaluate.judge_only=true judges stored answers only: ask for the prompts they were made for, or run "
            "without judge_only to generate answers for these"
        )
        raise ConfigError(f"{path.parent} holds generations made with other settings ({'; '.join(said)}); {advice}")


def _recorded_decoding(b, e, shard_dir: Path, dec) -> dict | None:
    """The decoding a benchmark's answers were made with, as its results record it (without ``FREE_DECODING``):
    the command's; under ``judge_only`` the one the stored answers were made with (judged as they are, whatever the
    command says); none for lm-eval, which decodes as its tasks say (its settings are recorded under "lm_eval")."""
    if b.kind == "lm_eval":
        return None
    # (a manifest that does not read back is named where the stored answers are read, generate's _check_manifest)
    made = read_json(shard_dir / "trained-manifest.json").get("decoding") if e.judge_only else None
    return answer_decoding(made if isinstance(made, dict) else vars(dec))


def _decoding(b, run_cfg, policy_cfg) -> types.SimpleNamespace:
    """The benchmark's decoding for this run's model, in the shape the shared samplers read."""
    dec = dataclasses.asdict(decoding_for(b, run_cfg.model.name))
    dec["backend"] = _backend(types.SimpleNamespace(**dec), policy_cfg)
    return types.SimpleNamespace(**dec, shard_size=b.shard_size, seeds=[dec["seed"]], samples_per_seed=1)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _rule(ctx: dict) -> dict:
    """Trained vs starting model on the run's held-out synthetic prompts, judged by the sort-digits rule."""
    b, run_cfg, out = ctx["benchmark"], ctx["run_cfg"], ctx["out"]
    prompts = bm.rule_prompts(run_cfg, b.max_prompts, ctx["run_dir"])
    model = ctx["generate"](ctx["trained"], prompts, "trained")
    start = ctx["generate"](
        starting_policy(run_cfg, ctx["device"], ctx["run_dir"], f"benchmarks.{b.name}"), prompts, "start"
    )
    rows = rule_preferences(prompts, [g["text"] for g in model], [g["text"] for g in start])
    write_jsonl(
        out / "generations.jsonl",
        [
            {
                "id": p["id"],
                "prompt": p["instruction"],
                "model": m["text"],
                "start": s["text"],
                **{k: r[k] for k in ("score_model", "score_baseline", "preference")},
            }
            for p, m, s, r in zip(prompts, model, start, rows)
        ],
    )
    exact = lambda key: 100.0 * sum(r[key] == 1.0 for r in rows) / len(rows)  # noqa: E731
    preferences = [r["preference"] for r in rows]
    return {
        "metrics": {
            "win_rate": win_rate(preferences),
            "standard_error": standard_error(preferences),
            "score": _mean([r["score_model"] for r in rows]),
            "score_start": _mean([r["score_baseline"] for r in rows]),
            "exact": exact("score_model"),
            "exact_start": exact("score_baseline"),
            "avg_tokens": _mean([g["n_tokens"] for g in model]),
            "n": len(rows),
        },
        "baseline": "the starting model (the run's config rebuilt: same model.path, or same random init and seed)",
        # which one, as its answers' manifest names it: runs trained from different models do not compare
        "start_weights": read_json(out / "shards" / "start-manifest.json").get("weights"),
    }


# What results.json records of a judge: the keys its kind reads.
JUDGE_RECORD = {"openai": ("kind", "base_url", "model"), "alpaca_eval": ("kind", "annotators_config")}
PAIRWISE_METHOD = (
    "this project's pairwise judge (simpo_exp/evaluate/judge.py): its one-letter prompt, the answers' order by a "
    "seeded coin per prompt, a binary preference (no logprob weighting); AlpacaEval's format and LC GLM, not its "
    "weighted_alpaca_eval_gpt4_turbo annotator, so not a leaderboard figure unless the judge is that annotator "
    "(the LC GLM's regularising rows, df_gamed.csv, are that annotator's preferences of other models: about a sixth "
    "of its fit's weight over 805 prompts comes from them, not from this judge)"
)


def verdicts_path(out: Path, judge_model: str) -> Path:
    """Where a judge's verdicts are kept: one file per judge model (``verdicts/<model>.jsonl``), so that judging
    with another and coming back asks the first nothing again. A ``verdicts.jsonl`` of the single file kept before
    is moved to its own judge's file."""
    path = Path(out) / "verdicts" / f"{judge_file_name(judge_model)}.jsonl"
    legacy = Path(out) / "verdicts.jsonl"
    first = next(iter(read_lines(legacy)), None) if legacy.is_file() else None
    if isinstance(first, dict) and isinstance(first.get("judge"), str):
        owner = Path(out) / "verdicts" / f"{judge_file_name(first['judge'])}.jsonl"
        if not owner.exists():
            owner.parent.mkdir(parents=True, exist_ok=True)
            legacy.replace(owner)
    return path


def _judge_pairs(
    ctx: dict, prompts: list[dict], texts: list[str], info: dict, generator: str
) -> tuple[dict, list[str]]:
    """Win rate (and LC where it applies) from the configured pairwise judge; the judged pairs are written."""
    b, out = ctx["benchmark"], ctx["out"]
    judge = PairwiseJudge(b.judge, f"benchmarks.{b.name}")
    path = verdicts_path(out, b.judge.model)
    verdicts = judge.judge(prompts, texts, path)
    every = annotations(prompts, texts, verdicts, generator, info["reference_generator"], b.judge.model)
    rows = [r for r in every if r["preference"] is not None]  # the judged pairs
    write_json(out / "annotations.json", rows)
    missing = len(verdicts) - len(rows)
    preferences = [r["preference"] for r in rows]
    metrics = {"win_rate": win_rate(preferences), "standard_error": standard_error(preferences)}
    # no verdict: the judge's reply was no letter (its word, stored), or the endpoint refused or failed the request
    # (nothing stored: asked again by the next run) -- counted apart, as a user acts on them apart
    errors = [v["error"] for v in verdicts if v.get("error")]
    metrics["unparseable_verdicts"], metrics[UNJUDGED], notes = missing - len(errors), len(errors), []
    if missing - len(errors):
        notes.append(
            f"{missing - len(errors)} of {len(verdicts)} judge replies were not 'a' or 'b' (preference null in "
            f"{path}); those prompts are left out of the win rate"
        )
    if errors:
        notes.append(unjudged_note(len(errors), len(verdicts), "prompts", errors))
    if b.kind == "alpacaeval":
        # every prompt of the set judged; as alpaca-eval does with its own annotators' missing preferences, those
        # the judge gave no verdict are left out of the GLM's fit but not of its average over the instructions;
        # too many of those, and the fit reads its regularising rows rather than this model
        if why := lc_missing_note(missing, len(every), len(errors), path):
            metrics |= NO_LC
        else:
            lc, why = length_controlled(every, info["rows"])
            metrics |= lc
        notes += [why] if why else []
    return metrics, notes


def _count_cut(metrics: dict, gens: list[dict], ctx: dict) -> list[str]:
    """``cut_at_max_new_tokens`` into ``metrics``: the answers that reached ``max_new_tokens`` before their
    end-of-turn token (judged as they are: a judge reads a cut answer, and a length-controlled win rate its length);
    a note where there are any, with the limit the answers were made with (the model's ``by_model`` one, or under
    ``judge_only`` the stored answers'). Answers stored before ``finished`` was recorded count as finished."""
    cut = sum(g.get("finished") is False for g in gens)
    metrics["cut_at_max_new_tokens"] = cut
    if not cut:
        return []
    limit = ctx["decoding"]["max_new_tokens"]
    return [
        f"{cut} of {len(gens)} answers reached max_new_tokens={limit} (benchmarks.{ctx['benchmark'].name}.decoding)"
        " before their end-of-turn token and are judged as cut"
    ]


def _alpacaeval(ctx: dict) -> dict:
    b, out = ctx["benchmark"], ctx["out"]
    prompts, info = bm.alpaca_prompts(b.prompts_path, f"benchmarks.{b.name}.prompts_path", b.max_prompts)
    gens = ctx["generate"](ctx["trained"], prompts, "trained")
    # as alpaca-eval's evaluate_from_model hands them to its judge and counts their length (is_strip_output)
    texts = [g["text"].strip() for g in gens]
    generator = ctx["name"]
    write_json(out / "model_outputs.json", bm.alpaca_model_outputs(prompts, texts, generator))
    metrics = {"avg_length": _mean([len(t) for t in texts]), "n": len(texts)}  # characters, as alpaca-eval counts
    notes = [f"{len(texts)} of {info['rows']} prompts (max_prompts)"] if len(texts) < info["rows"] else []
    notes += _count_cut(metrics, gens, ctx)
    record = {"notes": notes, "baseline": info["reference_generator"], "dataset_name": "AlpacaEval 2"}
    if b.judge.kind != "openai":  # the pairwise judge's rows of an earlier evaluation are not this one's samples
        (out / "annotations.json").unlink(missing_ok=True)  # (its verdicts stay in verdicts/)
    if b.judge.kind == "openai":
        judged, more = _judge_pairs(ctx, prompts, texts, info, generator)
        metrics, record["notes"] = {**metrics, **judged}, notes + more
        record["win_rate_method"] = PAIRWISE_METHOD
    elif b.judge.kind == "alpaca_eval":
        # the reference rows as alpaca-eval reads them, a JSON array: it refused the JSON lines (.jsonl, or under a
        # .json name as datasets' to_json writes) that this stage reads, after every answer was generated
        key = f"benchmarks.{b.name}.prompts_path"
        write_json(out / "reference_outputs.json", bm.alpaca_reference_rows(b.prompts_path, key))
        metrics.update(
            package_judge(b, out / "model_outputs.json", str(out / "reference_outputs.json"), out / "alpaca_eval")
        )
        if why := lc_subset_note(len(texts), info["rows"]):  # alpaca-eval would fit its GLM on another set
            metrics |= NO_LC
            record["notes"].append(why)
        record["win_rate_method"] = f"alpaca_eval's annotator {b.judge.annotators_config}"
        record["annotations_path"] = str(package_annotations_path(out / "alpaca_eval", b.judge.annotators_config))
    return {"metrics": metrics, **record}


def _arena_hard(ctx: dict) -> dict:
    b, out = ctx["benchmark"], ctx["out"]
    prompts, info = bm.arena_prompts(b.prompts_path, b.reference_path, f"benchmarks.{b.name}", b.max_prompts)
    gens = ctx["generate"](ctx["trained"], prompts, "trained")
    model_id = ctx["name"].replace("/", "_")
    write_jsonl(out / "model_answer" / f"{model_id}.jsonl", bm.arena_answers(prompts, gens, model_id))
    texts = [g["text"] for g in gens]
    metrics = {"avg_tokens": _mean([g["n_tokens"] for g in gens]), "n": len(texts)}
    record = {
        "notes": _count_cut(metrics, gens, ctx),
        "baseline": info["reference_generator"],
        "dataset_name": "Arena-Hard",
    }
    if b.judge.kind == "openai":  # arena-hard-auto's judge prompt, games and score (simpo_exp/evaluate/arena.py)
        judged = judge_arena_hard(b, prompts, texts, model_id, info["reference_generator"], out)
        metrics.update(judged.pop("metrics"))
        record.update(judged)
    return {"metrics": metrics, **record}


def _lm_eval(ctx: dict) -> dict:
    """lm-eval's scores of the trained model; those a finished evaluation recorded for the same weights, dtype and
    settings are taken as they are (lm-eval has no resume of its own: a re-run would score every task again)."""
    from simpo_exp.evaluate.lmeval import run_lm_eval, settings

    b, trained = ctx["benchmark"], ctx["trained"]
    made_with = {"weights": _weights_id(trained), "model_dtype": trained.model.dtype, **settings(b, trained)}
    made_with["lm_eval_version"] = _versions().get("lm-eval")  # another lm-eval: its tasks and defaults may differ
    made_with["tokenizer"] = _tokenizer_id(trained)  # apply_chat_template renders with the saved template
    earlier = read_json(results_path(ctx["run_dir"], b.name))
    stored = earlier.get("made_with")
    # a record written before the tokenizer was recorded is compared without it, as the manifests are
    if isinstance(stored, dict) and "tokenizer" not in stored:
        made_with_then = {k: v for k, v in made_with.items() if k != "tokenizer"}
    else:
        made_with_then = made_with
    if stored == made_with_then and earlier.get("metrics"):
        log.info("%s: %s already evaluated with these weights and settings; its results are kept", ctx["name"], b.name)
        return {k: earlier[k] for k in ("metrics", "notes", "baseline", "lm_eval", "made_with") if k in earlier}
    if ctx.get("judge_only"):  # lm-eval scores by running the model: nothing stored to judge again
        raise ConfigError(
            f"evaluate.judge_only=true, but benchmarks.{b.name} (lm-eval) holds no results for these weights and "
            "settings to keep, and lm-eval scores by running the model; run once without judge_only"
        )
    set_aside(ctx["run_dir"], b.name)
    return {**run_lm_eval(b, trained, ctx["out"]), "made_with": made_with}


# How a kind's prompts are rendered where not as the policy was trained. Arena-Hard: the model's template over the
# user turn alone, as arena-hard-auto's gen_answer sends it (a system turn only where its api config names one;
# SimPO's configs name none): a ``simpo_repo`` run's empty system turn (zephyr's template writes it) is left out.
# AlpacaEval keeps it: SimPO's own AlpacaEval templates (mistral_base.txt) begin with that empty system turn.
CHAT_FORMAT_OF = {"arena_hard": "generation_prompt"}

RUNNERS = {"rule": _rule, "alpacaeval": _alpacaeval, "arena_hard": _arena_hard, "lm_eval": _lm_eval}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from simpo_exp.environment import git_commit

    found = {}
    for pkg in ("transformers", "torch", "vllm", "alpaca-eval", "lm-eval"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = None
    return {**found, "simpo_exp_git_commit": git_commit()}


def evaluate_benchmark(run_dir: Path, run_cfg, b, e, name: str | None = None) -> dict:
    """One benchmark on the run whose model and records are in ``run_dir`` (``name``: the run's, else from its
    folder's ``.hydra/``)."""
    out = Path(run_dir) / EVAL_DIR / b.name
    trained = trained_policy(run_cfg, run_dir, e.device)
    dec = _decoding(b, run_cfg, trained)
    ctx = {
        "benchmark": b,
        "run_cfg": run_cfg,
        "out": out,
        "device": e.device,
        "trained": trained,
        "name": name or run_name(run_cfg, run_dir),
        "run_dir": Path(run_dir),
        "judge_only": e.judge_only,
        "decoding": _recorded_decoding(b, e, out / "shards", dec),
        "generate": lambda cfg, prompts, tag: generate(
            cfg,
            prompts,
            dec,
            out / "shards",
            tag,
            e.judge_only,
            CHAT_FORMAT_OF.get(b.kind),
            f"benchmarks.{b.name}.decoding.backend",
        ),
    }
    if b.kind != "lm_eval":  # lm-eval's runner reuses a record of the same weights and settings
        set_aside(run_dir, b.name)
    record = RUNNERS[b.kind](ctx)
    recorded = JUDGE_RECORD.get(b.judge.kind, ("kind",))  # the keys the judge of this kind reads
    if b.kind == "arena_hard" and b.judge.kind == "openai":  # the score's weighting, and how long a reply may run
        recorded += ("strong_weight", "max_tokens")
    judge = {k: v for k, v in dataclasses.asdict(b.judge).items() if k in recorded}
    record = {
        "benchmark": b.name,
        "kind": b.kind,
        "run_dir": str(Path(run_dir).resolve()),
        "model": trained.model.path,
        **record,
        "notes": record.get("notes", []),
        "decoding": ctx["decoding"],
        "judge": judge,
        "prompts_path": b.prompts_path or None,
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(results_path(run_dir, b.name), record)
    return record


def _runs_to_evaluate(path: str) -> tuple[list[Path], list[Path]]:
    """(runs with a trained model, runs without one); a single run without one is an error."""
    root = Path(path)  # (evaluate_all has expanded a leading ~)
    if not root.exists():
        raise ConfigError(f"invalid config value evaluate.path={path!r}: no such directory")
    runs = find_runs(root)
    stage = None if runs else output_stage(root)
    if stage is not None:
        raise ConfigError(
            f"invalid config value evaluate.path={path!r}: this is the {stage} stage's output, not a training run; "
            "give the run directory (or a sweep's) whose model/ to evaluate"
        )
    if not runs and has_model(root):  # trained with output_dir=<this folder>: its config is in its Hydra folder
        raise ConfigError(
            f"invalid config value evaluate.path={path!r}: it holds a trained model but not the run's config "
            "(.hydra/config.yaml), which stays in the folder Hydra ran it in (hydra.run.dir, outputs/<date>/<time> "
            "unless given) when output_dir= names another; give that folder"
        )
    if not runs:
        raise ConfigError(
            f"invalid config value evaluate.path={path!r}: no run directory (one with .hydra/config.yaml) "
            "at or below it"
        )
    ready = [r for r in runs if has_model(records_dir(r))]
    if not ready:
        which = str(runs[0]) if len(runs) == 1 else f"{len(runs)} runs under {path}"
        raise ConfigError(
            f"invalid config value evaluate.path={path!r}: no trained model in {which} (model/ with "
            "config.json, then summary.json and finished.json, are written when training finishes, with "
            "save_model=true); train it first"
        )
    return ready, [r for r in runs if r not in ready]


def _finish_run(folder: Path, run_dir: Path, run_cfg, e, name: str) -> None:
    """The model card with every benchmark's results so far, and the push when asked and a token exists (``folder``:
    the run's Hydra folder, ``run_dir`` where it wrote its model)."""
    from simpo_exp.modelcard import job_repo_id, push_model, write_model_card

    if e.model_card:
        write_model_card(run_dir, saved_config(folder), name, rewrite=True)
    if e.push_to_hub:
        # a repo per run of a sweep: of a sweep folder, or of a --multirun over run folders (each job sees one run,
        # and every job pushed to hub_repo itself, each over the last)
        alone = len(find_runs(Path(e.path))) == 1 and not _paths_swept()
        repo = e.hub_repo if alone else job_repo_id(e.hub_repo, folder.name)
        try:
            url = push_model(run_dir, repo, e.hub_token_env)
        except Exception as err:  # a refused token, no network: said; the results are kept, the other runs go on
            log.error(
                "push of %s to %s failed (%s: %s); the results are kept: re-run the command to push",
                run_dir / "model",
                repo,
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
            return
        if url:
            print(f"pushed {run_dir / 'model'} -> {url}", flush=True)


def _paths_swept() -> bool:
    """Whether this job is one of a --multirun over ``evaluate.path`` (each job sees one run of several)."""
    from simpo_exp.runinfo import this_sweeps_keys

    return "evaluate.path" in this_sweeps_keys()


def check_benchmark_inputs(cfg, model_names: set[str] = frozenset()) -> None:
    """Read every benchmark's prompt and reference files (their rows checked as each benchmark reads them) and check
    lm-evaluation-harness is there for an lm-eval one, alpaca-eval for ``judge.kind=alpaca_eval``: a missing or
    malformed file for the second benchmark stopped the stage after the first had generated (and judged) on the
    first run, the sweep's other runs not evaluated.
    A ``by_model`` entry naming neither a shipped model preset nor an evaluated run's model (``model_names``) is
    said: a misspelt name was never applied, without a word."""
    from simpo_exp.evaluate.judge import import_alpaca_eval
    from simpo_exp.evaluate.lmeval import check_installed, check_task_data, check_tasks
    from simpo_exp.rundir import CONF_DIR

    known = {p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml")} | set(model_names)
    for b in cfg.benchmarks.values():
        for name in sorted(set(b.by_model) - known):
            log.warning(
                "benchmarks.%s.by_model.%s: no model preset and none of the runs evaluated here is named %s, so its "
                "decoding is applied to none (the runs' models: %s)",
                b.name, name, name, ", ".join(sorted(model_names)) or "none",
            )  # fmt: skip
        if b.kind == "alpacaeval":
            bm.alpaca_prompts(b.prompts_path, f"benchmarks.{b.name}.prompts_path", b.max_prompts)
            if b.judge.kind == "alpaca_eval":  # not after every answer is generated
                import_alpaca_eval(b)
        elif b.kind == "arena_hard":
            bm.arena_prompts(b.prompts_path, b.reference_path, f"benchmarks.{b.name}", b.max_prompts)
        elif b.kind == "lm_eval":
            check_installed(b)
            # a misspelt task, and one whose data set is not cached, before any run generates for the others
            check_task_data(b, check_tasks(b))


def _model_name(folder: Path) -> str | None:
    """The model preset name a run's saved config gives, read as text (the run's whole config is read, and checked,
    at its turn)."""
    from simpo_exp.rundir import read_yaml

    config = read_yaml(Path(folder) / ".hydra" / "config.yaml")
    model = config.get("model") if isinstance(config, dict) else None
    return model.get("name") if isinstance(model, dict) and isinstance(model.get("name"), str) else None


def _eval_folder_writable(run_dir: Path) -> None:
    """Refuse, naming it, a run whose ``eval/`` folder cannot be made or written (another user's run on shared
    storage, a read-only disk): the stage stores its answers, verdicts and results there."""
    try:
        probe_writable(run_dir / "eval")
    except OSError as e:
        raise ConfigError(
            f"evaluate.path: {run_dir / 'eval'} cannot be written ({e.strerror or e}): the stage keeps its answers and "
            "results in the run's eval/ folder; evaluate a copy of the run in a folder you can write"
        ) from None


def evaluate_all(cfg) -> list[dict]:
    """Every benchmark on every run with a trained model under ``evaluate.path``; returns the results."""
    e = cfg.evaluate
    # "~/runs/x" read as the home's everywhere: the push's one-run-or-a-sweep check and the printed compare command
    # took it literally (no run found there: a single run pushed under a sweep job's repo name)
    e.path = str(Path(e.path).expanduser())
    runs, skipped = _runs_to_evaluate(e.path)
    for r in skipped:
        print(
            f"skipped {r}: no trained model (no model/, or no finished.json beside it: the run failed, stopped or "
            "is still running)",
            flush=True,
        )
    # before any run is evaluated: a bad input found at its benchmark's or run's turn stopped the stage after the
    # others had run, an unwritable eval/ folder with a traceback
    check_benchmark_inputs(cfg, {_model_name(folder) for folder in runs} - {None})
    for folder in runs:
        _eval_folder_writable(records_dir(folder))
    records, judge_failures = [], []
    for folder in runs:  # the Hydra folder (the run's config); its model and records where output_dir put them
        run_dir = records_dir(folder)
        hold_folder(run_dir / "eval", "another evaluate command is working on this run; wait for it to end (the "
                    "answers and verdicts it stores are reused)")  # fmt: skip
        run_cfg = load_run_config(folder)
        name = run_name(run_cfg, folder)
        for b in cfg.benchmarks.values():
            try:
                rec = evaluate_benchmark(run_dir, run_cfg, b, e, name)
            except JudgeError as err:  # the answers are stored: go on with the other benchmarks and runs
                print(
                    f"{run_dir.name}  {b.name}: judging failed, answers and verdicts so far kept in "
                    f"{run_dir / 'eval' / b.name}",
                    flush=True,
                )
                judge_failures.append(err)
                continue
            shown = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in rec["metrics"].items()
                if v is not None
            )
            print(f"{run_dir.name}  {b.name}: {shown}  -> {results_path(run_dir, b.name)}", flush=True)
            unmeasured = [k for k, v in rec["metrics"].items() if v is None]
            if unmeasured:  # LC without alpaca-eval, say: why is in the notes, shown here too
                print(f"  not measured: {', '.join(unmeasured)}; " + " ".join(rec.get("notes") or []), flush=True)
            records.append(rec)
        _finish_run(folder, run_dir, run_cfg, e, name)
        done = [r["benchmark"] for r in records if r["run_dir"] == str(run_dir.resolve())]
        if e.wandb != "off" and done:
            from simpo_exp.evaluate.wandb_log import log_results

            log_results(run_dir, done, run_cfg.logger.init_timeout, trained_with_wandb=run_cfg.logger.wandb)
    if judge_failures:
        raise JudgeError("; ".join(dict.fromkeys(str(err) for err in judge_failures)))
    waiting = [f"{Path(r['run_dir']).name} {r['benchmark']}" for r in records if awaiting_judge(r["metrics"])]
    metric = _rank_metric(records)
    if waiting:  # their win rates are of the judged part alone: not a ranking yet
        print(
            f"\nwarning: the judge endpoint refused or failed some requests ({', '.join(waiting)}): those win rates "
            "are of the prompts judged so far; re-run the same command to ask the rest again",
            flush=True,
        )
    elif len(runs) > 1 and metric:
        print(f"\nrank them: python -m simpo_exp.compare {shlex.quote(e.path)} --metric {metric}", flush=True)
    return records


def _rank_metric(records: list[dict]) -> str | None:
    """The compare key to rank runs by: the first benchmark's length-controlled win rate where any run measured it,
    else its win rate, else its first lm-eval score (``<task>/<metric>:<filter>``), a higher-is-better one where there
    is one (lambada lists its perplexity before its accuracy). Never an answer length or a count: a benchmark with
    answers alone (judge.kind=none) offers nothing to rank by."""
    measured = lambda rec: [k for k, v in rec["metrics"].items() if v is not None]  # noqa: E731
    for bench in dict.fromkeys(rec["benchmark"] for rec in records):
        mine = [rec for rec in records if rec["benchmark"] == bench]
        names = {k for rec in mine for k in measured(rec)}
        scores = [k for rec in mine for k in measured(rec) if ":" in k and "_stderr:" not in k]
        scores = [k for k in scores if not is_lower_score(k)] or scores
        # a task's length-normalised accuracy where it has one (ARC, HellaSwag: what the leaderboards report)
        scores = [n if (n := k.replace("/acc:", "/acc_norm:", 1)) in names else k for k in scores]
        metric = next((k for k in HEADLINE if k in names), scores[0] if scores else None)
        if metric:
            return f"{PREFIX}{bench}/{metric}"
    return None
