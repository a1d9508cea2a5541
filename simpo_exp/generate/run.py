"""The generate stage: prompts -> sampled responses -> scores -> pairs, in resumable shards.

Layout of an output directory:
    shards/manifest.json          what the shards were made with (a resumed run must match it)
    shards/responses-00000.jsonl  sampled responses of shard 0 (one line per prompt)
    shards/scored-00000-<scorer>.jsonl  the same with a score per response, named by a hash of the scorer's
                                  settings and weights: another scorer, or new weights at its path, scores
                                  the responses again, none is sampled again
    shards-test/...               the same for the test split's prompts (generate.splits=[train,test])
    data/train.jsonl              the preference pairs (`dataset=local dataset.sources.local.path=...`)
    data/test.jsonl               the test prompts' pairs (generate.splits=[train,test]): training evaluates on them
    data/provenance.json          policy and scorer fingerprints, generation/scorer/binarise config, counts
    report.json                   prompts kept and dropped by reason, score and length statistics (the test
                                  split's under "test")

Every file is written to a temporary name and renamed, so a killed run leaves only whole files;
re-running the same command (same hydra.run.dir) skips finished shards. Several processes split the
shards (RANK / WORLD_SIZE from the environment: shard i is done by process i % WORLD_SIZE); the
process that finds every shard scored writes the data set. All responses of a process are sampled
before the scorer loads, so the policy and a reward model are never in memory together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shlex
import time
from pathlib import Path

from simpo_exp.config import ConfigError
from simpo_exp.data.prompts import split_prompts, train_prompts
from simpo_exp.data.sources import DataSourceError, synthetic_task
from simpo_exp.data.tokenize import unrendered_role
from simpo_exp.generate.binarise import binarise
from simpo_exp.inference.files import (
    DamagedFile,
    manifest_changes,
    read_jsonl,
    weights_sha256,
    write_atomic,
    write_json,
    write_jsonl,
)
from simpo_exp.inference.sampling import (
    derive_seed,
    effective_precision,
    pick_device,
    prompt_texts,
    sampling_dtype,
    text_token_ids,
)
from simpo_exp.rundir import read_json, read_json_value, rerun_command, shell_override

log = logging.getLogger(__name__)


class NoPairsError(DataSourceError):
    """Binarising left no usable pair; the message gives the counts by reason."""


def policy_fingerprint(cfg) -> dict:
    """What identifies the policy's weights: a hash of local weight files, the hub commit, or the
    random init (tiny shape and seed)."""
    m = cfg.model
    if not m.path:
        spec = {"tiny": dataclasses.asdict(m.random_init), "seed": cfg.seed}
        return {
            "kind": "random-init",
            **spec,
            "sha256": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest(),
        }
    return weights_fingerprint(m.path, m.revision)


def policy_positions(cfg) -> int | None:
    """The positions the policy reads (its config's, a random init's shape); None where its config names none."""
    from simpo_exp.inference.sampling import configured_positions

    m = cfg.model
    if not m.path:
        return m.random_init.max_position_embeddings
    from simpo_exp.hub import check_model_available

    # a model neither on disk nor in the cache, named as training names it
    check_model_available(m.path, m.revision, trust_remote_code=m.trust_remote_code)
    return configured_positions(m)


def weights_fingerprint(name: str, revision, commit: bool = True) -> dict:
    """A local model directory's weights as a hash of its files; a hub id as itself, its revision and (``commit``)
    the commit the local cache holds for them (None before the first download)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return {"kind": "local", "path": str(path.resolve()), "sha256": weights_sha256(path)}
    if not commit:  # nor is the name looked up: a typo is named by the model's own check, not the hub client
        return {"kind": "hub", "path": name, "revision": revision}
    from simpo_exp.hub import hub_commit

    return {"kind": "hub", "path": name, "revision": revision, "commit": hub_commit(name, revision)}


def _manifest(cfg, fingerprint: dict, prompts: list[dict]) -> dict:
    g = dataclasses.asdict(cfg.generate)
    for key in ("name", "vllm_gpu_memory_utilization", "splits"):  # (each split's shards have a manifest of their own)
        g.pop(key)
    if g["backend"] == "vllm":  # batches its requests itself: batch_size is the hf backend's (a resume changing it
        g.pop("batch_size")  # was refused for nothing)
    ids = hashlib.sha256("".join(p["prompt_id"] for p in prompts).encode()).hexdigest()
    # the token ids the policy was given: the tokenizer, its chat template and BOS handling in one key (a resumed
    # command with another model.tokenizer_path, or a template changed in a local model folder, sampled its shards
    # from other prompts than the ones before it, and the data set mixed the two); the same tokenizer named another
    # way (model.tokenizer_path=<model.path>) gives the same ids and resumes
    tokens = hashlib.sha256(json.dumps([p["input_ids"] for p in prompts]).encode()).hexdigest()
    return {
        "policy": fingerprint,
        "chat_template": cfg.model.chat_template,
        "generate": g,
        "prompts": len(prompts),
        "prompt_ids_sha256": ids,
        "prompt_tokens_sha256": tokens,
        "max_prompt_length": cfg.max_prompt_length,
        # what the samples are computed in (the same weights in another precision sample other responses): the
        # dtype the weights are loaded in, and the one the sampler runs them in (hardware.master_weights upcasts)
        "model_dtype": cfg.model.dtype,
        "sampling_dtype": str(sampling_dtype(cfg, pick_device(cfg.hardware.device))).removeprefix("torch."),
        "mixed_precision": effective_precision(cfg.hardware.mixed_precision, pick_device(cfg.hardware.device)),
        "attention": cfg.model.attn_implementation or cfg.hardware.attn_implementation,
        # the layer kernels the hf backend samples through (Liger's differ from transformers' in rounding, which
        # greedy ties and sampled tokens follow); vLLM runs its own kernels whatever the setting
        **({"fused_layers": cfg.hardware.fused_layers} if g["backend"] == "hf" else {}),
    }


