"""The model card of a trained model (``<run>/model/README.md``) and the optional push to the Hub.

The card follows the Hugging Face convention: YAML front matter (``base_model``, ``datasets``,
``tags``, ``library_name`` and, when the run has been evaluated, a ``model-index`` with each
benchmark's numbers), then a short text with the recipe's hyper-parameters. Built with
huggingface_hub's ``ModelCardData``/``EvalResult`` so the metadata is what the Hub parses.

Called by a training run after it saves ``model/`` (no results yet), and by the evaluate stage after every
benchmark.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
from pathlib import Path

from simpo_exp.inference.results import is_uncertainty, load_results
from simpo_exp.rundir import CONF_DIR, read_json, select

log = logging.getLogger(__name__)
# Each as the run used it: the values training resolved (learning rate from the model size, accumulation for the
# global batch on this many processes, gamma from beta x ratio) over the config's own. After the method: the keys
# its loss reads (the table of methods), then these.
TRAINING_KEYS = (
    "sft_weight",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "effective_batch_size",
    "max_length",
    "max_prompt_length",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "precision/master_weights_dtype",  # the dtypes it trained in (summary.json's precision/*)
    "precision/autocast_dtype",
    "seed",
)


def recipe_keys(method: str | None) -> tuple[str, ...]:
    """The model card's recipe rows: the method, the config keys its loss reads (``gamma`` beside
    ``gamma_beta_ratio``, as the run resolved it), the training keys."""
    from simpo_exp.methods import TABLE

    reads = list(TABLE[method].reads) if method in TABLE else []
    if "gamma_beta_ratio" in reads:
        reads.insert(reads.index("gamma_beta_ratio") + 1, "gamma")
    return ("method", *reads, *TRAINING_KEYS)


# The run's own held-out figures at its end (summary.json), in the card beside the evaluate stage's.
TRAINING_RESULTS = ("eval/rewards/accuracies", "eval/rewards/margins", "eval/loss", "train/global_step")
LICENSE_KEYS = ("license", "license_name", "license_link")


def base_license(model_path: str) -> dict:
    """The base model's licence, as its own card states it (``license``, and ``license_name``/``license_link`` for
    "other"): from a local model folder's README.md, or the hub card where the local cache holds it, or, where the
    hub can be reached, fetched (transformers downloads a base's weights, config and tokenizer, never its card: a
    Llama or Gemma derivative trained online was pushed without its licence); {} where none is at hand. A
    derivative's card without one shows no licence on the hub."""
    from huggingface_hub import ModelCard

    from simpo_exp.hub import cached_hub_file, hub_reachable

    readme = Path(model_path).expanduser() / "README.md" if model_path else None
    if readme is not None and not readme.is_file() and _is_hub_id(model_path):
        readme = cached_hub_file(model_path, "README.md")
        if (readme is None or not readme.is_file()) and hub_reachable():
            try:
                from huggingface_hub import hf_hub_download

                readme = Path(hf_hub_download(model_path, "README.md"))
            except Exception as e:  # no card, a gated repo without a token, the network gone: no licence taken
                log.debug("no card fetched for %s: %s", model_path, e)
                readme = None
    if readme is None or not readme.is_file():
        return {}
    try:
        data = ModelCard.load(readme).data.to_dict()
    except Exception as e:  # a card that does not parse: no licence taken from it
        log.debug("no licence read from %s: %s", readme, e)
        return {}
    found = {k: data[k] for k in LICENSE_KEYS if data.get(k)}
    link = str(found.get("license_link") or "")
    if link and "://" not in link and _is_hub_id(model_path):  # a file of the base's repo, not of this one
        while link.startswith(("./", "/")):  # "./LICENSE", "/LICENSE": the repo's root (not ".github/LICENSE")
            link = link.removeprefix("./").removeprefix("/")
        found["license_link"] = f"https://huggingface.co/{model_path}/blob/main/{link}"
    return found


def copy_license_file(model_path: str, folder: Path, link: str) -> Path | None:
    """The base folder's licence file that its card links to by a relative ``license_link`` (``LICENSE``, from
    ``base_license``), copied beside the derivative's card, which keeps the link: without it the link was dead on
    the hub."""
    link = str(link or "") if model_path else ""
    source = Path(model_path).expanduser() / link if link and "://" not in link else None
    if source is None or not source.is_file() or (Path(folder) / link).exists():
        return None
    (Path(folder) / link).parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(source, Path(folder) / link))


# a file's name, not a hub repo's: "data/prefs.jsonl" (read after the file moved) was named a hub data set
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".arrow", ".txt", ".safetensors", ".bin")


