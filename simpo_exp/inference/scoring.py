"""Score (prompt, response) pairs: a rule for the embedded task, or a hub reward model.

Rule ``sort_digits`` (the synthetic data set asks "sort: 3 1 2"): the expected answer is the prompt's
numbers in ascending order, space separated (by value: "sort: 10 2" expects "2 10"). A response scores 1.0
when its whitespace-separated items equal the expected list exactly; otherwise it scores the share of
positions holding the expected number, divided by the longer of the two lengths (so a missing or extra item
costs as much as a wrong one):
"1 2 3" -> 1.0, "1 3 2" -> 1/3, "1 2" -> 2/3, "1 2 3 4" -> 3/4, "" -> 0.0.

Reward model: any ``AutoModelForSequenceClassification`` (ArmoRM by default for real models). The
response is rendered with the reward model's own chat template after the prompt; the reward is the
output's ``score`` field where the model has one (ArmoRM), else its single logit (or
``scorer.label_index``). A model whose config declares no sequence-classification head is refused.
"""

from __future__ import annotations

import logging
import re

import torch

from simpo_exp.config import ConfigError
from simpo_exp.layout import text_config

log = logging.getLogger(__name__)
SORT_PROMPT = re.compile(r"^\s*sort:\s*((?:\d\s*)+)$")


NOT_THE_TASK = (
    "the rule knows only the synthetic 'sort: <digits>' task. Use a reward model "
    "(scorer=armorm or scorer=reward-model scorer.path=...)"
)


def sort_digits_score(prompt: str, response: str) -> float:
    """See the module docstring; raises ConfigError for a prompt that is not a sorting task."""
    match = SORT_PROMPT.match(prompt)
    if not match:
        raise ConfigError(
            f"invalid config value scorer.rule='sort_digits': cannot score prompt {prompt[:80]!r}; {NOT_THE_TASK}"
        )
    expected = sorted(match.group(1).split(), key=int)  # by value: as text, "10" came before "2"
    got = response.split()
    if got == expected:
        return 1.0
    right = sum(a == b for a, b in zip(got, expected))
    return right / max(len(got), len(expected))


def check_rule_prompts(prompts: list[list[dict]], dataset: str) -> None:
    """Refuse, before any is sampled, prompts the rule cannot score (sampling them all is the expensive part)."""
    foreign = [p[-1]["content"] for p in prompts if not SORT_PROMPT.match(p[-1]["content"])]
    if foreign:
        raise ConfigError(
            f"invalid config value scorer.rule='sort_digits': {len(foreign)} of the {len(prompts)} prompts of "
            f"dataset={dataset} are not the synthetic task (the first: {foreign[0][:80]!r}); {NOT_THE_TASK}"
        )


class RuleScorer:
    def __init__(self, cfg):
        self.rule = cfg.scorer.rule

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        return [sort_digits_score(p[-1]["content"], r) for p, r in zip(prompts, responses)]

    def close(self) -> None:
        pass


def check_reward_model(s) -> None:
    """Refuse, from its config alone, a model without a sequence-classification head."""
    from transformers import AutoConfig

    from simpo_exp.hub import ModelNotFoundError, check_model_available

    check_model_available(s.path, s.revision, "scorer.path")
    try:
        config = AutoConfig.from_pretrained(s.path, revision=s.revision, trust_remote_code=s.trust_remote_code)
    except Exception as e:
        raise ModelNotFoundError(f"scorer.path={s.path!r}: cannot read a model config there ({e})") from e
    archs = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    if not (
        any(a.endswith("ForSequenceClassification") for a in archs) or "AutoModelForSequenceClassification" in auto_map
    ):
        raise ConfigError(
            f"invalid config value scorer.path={s.path!r}: not a reward model; its config names architectures "
            f"{archs or 'none'} and no AutoModelForSequenceClassification. "
            "A reward model is a *ForSequenceClassification "
            "model (e.g. RLHFlow/ArmoRM-Llama3-8B-v0.1 with scorer.trust_remote_code=true, or a model saved with "
            "num_labels=1); for the synthetic task use scorer=rule"
        )
    if "AutoModelForSequenceClassification" in auto_map and not s.trust_remote_code:
        raise ConfigError(
            f"invalid config value scorer.trust_remote_code=False: {s.path!r} ships its own model class "
            f"({auto_map['AutoModelForSequenceClassification']}); without it transformers loads a stock "
            f"{archs[0] if archs else 'sequence-classification'} model whose head is missing and drawn at random, "
            "and every score would be noise. Set scorer.trust_remote_code=true (scorer=armorm does)"
        )
    if "AutoModelForSequenceClassification" in auto_map:
        load_own_model_class(s, config, auto_map["AutoModelForSequenceClassification"])
    if not auto_map:  # a model with its own code says its outputs only when it runs (``_rewards`` checks them then)
        check_label_index(s, config.num_labels, "has")