def check_manifest(shard_dir: Path, manifest: dict, device=None) -> None:
    """Refuse to add shards to ones made with another config. A manifest with no shard beside it (left by a
    run that failed before its first shard) binds nothing: it is replaced. ``device``: this command's, to read an
    older manifest's configured ``mixed_precision`` as what it meant there."""
    path = shard_dir / "manifest.json"
    has_shards = any(shard_dir.glob("responses-*.jsonl")) or any(shard_dir.glob("scored-*.jsonl"))
    if not (path.exists() and has_shards):
        write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True))
        return
    differ = manifest_differences(shard_dir, manifest, device)
    if differ:
        raise ConfigError(
            f"output_dir={str(shard_dir.parent)!r} holds shards made with other settings ({'; '.join(differ)}); "
            "a resumed generation must repeat the same command (where it does, its data or the way this version "
            "picks the prompts changed): use a new hydra.run.dir"
        )


def manifest_differences(shard_dir: Path, manifest: dict, device=None) -> list[str]:
    """How the stored manifest of ``shard_dir`` differs from ``manifest`` (``dotted.key: stored X, now Y``)."""
    old = read_json_value(shard_dir / "manifest.json")
    if not isinstance(old, dict):  # (edited into a list, say)
        return ["manifest.json: missing or unreadable"]
    if isinstance(old.get("generate"), dict) and old["generate"].get("backend") == "vllm":
        old["generate"].pop("batch_size", None)  # recorded before vLLM's was left out (see _manifest)
    if device is not None and isinstance(old.get("mixed_precision"), str):  # recorded as configured before ("auto"
        old["mixed_precision"] = effective_precision(old["mixed_precision"], device)  # on a CPU computes as "no")
    # a key an older manifest lacks is not held against it (it was written before that key was recorded); the
    # scorer, which older manifests held, binds only its own scored shards (their names carry its settings' hash)
    return manifest_changes(old, json.loads(json.dumps(manifest)), keys=set(old) - {"scorer"}, stored_only=True)


def check_still_bound(shard_dir: Path, manifest: dict, device=None) -> None:
    """Refuse to write a shard (or the data set) where the folder's manifest is no longer this process's: processes
    of one generation started together (the README's ``RANK=$i ... &``) each wrote theirs before any shard bound it,
    and one given other settings (another temperature, model.path) sampled its shards with them into the data set,
    which recorded the last one's settings alone."""
    differ = manifest_differences(shard_dir, manifest, device)
    if differ:
        raise ConfigError(
            f"output_dir={str(shard_dir.parent)!r}: another process of this generation wrote its settings there "
            f"meanwhile ({'; '.join(differ)}): every process of one generation must be given the same command; "
            "nothing of this process was written since"
        )


def _sample_shard(sampler, cfg, index: int, prompts: list[dict], split: str = "train") -> list[dict]:
    """Every seed's pass over one shard; responses in seed order, then sample order. Each split's shards draw
    from streams of their own (the test split's shard 0 drew the train split's shard 0's noise)."""
    ids = [p["input_ids"] for p in prompts]
    keys = [p["prompt_id"] for p in prompts]
    records = [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "responses": []} for p in prompts]
    for seed in cfg.generate.seeds:
        stream = derive_seed(seed, index) if split == "train" else derive_seed(seed, split, index)
        for record, samples in zip(records, sampler.sample(ids, keys, stream)):
            record["responses"] += [{**s, "seed": seed} for s in samples]
    return records


def _score_shard(scorer, records: list[dict]) -> list[dict]:
    """Each record with its responses' ``scores`` (and, from a reward model, ``scorer_cut``: the responses whose
    text was cut to ``scorer.max_length`` tokens before scoring, so read mid-response)."""
    flat = [(rec["prompt"], r["text"]) for rec in records for r in rec["responses"]]
    scores = iter(scorer.score([p for p, _ in flat], [t for _, t in flat]))
    cut = iter(getattr(scorer, "cut", None) or [False] * len(flat))
    return [
        {
            **rec,
            "scores": [float(next(scores)) for _ in rec["responses"]],
            "scorer_cut": [bool(next(cut)) for _ in rec["responses"]],
        }
        for rec in records
    ]