def _is_hub_id(path: str) -> bool:
    if not path or Path(path).suffix.lower() in DATA_FILE_SUFFIXES:
        return False
    return not Path(path).expanduser().exists() and path.count("/") == 1


def is_count(metric: str) -> bool:
    """A benchmark's counters (prompts judged, battles, replies it could not read, answer lengths, answers cut at the
    token limit) and the starting model's figures (``*_start``): in the card's table, not among the model's results
    in its metadata."""
    counters = ("n", "battles", "avg_length", "avg_tokens", "judged_games", "cut_at_max_new_tokens")
    counters += ("unjudged", "unjudged_games")  # answers or games the judge gave no verdict on
    return metric in counters or metric.startswith(("unparseable", "n_")) or metric.endswith(("/n", "_start"))


def measured_with(rec: dict) -> str:
    """How a benchmark's figures were made, in words: the judge, the baseline, the prompts judged. AlpacaEval-format
    figures from a local judge are not leaderboard figures; the card says which they are."""
    judge = rec.get("judge") if isinstance(rec.get("judge"), dict) else {}
    parts = [f"judge {judge['model']}" if judge.get("model") else ""]
    parts.append(f"baseline {rec['baseline']}" if rec.get("baseline") else "")
    metrics = rec.get("metrics") or {}
    # the prompts judged (``n``), or lm-eval's samples per task (``<task>/n``, a float) where a limit cut them
    n = metrics.get("n")
    if n is None and isinstance(rec.get("lm_eval"), dict) and rec["lm_eval"].get("limit"):
        n = next((v for k, v in metrics.items() if k.endswith("/n")), None)
    n = int(n) if isinstance(n, float) and n.is_integer() else n
    parts.append(f"{n} prompts" if isinstance(n, int) else "")
    return ", ".join(p for p in parts if p)


def _dataset_name(bench: str, rec: dict) -> str:
    """A benchmark's name in the card's metadata: its data set's (else the benchmark's), with how it was measured."""
    name, how = rec.get("dataset_name", bench), measured_with(rec)
    return f"{name} ({how})" if how else name


def card_data(cfg: dict, results: dict[str, dict], name: str, licence: dict | None = None, origin=None):
    """The card's metadata; ``licence``: the base's (``base_license``), read here where not given; ``origin``: the
    ``base_model`` and ``datasets`` the card training wrote says (``earlier_origin``), which win where given."""
    from huggingface_hub import EvalResult, ModelCardData

    model_path = select(cfg, "model.path") or ""
    licence = base_license(model_path) if licence is None else licence
    sources = (select(cfg, "dataset.sources") or {}).values()
    datasets = sorted({s.get("path") for s in sources if isinstance(s, dict) and _is_hub_id(s.get("path") or "")})
    base = model_path if _is_hub_id(model_path) else None
    if origin is not None:  # told where training ran: a relative local path is no hub id from another folder
        base, datasets = origin.get("base_model"), origin.get("datasets") or []
    evals = [
        EvalResult(
            task_type="text-generation",
            dataset_type=bench,
            dataset_name=_dataset_name(bench, rec),
            metric_type=metric,
            metric_value=value,
        )
        for bench, rec in sorted(results.items())
        for metric, value in sorted((rec.get("metrics") or {}).items())
        # a number the hub's metadata check takes: not a flag, not NaN or infinite (YAML's .nan)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        and not is_count(metric) and not is_uncertainty(metric)
    ]  # fmt: skip
    return ModelCardData(
        **licence,
        base_model=base,
        datasets=datasets or None,
        library_name="transformers",
        tags=[select(cfg, "method") or "simpo", "preference-optimization", "simpo-exp"],  # the method trained
        model_name=name,
        eval_results=evals or None,
    )