def check_label_index(s, outputs: int, verb: str, then: str = "") -> None:
    """Refuse a ``scorer.label_index`` past the model's ``outputs``, or none where it has several (``verb``: "has",
    from its config; "returns", from its first scores, ``then`` saying what is kept)."""
    if s.label_index is not None and s.label_index >= outputs:
        raise ConfigError(
            f"invalid config value scorer.label_index={s.label_index}: {s.path!r} {verb} {outputs} output(s) "
            f"(0..{outputs - 1}){then}"
        )
    if outputs > 1 and s.label_index is None:
        raise ConfigError(
            f"invalid config value scorer.label_index=None: {s.path!r} {verb} {outputs} outputs; name the one that "
            f"is the reward (scorer.label_index=...){then}"
        )


def restore_removed_docstrings(model_type: str) -> None:
    """Put back, as empty strings, the docstring constants transformers 5 removed from its modeling modules
    (``LLAMA_INPUTS_DOCSTRING``, ``LLAMA_START_DOCSTRING``; for each model type alike) where they are missing.
    Reward models that ship their own code import them to decorate their forward: ArmoRM's class
    (RLHFlow/ArmoRM-Llama3-8B-v0.1, ``modeling_custom.py``) stopped with an ImportError under transformers 5, after
    every response had been sampled. They are documentation only: nothing reads them but the decorator."""
    import importlib

    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return
    for suffix in ("INPUTS_DOCSTRING", "START_DOCSTRING"):
        name = f"{model_type.upper()}_{suffix}"
        if not hasattr(module, name):
            setattr(module, name, "")


def load_own_model_class(s, config, reference: str) -> None:
    """Import the model class a reward model ships (``auto_map``), as from_pretrained will, so that code which does
    not load under this transformers stops the stage before sampling, naming scorer.path."""
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    restore_removed_docstrings(getattr(config, "model_type", "") or "")
    try:
        get_class_from_dynamic_module(reference, s.path, revision=s.revision)
    except Exception as e:
        raise ConfigError(
            f"invalid config value scorer.path={s.path!r}: its own model class ({reference}) does not load under "
            f"transformers {transformers.__version__}: {type(e).__name__}: {e}"
        ) from e


def load_reward_tokenizer(s):
    """The reward model's tokenizer with ``scorer.chat_template`` applied; one with no template of its own under
    ``auto`` is refused naming scorer.chat_template (the generate stage loads it before sampling to find out)."""
    from transformers import AutoTokenizer

    from simpo_exp.model import apply_chat_template_choice

    tokenizer = AutoTokenizer.from_pretrained(s.path, revision=s.revision, trust_remote_code=s.trust_remote_code)
    apply_chat_template_choice(tokenizer, s.chat_template, s.path, key="scorer.chat_template")
    return tokenizer