def read_shard(path: Path, prompts: list[dict], cfg) -> list[dict]:
    """A shard's responses (or scores) read back, checked to hold the shard: its prompts in order, each with every
    response (and a score for each). A file cut short (the system down before the disk held its tail) lost prompts
    from the data set without a word, and an empty one failed in the tokenizer naming nothing."""
    records = read_jsonl(path)
    want = [p["prompt_id"] for p in prompts]
    got = [r.get("prompt_id") for r in records]
    per_prompt = len(cfg.generate.seeds) * cfg.generate.samples_per_seed
    problem = None
    if len(got) != len(want):
        problem = f"it holds {len(got)} prompts, its shard {len(want)}"
    elif got != want:
        n = next(n for n, (a, b) in enumerate(zip(got, want)) if a != b)
        problem = f"row {n + 1} is prompt {got[n]!r}, the shard's is {want[n]!r}"
    else:
        for n, record in enumerate(records, 1):
            counts = {"responses": len(record.get("responses") or [])}
            if path.name.startswith("scored-"):
                counts["scores"] = len(record.get("scores") or [])
            short = {k: v for k, v in counts.items() if v != per_prompt}
            if short:
                problem = f"row {n} (prompt {record['prompt_id']!r}) has {short}, not {per_prompt} each"
                break
    if problem:
        raise DamagedFile(
            f"{path}: {problem}; the file was cut short or edited. Delete it and {rerun_command()}: the stage makes "
            "it again"
        )
    return records


LONG_ANSWER = 1024  # new tokens below which a real model's answers are mostly cut (UltraFeedback's run to ~2000)


def _tokenised_prompts(cfg, tokenizer, split: str = "train") -> tuple[list[dict], dict]:
    prompts, counts = train_prompts(cfg.dataset) if split == "train" else split_prompts(cfg.dataset, split)
    rendered = []  # a prompt whose turn the template leaves out (an unknown role) would be sampled without it
    for p in prompts:
        try:
            text, reason = prompt_texts(tokenizer, [p["prompt"]])[0], None
        except Exception as e:  # a template that refuses a system turn (Gemma's): training drops these rows too
            reason = f"chat template error: {str(e).splitlines()[0][:80]}"
        if not reason and (role := unrendered_role(p["prompt"], text)):
            reason = f"chat template leaves out the prompt's {role!r} turn"
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
        else:
            rendered.append((p, text))
    total, kept = len(rendered), []
    if not rendered:
        raise DataSourceError(f"the chat template renders no {split} prompt whole ({counts})")
    for (p, _), ids in zip(rendered, text_token_ids(tokenizer, [text for _, text in rendered])):
        if len(ids) > cfg.max_prompt_length:
            counts["prompt too long"] = counts.get("prompt too long", 0) + 1
        else:
            kept.append({**p, "input_ids": ids})
    if not kept:
        raise DataSourceError(
            f"every {split} prompt is longer than max_prompt_length={cfg.max_prompt_length} tokens ({counts})"
        )
    if counts.get("prompt too long"):  # the official pipeline samples every prompt: a share left out is said
        log.warning(
            "%d of the %d %sprompts are longer than max_prompt_length=%d tokens and are not sampled, so the data "
            "leans to shorter prompts; raise max_prompt_length (a model preset sets it: model=tiny's is 128) to "
            "keep them",
            counts["prompt too long"], total, "" if split == "train" else f"{split} ", cfg.max_prompt_length,
        )  # fmt: skip
    positions, longest = policy_positions(cfg), max(len(p["input_ids"]) for p in kept)
    if positions is not None and longest >= positions:  # said now, not after the shards before its own are sampled
        where = cfg.model.path or "model.random_init"
        raise ConfigError(
            f"max_prompt_length={cfg.max_prompt_length} lets through a prompt of {longest} tokens, which fills the "
            f"{positions} positions of {where}: nothing can be sampled after it. Set max_prompt_length below "
            f"{positions}, leaving room for generate.max_new_tokens={cfg.generate.max_new_tokens}"
        )
    key = "max_train_samples" if split == "train" else "max_eval_samples"  # training's caps of the two splits
    cap = getattr(cfg.dataset, key)
    if cap is not None and len(kept) > cap:  # of those that fit, so the cap is the number of prompts sampled
        counts[f"over dataset.{key}"] = len(kept) - cap
        # drawn (kept in their order), as training draws its capped pairs: the prompts are the sources one after
        # another, and the first ones would all come from a mixture's first source
        kept = [kept[i] for i in sorted(random.Random(cfg.dataset.shuffle_seed).sample(range(len(kept)), cap))]
    return kept, counts


def scorer_settings(cfg) -> dict:
    """The scorer's settings that change a score (not its name or batch size)."""
    return {k: v for k, v in dataclasses.asdict(cfg.scorer).items() if k not in ("name", "batch_size")}


def scorer_record(scorer) -> dict:
    """The scorer as provenance.json records it: the keys its kind reads (a rule has no model, a model no rule)."""
    model_keys = ("path", "revision", "trust_remote_code", "dtype", "chat_template", "label_index", "max_length")
    unread = ("rule",) if scorer.kind == "reward_model" else (*model_keys, "batch_size")
    return {k: v for k, v in dataclasses.asdict(scorer).items() if k not in unread}


def scorer_fingerprint(cfg, commit: bool = True) -> dict | None:
    """What identifies a reward model's weights (``weights_fingerprint``; None for a rule, which has none)."""
    s = cfg.scorer
    return weights_fingerprint(s.path, s.revision, commit) if s.kind == "reward_model" else None


def scorer_identity(cfg) -> dict:
    """``scorer_settings`` and, for a reward model, its weights: new weights at the same ``scorer.path`` score the
    responses again. A hub model is named by id and revision, not by the commit its cache holds, which is unknown
    before its first download (the same command would then score twice)."""
    weights = scorer_fingerprint(cfg, commit=False)
    if weights is None:  # a rule: the settings alone, as before weights were part of the name
        return scorer_settings(cfg)
    settings = {**scorer_settings(cfg), "weights": weights, "dtype": scorer_dtype(cfg)}  # "auto" as resolved here
    if settings["dtype"] != "float32":  # a bf16 score moves with the rows batched beside it (by up to 1e-3)
        settings["batch_size"] = cfg.scorer.batch_size
    return settings