def card_text(
    cfg: dict,
    results: dict[str, dict],
    name: str,
    resolved: dict | None = None,
    training: dict | None = None,
    licence: dict | None = None,
    origin: dict | None = None,
    sources: dict | None = None,
) -> str:
    """The card's text; ``sources``: the run's ``data_report.json`` sources, whose generate-stage provenance names
    the policy and scorer the pairs came from (local files, which the metadata cannot name)."""
    data = card_data(cfg, results, name, licence, origin)
    model = (
        select(cfg, "model.path") or f"a randomly initialised model ({select(cfg, 'model.name')}, built from config)"
    )
    if select(cfg, "model.path") and select(cfg, "model.revision"):  # a pinned commit or branch (base_model cannot)
        model += f" at revision `{select(cfg, 'model.revision')}`"
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        f"Trained with simpo-exp ({select(cfg, 'method') or 'simpo'}) from {model} on "
        f"{', '.join((select(cfg, 'dataset.sources') or {}).keys()) or 'its configured data'}"
        + (f" (dataset preset `{select(cfg, 'dataset.name')}`)." if _is_its_preset(cfg) else "."),
        "",
    ]
    if select(cfg, "hardware.lora"):
        stored = select(cfg, "save_dtype") or "float32"
        rounding = (
            "(a merge rounded to bfloat16 would lose most of an update at SimPO's learning rates)"
            if stored == "float32"
            else "(save_dtype: rounded to it after the merge, where updates of SimPO's size round away; the adapter "
            "keeps them)"
        )
        lines += [
            f"Trained with LoRA adapters (rank {select(cfg, 'hardware.lora_r')}, alpha "
            f"{select(cfg, 'hardware.lora_alpha')}, on {select(cfg, 'hardware.lora_target_modules')}). These weights "
            f"are the base model with the adapters merged in, stored in {stored} {rounding}; the adapter alone, in "
            "PEFT's format, is in `adapter/`"
            + (
                "."
                if select(cfg, "model.path")
                else " (its base is the random initialisation, stored nowhere: drawn again only from "
                f"`model.random_init` and seed {select(cfg, 'seed')}; use these merged weights)."
            ),
            "",
        ]
    lines += generated_lines(sources or {})
    if select(cfg, "dataset.chat_format") == "simpo_repo":
        lines += [
            "Prompt format: as the official SimPO recipe (alignment-handbook's), every training prompt began with an "
            "empty system turn where the chat template takes one. The saved chat template is the tokenizer's and adds "
            'none: to prompt as in training, start the messages with `{"role": "system", "content": ""}`.',
            "",
        ]
    lines += [
        "## Recipe",
        "",
        "| key | value |",
        "|---|---|",
    ]
    values = {k: (resolved or {}).get(k, select(cfg, k)) for k in recipe_keys(select(cfg, "method"))}
    # max_steps > 0 wins over num_train_epochs: the run ended at it, and the epochs row said what did not happen
    values.pop("num_train_epochs" if (values.get("max_steps") or -1) > 0 else "max_steps", None)
    lines += [f"| `{k}` | {v} |" for k, v in values.items() if v is not None]
    ended = {k: (training or {}).get(k) for k in TRAINING_RESULTS}
    ended = {k: v for k, v in ended.items() if isinstance(v, (int, float))}
    if ended:
        lines += ["", "## Training", "", "At the end of training, on the data set's held-out pairs:", ""]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v if isinstance(v, int) else round(v, 4)} |" for k, v in ended.items()]
    if results:
        lines += ["", "## Evaluation", "", "| benchmark | metric | value |", "|---|---|---|"]
        lines += [
            f"| {bench} | {metric} | {value if not isinstance(value, float) else round(value, 4)} |"
            for bench, rec in sorted(results.items())
            for metric, value in (rec.get("metrics") or {}).items()
            if value is not None
        ]
        lines += [
            "",
            "Measured by `python -m simpo_exp.evaluate`; each benchmark's settings are in the run's "
            "`eval/<benchmark>/results.json`:",
            "",
        ]
        for bench, rec in sorted(results.items()):
            how = "; ".join(
                x for x in [measured_with(rec), rec.get("win_rate_method") or "", *(rec.get("notes") or [])] if x
            )
            lines.append(f"- {bench}: {how or 'as its results.json records'}")
    return "\n".join(lines) + "\n"


def generated_lines(sources: dict) -> list[str]:
    """A line per data source the generate stage made (its ``provenance.json``, as the run's data report keeps it):
    the policy sampled, how, and the scorer, so that an on-policy round's card names where its pairs came from."""
    lines = []
    for name, source in sources.items() if isinstance(sources, dict) else ():  # a damaged report: no line
        made = source.get("provenance") if isinstance(source, dict) else None
        if not isinstance(made, dict) or made.get("created_by") != "simpo_exp.generate":
            continue
        policy, g, scorer = made.get("policy") or {}, made.get("generate") or {}, made.get("scorer") or {}
        weights = (policy.get("fingerprint") or {}).get("sha256") or (policy.get("fingerprint") or {}).get("commit")
        lines += [
            f"Data source `{name}`: on-policy pairs from simpo-exp's generate stage, sampled from "
            f"{policy.get('path') or policy.get('name') or 'its policy'}"
            + (f" (weights {weights[:12]})" if weights else "")
            + f" with {len(g.get('seeds') or [])} seeds x {g.get('samples_per_seed')} at temperature "
            f"{g.get('temperature')}, top_p {g.get('top_p')}, up to {g.get('max_new_tokens')} new tokens, scored by "
            f"{scorer.get('path') or scorer.get('name') or 'its scorer'}, binarised "
            f"{(made.get('binarise') or {}).get('mode')} (its provenance.json: {made.get('file')}).",
            "",
        ]
    return lines


