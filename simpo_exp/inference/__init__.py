"""Shared inference core: what more than one stage needs to run a policy and judge its answers.

Used by the generate stage (simpo_exp/generate) and the evaluate stage (simpo_exp/evaluate); no stage
imports another, so these pieces live here. Modules: sampling (hf / vLLM samplers, stop tokens from
the chat template), scoring (the sort-digits rule and reward-model scorers), files (atomic writes and
JSONL shards). Importing the package loads nothing heavy.
"""