def render_for_scoring(tokenizer, s, prompt: list[dict], response: str) -> str:
    """The conversation as the reward model reads it; a chat template that refuses it (jinja2's TemplateError, as
    "System role not supported") is an error naming scorer.path and scorer.chat_template, not a traceback."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    except TemplateError as e:
        from simpo_exp.model import BUILTIN_TEMPLATES

        roles = [m["role"] for m in prompt] + ["assistant"]
        raise ConfigError(
            f"invalid config value scorer.chat_template={s.chat_template!r}: the chat template of "
            f"scorer.path={s.path!r} cannot render a conversation of roles {roles} ({e}); set scorer.chat_template "
            f"to one that can ({', '.join(BUILTIN_TEMPLATES)} or a Jinja template string)"
        ) from e


def check_reward_template(tokenizer, s, prompts: list[list[dict]]) -> None:
    """Render one prompt of each sequence of roles (a system turn or not, several turns) before any is sampled."""
    shapes = {tuple(m["role"] for m in p): p for p in prompts}
    for prompt in shapes.values():
        render_for_scoring(tokenizer, s, prompt, "")


def capped_max_length(s, config) -> int:
    """``scorer.max_length``, or the model's position limit where that is lower (a longer input has no position
    embedding and fails with an IndexError after every response was sampled): a warning names both."""
    from simpo_exp.inference.sampling import model_positions

    limit = model_positions(config)
    if limit is None or s.max_length <= limit:
        return s.max_length
    log.warning(
        "scorer.max_length=%d is more than scorer.path=%r reads (%d positions): prompt and response are cut to %d "
        "tokens (counted in report.json as responses_cut_for_the_scorer)",
        s.max_length, s.path, limit, limit,
    )  # fmt: skip
    return limit


def reward_model_dtype(cfg) -> torch.dtype:
    """The dtype the reward model scores in: ``scorer.dtype``, where "auto" is bfloat16 on a GPU that has it and
    float32 elsewhere (the generate stage names scored shards by it)."""
    from simpo_exp.inference.sampling import inference_dtype, pick_device
    from simpo_exp.model import TORCH_DTYPES

    if cfg.scorer.dtype != "auto":
        return TORCH_DTYPES[cfg.scorer.dtype]
    return inference_dtype("auto", pick_device(cfg.hardware.device), torch.float32)


class RewardModelScorer:
    def __init__(self, cfg):
        from transformers import AutoModelForSequenceClassification

        from simpo_exp.inference.sampling import pick_device

        s = self.s = cfg.scorer
        check_reward_model(s)
        self.device = pick_device(cfg.hardware.device)
        dtype = reward_model_dtype(cfg)
        self.tokenizer = load_reward_tokenizer(s)
        # A tokenizer without a pad token of its own (Llama 3's), or whose pad token is one its rows hold (EOS set
        # as the pad token, a common fix-up), gives no id that marks padding and nothing else: padding with EOS,
        # the head took a row's own closing EOS for padding and read the token before it. Such rows are scored
        # unpadded instead, in batches of one length (``score``). So is a pad id past the model's embeddings (a pad
        # token added to the tokenizer alone): a padded batch would index past the table.
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(
                s.path, revision=s.revision, dtype=dtype, trust_remote_code=s.trust_remote_code
            )
            .to(self.device)
            .eval()
        )
        self.own_pad = own_pad = self._pad_marks_padding_only()
        # the config the head reads its pad id from: transformers' sequence-classification heads read the text
        # config's (get_text_config()), which a composite config (Gemma-3's) nests; a plain config is its own
        head = text_config(self.model.config)
        heads = {id(c): c for c in (self.model.config, head)}.values()
        if not own_pad:
            # no row is padded: an id no token has, so that every head (the last token that is not the pad id; the
            # token before the first pad id) reads each row at its last token, in a batch of one or of many
            for config in heads:
                config.pad_token_id = -1
        elif getattr(head, "pad_token_id", None) != self.tokenizer.pad_token_id:
            # the head reads each row at its last token that is not config.pad_token_id: it must be the id the
            # tokenizer pads with, or a batched row is read on its padding (scores then depend on the batch)
            if getattr(head, "pad_token_id", None) is not None:
                log.info(
                    "scorer: the model's pad_token_id %s set to its tokenizer's %s",
                    head.pad_token_id, self.tokenizer.pad_token_id,
                )  # fmt: skip
            for config in heads:
                config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = capped_max_length(s, self.model.config)
        self.cut: list[bool] = []  # per response of the last score() call: cut to self.max_length tokens

    def _pad_marks_padding_only(self) -> bool:
        """Whether the tokenizer's pad id is one no scored row holds (not its EOS or BOS, nor a token its rendering
        of a conversation writes) and one the model has an embedding for."""
        pad = self.tokenizer.pad_token_id
        if pad is None or pad in (self.tokenizer.eos_token_id, self.tokenizer.bos_token_id):
            return False
        try:
            rows = self.model.get_input_embeddings().num_embeddings
        except (NotImplementedError, AttributeError):  # a class of its own that does not say: its config's size
            rows = getattr(self.model.config, "vocab_size", None)
        if rows is not None and pad >= rows:
            return False
        probe = render_for_scoring(self.tokenizer, self.s, [{"role": "user", "content": "Hello"}], "Hi")
        return pad not in self.tokenizer(probe, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        texts = [render_for_scoring(self.tokenizer, self.s, p, r) for p, r in zip(prompts, responses)]
        full = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        self.cut = [len(ids) > self.max_length for ids in full]
        rows = [ids[: self.max_length] for ids in full]
        out: list[float] = [0.0] * len(rows)
        for batch in self._batches(rows):
            if self.own_pad:
                self.tokenizer.padding_side = "right"
                enc = self.tokenizer.pad({"input_ids": [rows[i] for i in batch]}, return_tensors="pt")
            else:
                ids = torch.tensor([rows[i] for i in batch])
                enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            scores = self._rewards(self.model(**{k: v.to(self.device) for k, v in enc.items()}), len(batch))
            for i, value in zip(batch, scores):
                out[i] = value
        return out

    def _batches(self, rows: list[list[int]]) -> list[list[int]]:
        """The rows' indices, ``scorer.batch_size`` to a forward; without a pad token, rows of one length only
        (unpadded, see ``__init__``)."""
        size = self.s.batch_size
        groups = [list(range(len(rows)))]
        if not self.own_pad:
            by_length: dict[int, list[int]] = {}
            for i, row in enumerate(rows):
                by_length.setdefault(len(row), []).append(i)
            groups = list(by_length.values())
        return [group[j : j + size] for group in groups for j in range(0, len(group), size)]

    def _rewards(self, output, n: int) -> list[float]:
        score = getattr(output, "score", None)
        if score is not None and self.s.label_index is not None:  # was not read: every score the model's own
            raise ConfigError(
                f"invalid config value scorer.label_index={self.s.label_index}: {self.s.path!r} returns a score of "
                "its own (ArmoRM's gated sum of its objectives), which is the reward; label_index picks one of a "
                "model's logits and is not read here. Remove it (the sampled responses are kept: re-run to score them)"
            )
        if score is not None:
            return score.float().reshape(n, -1)[:, 0].tolist()
        logits = output.logits.float().reshape(n, -1)
        # a model with its own code: its outputs unknown until now
        check_label_index(self.s, logits.shape[1], "returns", " (the sampled responses are kept: re-run to score them)")
        return logits[:, self.s.label_index or 0].tolist()

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def make_scorer(cfg):
    return RuleScorer(cfg) if cfg.scorer.kind == "rule" else RewardModelScorer(cfg)
