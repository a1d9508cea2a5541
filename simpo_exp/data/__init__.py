"""Preference data: sources -> normalised conversations -> tokens -> filtered splits -> batches.

``build_datasets`` is the one call the loop makes; it returns the tokenised train and test
splits and a report of what was kept, dropped (by reason) and truncated.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field

from datasets import Dataset, disable_progress_bars

from simpo_exp.config import Config
from simpo_exp.data.collate import PairCollator
from simpo_exp.data.report import report_lines, tokenization_report
from simpo_exp.data.sources import DataSourceError, load_mixture, source_drops
from simpo_exp.data.tokenize import check_chat_format, tokenise

log = logging.getLogger(__name__)
disable_progress_bars()  # one progress bar per run (the loop's), not one per map()

MODEL_COLUMNS = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]

__all__ = ["build_datasets", "DataReport", "DataSourceError", "EmptySplitError", "PairCollator", "MODEL_COLUMNS"]


class EmptySplitError(DataSourceError):
    """No usable pair is left in a split after filtering."""


@dataclass
class DataReport:
    sources: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)  # split -> rows kept
    dropped: dict = field(default_factory=dict)  # split -> {reason: count}
    truncated: dict = field(default_factory=dict)  # split -> {"chosen": n, "rejected": n}
    cut: dict = field(default_factory=dict)  # split -> usable pairs left out by dataset.max_*_samples
    test_prompts_in_train: int = 0  # test pairs used whose prompt a train pair used has too
    tokenization: dict = field(default_factory=dict)  # see simpo_exp/data/report.py

    def lines(self) -> list[str]:
        out = []
        for split in self.kept:
            drops = ", ".join(f"{r}: {n}" for r, n in sorted(self.dropped[split].items())) or "none"
            t = self.truncated[split]
            cut = f"; {self.cut[split]} more left out by dataset.max_*_samples" if self.cut.get(split) else ""
            prompts = f", prompt {t['prompt']} (its start cut)" if t.get("prompt") else ""
            out.append(
                f"{split}: kept {self.kept[split]} pairs{cut}; dropped {drops}; "
                f"truncated chosen {t['chosen']}, rejected {t['rejected']}{prompts}"
            )
        for name, size in self.sources.items() if len(self.sources) > 1 else ():  # a mixture: each source's share
            usable = {s: size[f"{s}_rows"] - sum(size["dropped"].get(s, {}).values()) for s in ("train", "test")}
            out.append(
                f"dataset.sources.{name}: usable train pairs {usable['train']} of {size['train_rows']}, "
                f"test {usable['test']} of {size['test_rows']}"
            )
        return out


def _filter(ds: Dataset, split: str, report: DataReport) -> Dataset:
    """The split's usable pairs; none left is an error naming the sources and the reasons."""
    reasons = Counter(r for r in ds["drop_reason"] if r)
    kept = ds.filter(lambda r: not r, input_columns="drop_reason", desc=f"filtering {split}")
    report.dropped[split] = dict(reasons)
    if len(kept) == 0:
        raise EmptySplitError(
            f"no usable preference pair left in the {split} split of dataset.sources.{'/'.join(report.sources)} "
            f"({len(ds)} rows, "
            f"dropped: {dict(reasons) or 'none'}); "
            "check the data files, the column mapping and max_length/max_prompt_length"
        )
    return kept


def _test_prompts_in_train(train: Dataset, test: Dataset) -> int:
    """How many test pairs have a prompt conversation that a train pair has too (of the pairs used: after the
    drops and the ``max_*_samples`` cuts)."""
    key = lambda prompt: tuple((m["role"], m["content"]) for m in prompt)  # noqa: E731
    seen = {key(p) for p in train["prompt"]}
    return sum(key(p) in seen for p in test["prompt"])


def build_datasets(cfg: Config, tokenizer) -> tuple[Dataset, Dataset, DataReport]:
    raw, sizes = load_mixture(cfg.dataset)
    report = DataReport(sources=sizes)
    check_chat_format(tokenizer, cfg.dataset.chat_format)
    d = cfg.dataset
    made = {
        split: tokenise(raw[split], tokenizer, cfg.max_length, cfg.max_prompt_length, d.num_proc, d.chat_format)
        for split in ("train", "test")
    }
    # normalising's and tokenising's, the first of each named by file and line
    for name, drops in source_drops(made, len(d.sources), name_rows=True, sources=d.sources).items():
        report.sources[name]["dropped"] = drops
    splits = {}
    for split in ("train", "test"):
        ds = _filter(made[split], split, report)
        limit = cfg.dataset.max_train_samples if split == "train" else cfg.dataset.max_eval_samples
        if limit is not None and len(ds) > limit:
            # train is shuffled already; the test split is the sources one after another, so its pairs are drawn
            # (kept in their order): the first ones would all come from the first source of a mixture
            keep = (
                range(limit)
                if split == "train"
                else sorted(random.Random(d.shuffle_seed).sample(range(len(ds)), limit))
            )
            report.cut[split] = len(ds) - limit
            ds = ds.select(keep)
        splits[split] = ds
        report.kept[split] = len(ds)  # counted on what is used: after the max_*_samples cut
        report.truncated[split] = {side: int(sum(ds[f"{side}_truncated"])) for side in ("chosen", "rejected")}
        if any(ds["prompt_truncated"]):  # dataset.chat_format=simpo_repo keeps a long prompt's last tokens
            report.truncated[split]["prompt"] = int(sum(ds["prompt_truncated"]))
    # counted on the pairs used: before the drops and the cuts it said several times the overlap the figures had
    report.test_prompts_in_train = _test_prompts_in_train(splits["train"], splits["test"])
    if report.test_prompts_in_train:
        log.warning(
            "%d of the test pairs have a prompt that training also reads (sources built from the same prompts, as "
            "the UltraFeedback sets are, or a test file that repeats train rows): the held-out figures are not "
            "wholly held out",
            report.test_prompts_in_train,
        )
    report.tokenization = tokenization_report(splits, tokenizer, cfg.dataset)
    for line in report.lines() + report_lines(report.tokenization):
        log.info(line)
    return splits["train"], splits["test"], report