def scorer_dtype(cfg) -> str:
    """The dtype the reward model scores in (``scoring.reward_model_dtype``: "auto" resolved, bfloat16 on a GPU,
    float32 on a CPU). bf16 keeps about three significant digits, so scores near each other (an ArmoRM's, some 0.01
    apart) tie or swap: a CPU's scores and a GPU's are not the same scores, and their shards are named apart."""
    from simpo_exp.inference.scoring import reward_model_dtype

    return str(reward_model_dtype(cfg)).removeprefix("torch.")


def scorer_tag(cfg) -> str:
    """8 hex of ``scorer_identity``: the suffix of the scored shards' names."""
    return hashlib.sha256(json.dumps(scorer_identity(cfg), sort_keys=True).encode()).hexdigest()[:8]


def adopt_older_scores(shard_dir: Path, cfg) -> None:
    """Scored shards written before their names carried the scorer's hash (``scored-00000.jsonl``), by the scorer
    the old manifest records, are taken as this scorer's when it has the same settings (not scored again)."""
    if read_json(shard_dir / "manifest.json").get("scorer") != scorer_settings(cfg):
        return
    tag = scorer_tag(cfg)
    for old in shard_dir.glob("scored-[0-9][0-9][0-9][0-9][0-9].jsonl"):
        new = scored_path(shard_dir, int(old.stem.split("-")[1]), tag)
        if not new.exists():
            os.replace(old, new)


def scored_path(shard_dir: Path, index: int, tag: str) -> Path:
    return shard_dir / f"scored-{index:05d}-{tag}.jsonl"


def scored_record_path(shard_dir: Path, index: int, tag: str) -> Path:
    """What scored a scored shard: its scorer's settings and weights (``scorer_identity``) and, for a hub reward
    model, the commit it was loaded from; written before the shard itself."""
    return shard_dir / f"scored-{index:05d}-{tag}.json"


def scorer_commit(cfg) -> str | None:
    """The commit of a hub reward model the local cache holds for ``scorer.revision`` (None for a local folder, a
    rule, or a model not yet downloaded)."""
    weights = scorer_fingerprint(cfg)
    return weights.get("commit") if weights else None


def scored_commit(shard_dir: Path, index: int, tag: str) -> str | None:
    """The hub commit a scored shard was scored by, where its record names one."""
    return read_json(scored_record_path(shard_dir, index, tag)).get("commit")


def _unscored(shard_dir: Path, indices: range, tag: str) -> list[int]:
    return [i for i in indices if not scored_path(shard_dir, i, tag).exists()]


def split_of(shard_dir: Path) -> str:
    """The split a shard folder holds (``shard_dir_of``'s inverse)."""
    return "train" if shard_dir.name == "shards" else shard_dir.name.removeprefix("shards-")


def shard_dir_of(out: Path, split: str) -> Path:
    """A split's shard folder: ``shards/`` for train (where it has always been), ``shards-test/``."""
    return out / ("shards" if split == "train" else f"shards-{split}")


def _of(shard_dir: Path) -> str:
    """The split a shard folder holds, as a log line's ending ("" for train)."""
    return "" if split_of(shard_dir) == "train" else f" of the {split_of(shard_dir)} split"


def _process(cfg, jobs: list[tuple[Path, list[list[dict]]]], rank: int, world: int, tag: str, bound=None) -> None:
    """This process's shards of each (shard directory, shards) job, one per split: sample the missing ones (the
    policy loaded once), then score the unscored ones (the scorer loaded once). ``bound(shard_dir)``: called before
    each sampled shard is written (``check_still_bound``)."""
    from simpo_exp.fused import kept_modeling_modules
    from simpo_exp.inference.sampling import make_sampler
    from simpo_exp.inference.scoring import make_scorer
    from simpo_exp.model import load_tokenizer

    work = []  # (shard_dir, shards, to_sample, to_score)
    for shard_dir, shards in jobs:
        mine = range(rank, len(shards), world)
        to_score = _unscored(shard_dir, mine, tag)
        to_sample = [i for i in to_score if not (shard_dir / f"responses-{i:05d}.jsonl").exists()]
        log.info(
            "process %d of %d: %d shards, %d to sample, %d to score%s",
            rank, world, len(mine), len(to_sample), len(to_score), _of(shard_dir),
        )  # fmt: skip
        work.append((shard_dir, shards, to_sample, to_score))
    if any(to_sample for *_, to_sample, _ in work):
        # hardware.fused_layers=liger replaces the policy family's layer classes for the whole process: put back
        # before the reward model (often of the same family) loads, or a later job of a sweep builds its models
        with kept_modeling_modules():
            # prompts over max_prompt_length are not sampled: vLLM's context is sized to it
            sampler = make_sampler(cfg, load_tokenizer(cfg.model), longest_prompt=cfg.max_prompt_length)
            for shard_dir, shards, to_sample, _ in work:
                for i in to_sample:
                    records = _sample_shard(sampler, cfg, i, shards[i], split_of(shard_dir))
                    if bound is not None:
                        bound(shard_dir)
                    write_jsonl(shard_dir / f"responses-{i:05d}.jsonl", records)
                    log.info("sampled shard %d (%d prompts)%s", i, len(shards[i]), _of(shard_dir))
            sampler.close()
    if any(to_score for *_, to_score in work):
        scorer = make_scorer(cfg)
        # read after the load, which moves the cache to the commit main (or the revision) names now
        record = {"scorer": scorer_identity(cfg), "commit": scorer_commit(cfg)}
        for shard_dir, shards, _, to_score in work:
            moved = [
                i
                for i in range(rank, len(shards), world)
                if i not in to_score
                and record["commit"]
                and scored_commit(shard_dir, i, tag) not in (None, record["commit"])
            ]
            if moved:  # one data set of one model's rewards, not of two commits of it
                log.warning(
                    "shards %s%s were scored by another commit of %s than the one loaded now (%s: scorer.revision=%s "
                    "has moved since): they are scored again; scorer.revision=<a commit> keeps one",
                    moved, _of(shard_dir), cfg.scorer.path, record["commit"], cfg.scorer.revision,
                )  # fmt: skip
            for i in sorted([*to_score, *moved]):
                records = read_shard(shard_dir / f"responses-{i:05d}.jsonl", shards[i], cfg)
                scored = _score_shard(scorer, records)
                write_json(scored_record_path(shard_dir, i, tag), record)
                write_jsonl(scored_path(shard_dir, i, tag), scored)
                log.info("scored shard %d%s", i, _of(shard_dir))
        scorer.close()


