"""Sample responses from the policy: transformers' generate (``hf``) or vLLM (``vllm``, GPU).

The decoding settings come from ``decoding`` (the generate stage passes ``cfg.generate``, the evaluate
stage a benchmark's settings): temperature, top_p, max_new_tokens, stop_token_ids, batch_size,
samples_per_seed, seeds, vllm_gpu_memory_utilization, vllm_tensor_parallel_size.

Both take prompts as token ids (rendered by the policy's chat template, as training renders them),
stop at the tokenizer's EOS and the template's end-of-turn token, and return per prompt a list of
``{"text", "n_tokens", "finished"}`` (finished: ended by a stop token, not by max_new_tokens).

Seeding: the hf backend seeds torch once per (seed, shard) before that shard's pass, so a shard's
responses depend only on the config and the shard's prompts (a resumed run redoes a shard exactly);
vLLM takes a seed per request, derived from the shard's seed (itself from the seed and the shard's index) and the
prompt id.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch

from simpo_exp.config import ConfigError

log = logging.getLogger(__name__)
MARKER = "\u2063simpo-exp-end-of-turn-probe\u2063"


def derive_seed(*parts) -> int:
    """A 31-bit seed from any parts (stable across processes and Python runs, unlike hash())."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big") >> 1


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token(s) the chat template writes right after an assistant turn's content."""
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": MARKER}]
    try:
        text = tokenizer.apply_chat_template(convo, tokenize=False)
    except Exception:  # a template that refuses this shape: rely on EOS
        return []
    after = text.split(MARKER, 1)[1] if MARKER in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"][:1] if after else []
    from simpo_exp.data.tokenize import special_token_ids

    return [i for i in ids if i in special_token_ids(tokenizer)]


def stop_token_ids(tokenizer, extra: list[int], generation_config=None) -> list[int]:
    """The ids sampling stops at: the tokenizer's EOS, the chat template's end-of-turn token, the model's own end
    ids and ``extra`` (``generate.stop_token_ids``), which must be ids of this tokenizer (one past it would never be
    sampled, and the responses would run to max_new_tokens without a word)."""
    unknown = [i for i in extra if not 0 <= int(i) < len(tokenizer)]
    if unknown:
        raise ConfigError(
            f"invalid config value stop_token_ids={list(extra)} (generate.stop_token_ids, or a benchmark's "
            f"decoding.stop_token_ids): {unknown} not ids of the tokenizer "
            f"(0..{len(tokenizer) - 1}); tokenizer.convert_tokens_to_ids('<token>') gives a token's id"
        )
    ids = [tokenizer.eos_token_id] + end_of_turn_ids(tokenizer) + list(extra)
    model_eos = getattr(generation_config, "eos_token_id", None)
    ids += model_eos if isinstance(model_eos, list) else [model_eos]
    return sorted({int(i) for i in ids if i is not None})


def prompt_texts(tokenizer, prompts: list[list[dict]], chat_format: str = "generation_prompt") -> list[str]:
    """Each prompt rendered with the generation prompt. ``chat_format`` is how the policy was trained
    (``dataset.chat_format``): ``simpo_repo`` puts its empty system turn first, as training did."""
    from simpo_exp.data.tokenize import prompt_messages

    messages = [prompt_messages(tokenizer, p, chat_format) for p in prompts]
    return [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]


def text_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Rendered prompts as ids: the template wrote the specials (no second BOS), and a BOS it did not write is put
    in front as training does (``with_bos``)."""
    from simpo_exp.data.tokenize import with_bos

    return [with_bos(tokenizer, ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def prompt_token_ids(tokenizer, prompts: list[list[dict]], chat_format: str = "generation_prompt") -> list[list[int]]:
    """``prompt_texts`` tokenised by ``text_token_ids``."""
    return text_token_ids(tokenizer, prompt_texts(tokenizer, prompts, chat_format))


def pick_device(device: str) -> torch.device:
    """``hardware.device`` (cpu, cuda or auto) as this process's torch device; cuda with none visible is
    refused, as training refuses it (the evaluate stage sets hardware.device from evaluate.device)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "hardware.device=cuda but no CUDA device is visible; use hardware=cpu or hardware=auto "
            "(in the evaluate stage: evaluate.device=cpu or evaluate.device=auto)"
        )
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    # a task given one GPU (submitit narrows CUDA_VISIBLE_DEVICES per task) sees it as device 0, whatever its rank
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def effective_precision(mixed_precision: str, device: torch.device) -> str:
    """What ``hardware.mixed_precision`` means for generating on ``device``: "no" (the weights' own dtype) off a
    GPU whatever it says, "bf16" for auto where the GPU has it."""
    if device.type != "cuda" or mixed_precision == "no":
        return "no"
    if mixed_precision == "fp16":
        return "fp16"
    return "bf16" if torch.cuda.is_bf16_supported() else "no"


