#!/usr/bin/env python
"""How long the tokenizer's hash takes at a real model's vocabulary: ``simpo_exp.model.tokenizer_hash``, which a
resume computes twice (its check against the run's data report, then the new data report), on every process.

    python benchmarks/bench_tokenizer_hash.py                   # 128,000 tokens, 3 repeats
    python benchmarks/bench_tokenizer_hash.py --vocab 256000 --json out.json

No hub tokenizer is read (nothing downloads): a byte-level BPE tokenizer of ``--vocab`` tokens is built with
``tokenizers`` (the 256 byte symbols, then merged pairs of them, then pairs of those with one more byte). The hash
is a pass over the tokenizer's JSON (parsed, written again without the call-time settings, SHA-256), so its time
grows with that JSON's size, printed beside it: a real tokenizer of the same vocabulary with longer tokens and
more merges (Llama-3's) has a larger file, and takes longer in proportion. Each timing is one call; the median of
``--repeats`` is reported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simpo_exp.model import tokenizer_hash  # noqa: E402


def build(vocab_size: int):
    """A byte-level BPE tokenizer of ``vocab_size`` tokens (at least 256), as transformers loads one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    merges = []
    pairs = itertools.product(symbols, repeat=2)
    triples = ((a + b, c) for (a, b), c in itertools.product(itertools.product(symbols, repeat=2), symbols))
    for left, right in itertools.chain(pairs, triples):
        if len(vocab) >= vocab_size:
            break
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=symbols[0]), len(merges), len(core.to_str())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    import tokenizers
    import transformers

    tokenizer, merges, size = build(args.vocab)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        tokenizer_hash(tokenizer)
        times.append(time.perf_counter() - start)
    result = {
        "vocab": len(tokenizer),
        "merges": merges,
        "json_mb": round(size / 1e6, 2),
        "seconds": [round(t, 3) for t in times],
        "median_s": round(statistics.median(times), 3),
        "machine": {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(),
            "python": platform.python_version(),
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
        },
    }
    print(
        f"tokenizer_hash over {result['vocab']:,} tokens ({merges:,} merges, {result['json_mb']} MB of JSON): "
        f"median {result['median_s']} s of {args.repeats} ({', '.join(map(str, result['seconds']))})"
    )
    print(json.dumps(result["machine"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