def scored_apart(cfg, out: Path, missing: dict, tag: str, started: float) -> None:
    """Where the shards this process waits for are scored by another scorer: refuse when another process scored one
    while this one ran (processes of one generation given different scorers each scored their own shards and
    waited for the others' under their own scorer: every one ended saying another would write the data set, and
    none did); say so otherwise (an earlier command's scores: a process given this scorer scores them again)."""
    identity = scorer_identity(cfg)
    for split, indices in missing.items():
        folder = shard_dir_of(out, split)
        for i in indices:
            others = [p for p in folder.glob(f"scored-{i:05d}-*.jsonl") if p != scored_path(folder, i, tag)]
            if not others:
                continue
            newest = max(others, key=lambda p: p.stat().st_mtime)
            other = read_json(newest.with_suffix(".json")).get("scorer")
            differ = (
                manifest_changes(other, identity, prefix="scorer.", said=("there", "here"))
                if isinstance(other, dict)
                else []
            )
            differ = [d for d in differ if not d.startswith("scorer.weights.path:")]  # scorer.path says it
            said = "; ".join(differ) or "another scorer"
            if newest.stat().st_mtime >= started:
                raise ConfigError(
                    f"output_dir={str(out)!r}: shard {i}{_of(folder)} was scored meanwhile by another process of this "
                    f"generation with another scorer ({said}; {newest.name}): every process of one generation must "
                    "be given the same command, or none of them writes the data set; this process's scored shards "
                    "are kept"
                )
            log.warning(
                "shard %d%s is scored by another scorer than this process's (%s; %s, from an earlier command): the "
                "process given this command's scorer for it scores it again and writes the data set; where every "
                "process has finished, run the command once more with WORLD_SIZE=1 to score what is missing",
                i, _of(folder), said, newest.name,
            )  # fmt: skip


def one_commit(cfg, folders: dict[Path, int], tag: str) -> str | None:
    """The one hub commit every scored shard was scored by (None where no record names one); refused where they name
    several (processes that loaded the reward model across a move of its revision: two models' rewards)."""
    by_commit: dict[str, list[str]] = {}
    for folder, count in folders.items():
        for i in range(count):
            if commit := scored_commit(folder, i, tag):
                by_commit.setdefault(commit, []).append(f"{i}{_of(folder)}")
    if len(by_commit) > 1:
        listed = "; ".join(f"{c[:12]}: shards {', '.join(v)}" for c, v in by_commit.items())
        raise ConfigError(
            f"scorer.path={cfg.scorer.path!r}, scorer.revision={cfg.scorer.revision!r}: the shards were scored by "
            f"different commits of it ({listed}); it moved while the processes ran: set scorer.revision=<one "
            "commit> and run the command again (the shards are scored again under it)"
        )
    return next(iter(by_commit), None)