def inference_dtype(mixed_precision: str, device: torch.device, weights: torch.dtype) -> torch.dtype:
    """Generation has no optimizer to keep in fp32: run in the precision training would autocast to."""
    return {"no": weights, "fp16": torch.float16, "bf16": torch.bfloat16}[effective_precision(mixed_precision, device)]


def sampling_dtype(cfg, device: torch.device) -> torch.dtype:
    """The dtype a sampler computes in: the weights as ``load_model`` holds them (float32 under the default
    ``hardware.master_weights=fp32`` for a full fine-tune, else ``model.dtype``), in the precision training would
    autocast to."""
    from simpo_exp.model import TORCH_DTYPES

    h = cfg.hardware
    weights = torch.float32 if h.master_weights == "fp32" and not h.lora else TORCH_DTYPES[cfg.model.dtype]
    return inference_dtype(h.mixed_precision, device, weights)


def model_positions(config) -> int | None:
    """The positions the model reads (``max_position_embeddings``, GPT-2's ``n_positions``); None where it says none."""
    keys = ("max_position_embeddings", "n_positions")
    return next((v for k in keys if isinstance(v := getattr(config, k, None), int)), None)


CONTEXT_TOKENS = 6  # prompt tokens a response is decoded after, as vLLM's incremental detokenizer reads some