def resolved_values(summary: dict) -> dict:
    """The values training resolved, as a run's summary records them (``resolved/<key>``), by their keys, and the
    dtypes it trained in (``precision/<what>``, as recorded)."""
    return {k.removeprefix("resolved/"): v for k, v in summary.items() if k.startswith("resolved/")} | {
        k: v for k, v in summary.items() if k.startswith("precision/")
    }


def earlier_origin(path: Path) -> dict | None:
    """The metadata of the card training wrote (``path``), where there is one that parses: its base model, data
    sets and licence were read where training ran (a relative local ``model.path`` read from another folder, or
    after the folder was cleaned away, is no hub id)."""
    if not Path(path).is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(path).data.to_dict()
    except Exception:  # a card that does not parse: worked out again
        return None


def write_model_card(
    run_dir: Path,
    cfg,
    name: str | None = None,
    resolved: dict | None = None,
    training: dict | None = None,
    rewrite: bool = False,
) -> Path:
    """Write ``<run_dir>/model/README.md`` from the run's resolved config (a plain dict, or the ``Config``
    dataclass training holds), the values training resolved (``resolved``; else those its summary.json
    recorded as ``resolved/<key>``), its final metrics (``training``; else its summary.json's) and the results of
    any evaluation found in ``run_dir``. ``rewrite``: the evaluate stage's, which keeps the base model, data sets
    and licence of the card training wrote."""
    import dataclasses

    from simpo_exp.inference.files import write_atomic

    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    run_dir = Path(run_dir)
    name = name or select(cfg, "logger.run_name") or run_dir.name
    path = run_dir / "model" / "README.md"
    summary = read_json(run_dir / "summary.json") if resolved is None or training is None else {}
    resolved = resolved_values(summary) if resolved is None else resolved
    training = summary if training is None else training
    model_path = select(cfg, "model.path") or ""
    licence = base_license(model_path)  # the base's card, read once for the metadata and the licence file
    origin = earlier_origin(path) if rewrite else None
    if origin is not None and not licence:  # a relative base folder, not found from here: as training read it
        licence = {k: origin[k] for k in LICENSE_KEYS if origin.get(k)}
    sources = read_json(run_dir / "data_report.json").get("sources")
    text = card_text(cfg, load_results(run_dir), str(name), resolved, training, licence, origin, sources)
    write_atomic(path, text)
    copy_license_file(model_path, path.parent, licence.get("license_link"))
    return path


def job_repo_id(base: str, job: str, limit: int = 96) -> str:
    """The Hub repo of one sweep job: ``<base>-<job dir>``, made a valid repo name (letters, digits, '-', '_',
    '.'; no '--' or '..'; at most ``limit`` characters). Job directories hold '=' and ',' and run long; a name cut
    short ends with a hash of the whole, so two jobs never share a repo."""
    owner, _, name = base.rpartition("/")
    full = re.sub(r"[^A-Za-z0-9_.]+", "-", f"{name}-{job}")
    full = re.sub(r"\.{2,}", ".", re.sub(r"-{2,}", "-", full)).strip("-.")
    if len(full) > limit:
        full = full[: limit - 9].rstrip("-.") + "-" + hashlib.sha256(job.encode()).hexdigest()[:8]
    return f"{owner}/{full}" if owner else full


def push_model(run_dir: Path, repo_id: str, token_env: str = "HF_TOKEN", private: bool = True) -> str | None:
    """Upload ``<run_dir>/model`` to the Hub repo ``repo_id`` when a token is set; return its URL (None: no token)."""
    token = os.environ.get(token_env)
    if not token:
        log.warning("push_to_hub: no token in $%s; the model stays local", token_env)
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(Path(run_dir) / "model"),
        repo_id=repo_id,
        commit_message="simpo-exp: model, tokenizer and model card",
    )
    return str(getattr(info, "commit_url", info))


def _is_its_preset(cfg: dict) -> bool:
    """Whether ``dataset.name`` names the data the run used: a list of presets (``dataset=[a,b]``) keeps the last
    one's name over all their sources, so a mixture is named only where that preset has those sources
    (``ultrafeedback-mix``)."""
    import yaml

    name, sources = select(cfg, "dataset.name"), set(select(cfg, "dataset.sources") or {})
    if len(sources) < 2:
        return bool(name)
    preset = Path(CONF_DIR) / "dataset" / f"{name}.yaml"
    try:
        return set((yaml.safe_load(preset.read_text()) or {}).get("sources") or {}) == sources
    except (OSError, yaml.YAMLError, AttributeError):
        return False