def process_place() -> tuple[int, int]:
    """This process's (RANK, WORLD_SIZE) from the environment (0 and 1 when unset), refused by name unless
    0 <= RANK < WORLD_SIZE: another value would do no shard or another process's."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        rank = world = -1
    if not 0 <= rank < world:
        raise ConfigError(
            f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: the processes that split "
            "the shards need integers with 0 <= RANK < WORLD_SIZE"
        )
    return rank, world


def generate_data(cfg) -> dict:
    """Run the stage; return the report (or ``{"waiting_for": [...]}`` when other processes still work)."""
    from simpo_exp.environment import git_commit
    from simpo_exp.inference.scoring import (
        check_reward_model,
        check_reward_template,
        check_rule_prompts,
        load_reward_tokenizer,
    )
    from simpo_exp.model import load_tokenizer

    started = time.time()
    out = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    prompts, source_counts = {}, {}
    for split in cfg.generate.splits:
        prompts[split], source_counts[split] = _tokenised_prompts(cfg, tokenizer, split)
    # said before hours of sampling, not after; not for the synthetic task (scorer=rule), whose answers are short
    if cfg.model.path and cfg.scorer.kind != "rule" and cfg.generate.max_new_tokens < LONG_ANSWER:
        log.warning(
            "generate.max_new_tokens=%d cuts most answers of a chat model (the official recipe samples up to 4096 "
            "tokens: generate=paper, or generate.max_new_tokens=4096 with the hf backend); cut answers are kept as "
            "chosen and rejected unless binarise.drop_unfinished=true",
            cfg.generate.max_new_tokens,
        )
    fingerprint = policy_fingerprint(cfg)
    size = cfg.generate.shard_size
    shards = {split: [ps[i : i + size] for i in range(0, len(ps), size)] for split, ps in prompts.items()}
    rank, world = process_place()
    tag = scorer_tag(cfg)
    every = [p["prompt"] for ps in prompts.values() for p in ps]
    if cfg.scorer.kind == "rule":  # the scorer is refused before sampling, where it would fail after
        check_rule_prompts(every, cfg.dataset.name)
    elif any(_unscored(shard_dir_of(out, split), range(rank, len(sh), world), tag) for split, sh in shards.items()):
        check_reward_model(cfg.scorer)  # from its config alone: a wrong scorer.path fails before anything is written
        check_reward_template(load_reward_tokenizer(cfg.scorer), cfg.scorer, every)
        longest = max(len(p["input_ids"]) for ps in prompts.values() for p in ps)
        if longest + cfg.generate.max_new_tokens > cfg.scorer.max_length:  # said before the sampling, not after it
            log.warning(
                "the longest prompt (%d tokens) with generate.max_new_tokens=%d is past scorer.max_length=%d: "
                "responses that long are scored on their start; raise scorer.max_length (up to the reward model's "
                "positions; scorer=armorm reads 8192) to score them whole",
                longest, cfg.generate.max_new_tokens, cfg.scorer.max_length,
            )  # fmt: skip
    device, manifests = pick_device(cfg.hardware.device), {}
    for split in shards:
        adopt_older_scores(shard_dir_of(out, split), cfg)
        manifests[shard_dir_of(out, split)] = manifest = _manifest(cfg, fingerprint, prompts[split])
        check_manifest(shard_dir_of(out, split), manifest, device)
    bound = lambda folder: check_still_bound(folder, manifests[folder], device)  # noqa: E731
    _process(cfg, [(shard_dir_of(out, split), sh) for split, sh in shards.items()], rank, world, tag, bound)

    missing = {
        split: m for split, sh in shards.items() if (m := _unscored(shard_dir_of(out, split), range(len(sh)), tag))
    }
    if missing:
        scored_apart(cfg, out, missing, tag, started)
        log.info("shards %s are another process's; the last process to finish writes the data set", missing)
        return {
            "waiting_for": missing.get("train", []),
            **({"waiting_for_test": missing["test"]} if "test" in missing else {}),
        }
    for folder in manifests:  # the data set is written by the settings its shards were made with, or not at all
        bound(folder)
    scorer_weights = scorer_fingerprint(cfg)  # named by the commit its shards were scored by, not the cache's now
    if commit := one_commit(cfg, {shard_dir_of(out, split): len(sh) for split, sh in shards.items()}, tag):
        scorer_weights["commit"] = commit
    split_records = {
        split: [
            rec
            for i, shard in enumerate(sh)
            for rec in read_shard(scored_path(shard_dir_of(out, split), i, tag), shard, cfg)
        ]
        for split, sh in shards.items()
    }
    records = split_records["train"]
    rows, report = binarise(records, cfg.binarise)
    report = {
        "split": "train (prompts of each source's training split"
        + ("; the test split's under test)" if "test" in shards else " only)"),
        "source_rows": source_counts["train"],
        "samples_per_prompt": len(cfg.generate.seeds) * cfg.generate.samples_per_seed,
        **report,
    }
    test_rows = None
    if "test" in split_records:  # pairs of the test prompts, for training's held-out evaluation
        test_rows, test_report = binarise(split_records["test"], cfg.binarise)
        report["test"] = {"source_rows": source_counts["test"], **test_report}
        if not test_rows:
            log.warning(
                "no usable pair from the %d test prompts (dropped: %s): no data/test.jsonl, so training holds out "
                "dataset.test_size of the train pairs", test_report["prompts"], test_report["prompts_dropped"],
            )  # fmt: skip
    if cfg.scorer.kind == "rule":
        report["rule_exact_share"] = sum(s == 1.0 for rec in records for s in rec["scores"]) / report["responses"]
    else:  # a reward read mid-response is a reward of another text
        for split, part in (("train", report), ("test", report.get("test"))):
            if part is None:
                continue
            part["responses_cut_for_the_scorer"] = sum(sum(r.get("scorer_cut") or []) for r in split_records[split])
            if part["responses_cut_for_the_scorer"]:
                log.warning(
                    "%d of %d %s responses were longer, with their prompt, than scorer.max_length=%d tokens (or the "
                    "reward model's position limit, where lower) and were scored on their first tokens only; raise "
                    "scorer.max_length",
                    part["responses_cut_for_the_scorer"], part["responses"], split, cfg.scorer.max_length,
                )  # fmt: skip
    if report["non_finite_scores"]:
        log.warning(
            "%d of %d scores are NaN or infinite (scorer.dtype=%s: float16 overflows in some reward models; bfloat16 "
            "or float32 does not): those responses were neither chosen nor rejected",
            report["non_finite_scores"], report["responses"], cfg.scorer.dtype,
        )  # fmt: skip
    if report["pair_sides_hit_max_new_tokens"]:
        log.warning(
            "%d of the %d chosen and rejected responses ran into generate.max_new_tokens=%d before their end-of-turn "
            "token: training reads them as finished answers (the chat template closes the turn after the cut); raise "
            "generate.max_new_tokens (generate=paper: 4096) or set binarise.drop_unfinished=true",
            report["pair_sides_hit_max_new_tokens"], 2 * len(rows), cfg.generate.max_new_tokens,
        )  # fmt: skip
    if report["pair_sides_not_utf8"]:
        log.warning(
            "%d of the %d chosen and rejected responses hold sampled bytes that are not UTF-8, decoded as U+FFFD: "
            "training tokenises that character, not the tokens the policy sampled (report.json's lengths are the "
            "sampled ones); a policy that writes stray bytes (the embedded default's tiny random model does) or "
            "answers cut inside a character at generate.max_new_tokens",
            report["pair_sides_not_utf8"], 2 * len(rows),
        )  # fmt: skip
    # an earlier command's record of the data goes before this command writes anything, and this one's comes last:
    # a kill between the files leaves pairs without a record (read as of unknown origin), never beside another's
    (out / "data" / "provenance.json").unlink(missing_ok=True)
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    if not test_rows:  # a test split an earlier command wrote here is not this command's
        (out / "data" / "test.jsonl").unlink(missing_ok=True)
    if not rows:  # a data set an earlier command wrote here is not this command's: it goes (its test split too)
        for stale in (out / "data" / "train.jsonl", out / "data" / "test.jsonl", out / "data" / "provenance.json"):
            stale.unlink(missing_ok=True)
        gap_only = set(report["prompts_dropped"]) == {"score gap below binarise.min_gap"}
        scores = {s for rec in records for s in rec["scores"]}
        if gap_only:
            advice = f"lower binarise.min_gap={cfg.binarise.min_gap}"
        elif len(scores) == 1:  # a random init's answers to the synthetic task: every rule score 0
            better = (
                f"more prompts or samples per prompt, a higher generate.temperature, or a model trained further than "
                f"{cfg.model.path}"
                if cfg.model.path
                else "a model that can do the task (model.path=<a trained run>/model: on the embedded default, train "
                "one first with python -m simpo_exp)"
            )
            advice = (
                f"every one of the {report['responses']} responses scored {next(iter(scores))}: the scorer tells none "
                f"apart. Sample with {better}, or use another scorer"
            )
        else:
            advice = "sample more responses per prompt, raise generate.temperature or use another scorer"
        raise NoPairsError(
            f"no usable preference pair: {report['prompts']} prompts, dropped "
            f"{report['prompts_dropped']} (see {out / 'report.json'}); {advice}"
        )
    provenance = {
        "created_by": "simpo_exp.generate",
        "git_commit": git_commit(),
        "output_dir": str(out.resolve()),
        "policy": {
            "name": cfg.model.name,
            "path": cfg.model.path,
            "fingerprint": fingerprint,
            "sampled_in": str(sampling_dtype(cfg, pick_device(cfg.hardware.device))).removeprefix("torch."),
            **({"fused_layers": cfg.hardware.fused_layers} if cfg.generate.backend == "hf" else {}),
        },
        "dataset": {
            "name": cfg.dataset.name,
            "split": "train",  # the prompts of train.jsonl's pairs; test.jsonl's (where written) the test split's
            "sources": {k: v.path for k, v in cfg.dataset.sources.items()},
        },
        "generate": dataclasses.asdict(cfg.generate),
        "synthetic_task": dataclasses.asdict(task) if (task := synthetic_task(cfg.dataset)) else None,
        "scorer": scorer_record(cfg.scorer)
        | ({"fingerprint": scorer_weights, "scored_in": scorer_dtype(cfg)} if scorer_weights else {}),
        "binarise": dataclasses.asdict(cfg.binarise),
        "pairs": len(rows),
        "prompts": report["prompts"],
        "prompts_dropped": report["prompts_dropped"],
        **({"test_pairs": len(test_rows)} if test_rows else {}),
    }
    write_jsonl(out / "data" / "train.jsonl", rows)
    if test_rows:
        write_jsonl(out / "data" / "test.jsonl", test_rows)
    write_atomic(out / "data" / "provenance.json", json.dumps(provenance, indent=2))
    unsampled = {k: v for k, v in report["source_rows"].items() if k != "rows" and v}
    log.info(
        "%d pairs from %d prompts (dropped: %s; source rows not sampled: %s) -> %s",
        len(rows),
        report["prompts"],
        report["prompts_dropped"] or "none",
        unsampled or "none",
        out / "data" / "train.jsonl",
    )
    data = str(out.resolve() / "data" / "train.jsonl")
    if test_rows:  # the folder: training reads its train.jsonl and evaluates on its test.jsonl
        log.info("%d test pairs -> %s", len(test_rows), out / "data" / "test.jsonl")
        data = str(out.resolve() / "data")
    pairs = f"{len(rows)} pairs" + (f", {len(test_rows)} test pairs" if test_rows else "")
    print(f"\npreference data: {data} ({pairs})\ntrain on it: {train_command(cfg, data)}", flush=True)
    return report


DEFAULT_MODEL = "tiny"  # training's model preset when none is chosen (conf/config.yaml)


def train_command(cfg, data: str) -> str:
    """The command that trains on the pairs. On-policy, the next round trains the policy that sampled (its
    model.path; a random init is rebuilt from the run's seed), under this command's model preset (its learning
    rate and batch), its other ``model.*`` overrides (a random init's shape, the chat template, the revision) and
    config directories (where a preset of the user's own lives); a ``max_prompt_length`` (and ``max_length``) given
    here is training's too, or training drops the longer prompts that were sampled."""
    from hydra.core.hydra_config import HydraConfig

    from simpo_exp.runinfo import given_overrides

    words, given = ["python -m simpo_exp"], []
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        runtime, given = hc.runtime, given_overrides(hc)
        sources = [s for s in runtime.config_sources if s.schema == "file"]
        words += [f"--config-dir {shlex.quote(s.path)}" for s in sources if s.provider == "command-line"]
        searched = [f"{s.schema}://{s.path}" for s in runtime.config_sources if "searchpath" in s.provider]
        words += [f"'hydra.searchpath=[{','.join(searched)}]'"] if searched else []  # a list: quoted for the shell
        model = runtime.choices.get("model")
        words += [f"model={model}"] if model and model != DEFAULT_MODEL else []
        if model in (None, DEFAULT_MODEL):  # none named here: the sampled policy's run's own, where it is a run's
            words += policy_run_recipe(cfg.model.path, words, {_key(o) for o in given})
    words += ["dataset=local", shell_override("dataset.sources.local.path", data)]
    words += [shell_override("model.path", cfg.model.path)] if cfg.model.path else []
    # model.path as this command resolved it (above), or as given where it was cleared (a preset's path unused)
    carried = [o for o in given if _key(o).startswith("model.") and (_key(o) != "model.path" or not cfg.model.path)]
    words += map(shlex.quote, carried)
    words += [f"seed={cfg.seed}"] if not cfg.model.path else []  # the random init's weights
    for key in ("max_length", "max_prompt_length"):  # training's lengths, where given here
        words += [f"{key}={getattr(cfg, key)}"] if any(_key(o) == key for o in given) else []
    # the share of the pairs training holds out, where given here (the stage never reads it: it was dropped)
    words += (
        [f"dataset.test_size={cfg.dataset.test_size}"] if any(_key(o) == "dataset.test_size" for o in given) else []
    )
    return " ".join(words)


# a training run's command-line keys the next round does not take from it: its data and the policy (this command's),
# where it ran, and a sweep's or launcher's preset (refused in a single run)
NOT_CARRIED = ("dataset", "model", "hydra", "output_dir", "sweep", "launcher")


def policy_run_recipe(model_path: str | None, words: list[str], given: set[str] = frozenset()) -> list[str]:
    """Where ``model.path`` is a training run's ``model/`` trained under a model preset or recipe of its own: its
    ``experiment=`` recipe, else its model and hparams presets, and the rest of its command line (``beta=``, a
    learning rate, ...: not its data, model or folder, nor a key ``given`` to this command), with the config
    directory it found them in, for the next round to train as that run trained. Under the default preset the next
    round trained an 8B policy at the tiny model's 1e-3 (refused now: ``config.check_preset_size``); a run under the
    default preset trained with ``beta=5`` had its next round train at beta 2, the command naming nothing; a recipe's
    run's next round trained at the default beta, gamma and chat format (2, 0.5 and ``generation_prompt`` where
    ``experiment=simpo-llama3-8b-instruct-v2`` trains at 10, 0.3 and ``simpo_repo``), with no word of it."""
    from simpo_exp.rundir import read_yaml

    run = Path(model_path).parent if model_path else None
    hydra = (read_yaml(run / ".hydra" / "hydra.yaml") or {}).get("hydra") if run else None
    runtime = (hydra.get("runtime") or {}) if isinstance(hydra, dict) else {}
    choices = runtime.get("choices") or {}
    task = [str(o) for o in (hydra.get("overrides") or {}).get("task") or []] if isinstance(hydra, dict) else []
    recipe = next((o.partition("=")[2] for o in task if _key(o) == "experiment"), None)
    if not task and choices.get("model") in (None, DEFAULT_MODEL):
        return []  # not a run's folder, or a run of the defaults: nothing to carry
    sources = [s for s in runtime.get("config_sources") or [] if s.get("provider") == "command-line"]
    out = [f"--config-dir {shlex.quote(str(s.get('path')))}" for s in sources]
    out = [word for word in out if word not in words]
    if recipe:  # the recipe's own model and hparams presets, unless the run's command named others itself
        out += [f"experiment={recipe}"]
        out += [f"{group}={choices[group]}" for group in ("model", "hparams") if any(_key(o) == group for o in task)]
    else:  # the default preset's run (the README's own loop) carries its hparams preset and keys too
        out += [f"model={choices['model']}"] if choices.get("model") not in (None, DEFAULT_MODEL) else []
        out += [f"hparams={choices['hparams']}"] if choices.get("hparams") not in (None, "default") else []
    kept = [
        o for o in task if _key(o).split(".")[0] not in (*NOT_CARRIED, "experiment", "hparams") and _key(o) not in given
    ]
    return out + [shlex.quote(o) for o in kept]


def _key(override: str) -> str:
    """The key of a command-line override (``+model.x=1``, ``~model.x``: ``model.x``)."""
    return override.lstrip("+~").partition("=")[0]