def decode_sampled(tokenizer, ids: list[int]) -> str:
    """Sampled ids as text, as sampled: transformers before 5.7 applied a tokenizer's clean_up_tokenization_spaces
    (true in Llama-3's files) to BPE too, turning "x != y" into "x!= y"; vLLM's detokenizer never does."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def response_text(tokenizer, prompt: list[int], response: list[int]) -> str:
    """The response's text as it reads after its prompt. Decoded alone, a SentencePiece response (Mistral's) lost its
    first token's leading space (the decoder strips a text's first one): training, which tokenises prompt and
    response together, then read a token the policy had not sampled ("H" for the sampled "▁H"), and the vllm
    backend, which decodes after the prompt, gave other text. The last prompt tokens are decoded with it and cut
    off again; where their text is not a prefix of the whole (a decoder that rewrites across them), alone."""
    context = prompt[-CONTEXT_TOKENS:]
    before, whole = decode_sampled(tokenizer, context), decode_sampled(tokenizer, context + response)
    return whole[len(before) :] if whole.startswith(before) else decode_sampled(tokenizer, response)


class HFSampler:
    """transformers' generate over left-padded batches of prompts."""

    def __init__(self, cfg, tokenizer, decoding=None):
        from simpo_exp.model import load_model, pick_attention

        self.cfg, self.g, self.tokenizer = cfg, decoding or cfg.generate, tokenizer
        self.device = pick_device(cfg.hardware.device)
        attn = cfg.model.attn_implementation or cfg.hardware.attn_implementation
        if attn == "flash_attention_2":  # on a GPU as training picks it: flash-attn where installed, else sdpa (said)
            attn = pick_attention(cfg) if self.device.type == "cuda" else "sdpa"
        model = load_model(cfg, tokenizer, attn)
        dtype = inference_dtype(cfg.hardware.mixed_precision, self.device, next(model.parameters()).dtype)
        self.model = model.to(self.device, dtype).eval()
        self.stop_ids = stop_token_ids(tokenizer, self.g.stop_token_ids, model.generation_config)
        self.positions, self.capped = model_positions(model.config), False
        # Rotary positions are computed, not read from a table: a row stopped at its own room may go on being fed
        # (padding) past the last position. A table of learned positions (GPT-2, OPT) would be read out of range.
        self.rotary = getattr(model.config, "rope_parameters", None) is not None
        # Decoding is the project's settings alone, as vLLM's explicit SamplingParams are. transformers fills what a
        # call leaves at its defaults from the model's generation_config.json (a repetition_penalty, a
        # no_repeat_ngram_size, a min_new_tokens), which changed greedy answers and sampled another distribution
        # than the vllm backend: the model's own is set aside here.
        from transformers import GenerationConfig

        self.model.generation_config = GenerationConfig()

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], keys: list[str], seed: int) -> list[list[dict]]:
        torch.manual_seed(seed)
        out = []
        for start in range(0, len(prompts), self.g.batch_size):
            out += self._batch(prompts[start : start + self.g.batch_size])
        return out

    def _batch(self, prompts: list[list[int]]) -> list[list[dict]]:
        tok, g = self.tokenizer, self.g
        tok.padding_side = "left"
        enc = tok.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)
        sampling = (
            dict(do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=0)
            if g.temperature > 0
            else dict(do_sample=False)
        )
        k, width = g.samples_per_seed, enc["input_ids"].shape[1]
        lengths = [len(p) for p in prompts] if self.rotary else [width] * len(prompts)
        rooms = [self._room(n) for n in lengths for _ in range(k)]
        seqs = self.model.generate(
            **enc,
            max_new_tokens=max(rooms),
            num_return_sequences=k,
            eos_token_id=self.stop_ids,
            pad_token_id=tok.pad_token_id,
            use_cache=True,
            **sampling,
        )
        new = seqs[:, width:].tolist()  # each cut at its own room (a row may have run on to the batch's largest)
        results = [self._response(ids[:room], prompts[n // k]) for n, (ids, room) in enumerate(zip(new, rooms))]
        return [results[i * k : (i + 1) * k] for i in range(len(prompts))]

    def _room(self, width: int) -> int:
        """``max_new_tokens``, or what the model's positions leave after a prompt of ``width`` tokens, where less: past
        them a model of learned positions fails and a rotary one decodes positions it was never trained on (vLLM
        stops a request at its max_model_len the same way). The answers cut there count as cut (``finished`` false).
        Under rotary positions each prompt has its own: a left-padded row's positions start at its first token, so a
        short prompt batched with a long one keeps its whole ``max_new_tokens``. Under learned positions ``width``
        is the batch's padded width (every row is fed up to the batch's last step)."""
        asked = self.g.max_new_tokens
        if self.positions is None or width + asked <= self.positions:
            return asked
        if width >= self.positions:
            raise ConfigError(
                f"a prompt of {width} tokens fills the model's {self.positions} positions: nothing can be generated "
                "after it; use shorter prompts (the generate stage: max_prompt_length; a benchmark: its prompt set)"
            )
        if not self.capped:
            self.capped = True
            log.warning(
                "a prompt of %d tokens and max_new_tokens=%d pass the model's %d positions: answers to it (and to "
                "longer ones) stop at the last position (counted as cut at max_new_tokens)",
                width, asked, self.positions,
            )  # fmt: skip
        return self.positions - width

    def _response(self, ids: list[int], prompt: list[int]) -> dict:
        return cut_at_stop(self.tokenizer, prompt, ids, self.stop_ids)

    def close(self) -> None:
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def cut_at_stop(tokenizer, prompt: list[int], ids: list[int], stop_ids) -> dict:
    """A sampled answer as both backends return it: its text up to the first stop id (not included: vLLM keeps a
    stop token's text unless it is a special token, so a ``stop_token_ids`` entry such as a newline ended its
    answers), the tokens sampled (the stop token counted) and whether a stop id ended it."""
    stops = [i for i, t in enumerate(ids) if t in stop_ids]
    end = stops[0] if stops else len(ids)
    text = response_text(tokenizer, prompt, ids[:end])
    return {"text": text, "n_tokens": end + (1 if stops else 0), "finished": bool(stops)}


def configured_positions(model_cfg) -> int | None:
    """The positions of the model ``model_cfg`` names (its path, revision and code), read from its config."""
    from transformers import AutoConfig

    m = model_cfg
    return model_positions(
        AutoConfig.from_pretrained(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    )


def vllm_max_model_len(model_cfg, longest_prompt: int | None, max_new_tokens: int) -> int | None:
    """The context vLLM is started with: the longest prompt it will be given and ``max_new_tokens`` after it, where
    that is below the model's positions; else None (vLLM's default, the model's whole context). vLLM refuses to
    start where one request of its context does not fit the KV cache left beside the weights: Llama-3.1-8B's
    131,072 positions ask 16 GiB, more than a 24 GB card keeps at ``vllm_gpu_memory_utilization`` 0.9, while
    sampling needs 2,048 prompt and 4,096 answer tokens. Every prompt still gets its whole ``max_new_tokens``."""
    if longest_prompt is None:
        return None
    wanted = longest_prompt + max_new_tokens
    try:
        positions = configured_positions(model_cfg)
    except (OSError, ValueError):  # a config transformers cannot read (vLLM's own loader may): vLLM's default
        return None
    if positions is not None and wanted >= positions:
        return None
    log.info(
        "vLLM's context: %d tokens (the longest prompt, %d, and max_new_tokens=%d; the model's: %s)",
        wanted, longest_prompt, max_new_tokens, positions,
    )  # fmt: skip
    return wanted


class VLLMSampler:
    """vLLM's offline engine; one request per prompt with its own seed."""

    def __init__(self, cfg, tokenizer, decoding=None, backend_key: str = "generate.backend", longest_prompt=None):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ConfigError(
                f"{backend_key}=vllm needs vLLM on a GPU machine: pip install vllm (or {backend_key}=hf)"
            ) from e
        device = pick_device(cfg.hardware.device)
        if device.type != "cuda":  # vLLM would take the GPU anyway, in the float32 a CPU run samples in
            raise ConfigError(
                f"{backend_key}=vllm runs on a GPU, and this run's device is {device.type} (hardware.device="
                f"{cfg.hardware.device}; evaluate.device in the evaluate stage): use {backend_key}=hf, or a GPU device"
            )
        m, g = cfg.model, decoding or cfg.generate
        self.g, self.tokenizer = g, tokenizer
        # mixed_precision=no: the weights' dtype as the hf backend holds them (it was float32 whatever
        # master_weights said)
        dtype = sampling_dtype(cfg, device)
        length = vllm_max_model_len(m, longest_prompt, g.max_new_tokens)
        self.llm = LLM(
            # None: vLLM's default, the model's whole context
            model=m.path,
            tokenizer=m.tokenizer_path or m.path,
            revision=m.revision,
            # a separate tokenizer repo at its own head, as load_tokenizer reads it (vLLM's default: the model's)
            tokenizer_revision="main" if m.tokenizer_path else m.revision,
            trust_remote_code=m.trust_remote_code,
            dtype=str(dtype).removeprefix("torch."),
            gpu_memory_utilization=g.vllm_gpu_memory_utilization,
            tensor_parallel_size=g.vllm_tensor_parallel_size,
            seed=g.seeds[0],
            **({"max_model_len": length} if length is not None else {}),
        )
        self.stop_ids = stop_token_ids(tokenizer, g.stop_token_ids)

    def sample(self, prompts: list[list[int]], keys: list[str], seed: int) -> list[list[dict]]:
        from vllm import SamplingParams

        g = self.g
        params = [
            SamplingParams(
                n=g.samples_per_seed,
                temperature=g.temperature,
                top_p=g.top_p,
                max_tokens=g.max_new_tokens,
                stop_token_ids=self.stop_ids,
                seed=derive_seed(seed, key),
                skip_special_tokens=True,
            )
            for key in keys
        ]
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], sampling_params=params, use_tqdm=False)
        # decoded as the hf backend decodes (vLLM's own text keeps a stop token that is not a special token); ended
        # by vLLM's stop whether or not its token ids hold the stop token
        return [
            [
                (r := cut_at_stop(self.tokenizer, ids, list(c.token_ids), self.stop_ids))
                | {"finished": r["finished"] or c.finish_reason == "stop"}
                for c in o.outputs
            ]
            for ids, o in zip(prompts, outs)
        ]

    def close(self) -> None:
        """Give the GPU back before the reward model loads (an 8B ArmoRM beside a vLLM engine holding
        ``vllm_gpu_memory_utilization`` of the device would not fit): the engine's own process stopped, then vLLM's
        cleanup of its process groups and cached memory. Deleting the engine alone left that memory held."""
        import contextlib
        import gc

        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            with contextlib.suppress(Exception):  # an engine already stopped
                core.shutdown()
        del self.llm
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:  # a vLLM without it
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            cleanup_dist_env_and_memory()


def make_sampler(cfg, tokenizer, decoding=None, backend_key: str = "generate.backend", longest_prompt=None):
    """``decoding`` (default ``cfg.generate``) names the backend and the sampling settings; ``backend_key``: the
    config key that picks it, as messages name it (the evaluate stage's ``benchmarks.<name>.decoding.backend``);
    ``longest_prompt``: the most prompt tokens it will be given (vLLM's context is sized to it)."""
    decoding = decoding or cfg.generate
    if decoding.backend == "vllm":
        return VLLMSampler(cfg, tokenizer, decoding, backend_key, longest_prompt)
    return HFSampler(cfg, tokenizer, decoding)
