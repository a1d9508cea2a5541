"""The generate stage: on-policy preference data (sample, score, binarise) for the next SimPO run.

``python -m simpo_exp.generate`` (see simpo_exp/generate/run.py for what it writes, and the README's
"On-policy data (generate stage)"). Modules: config (the new groups), binarise (pairs and the
report), run (shards and the data set); sampling (hf / vLLM), scoring (rule / reward model) and
the atomic file helpers are shared with the evaluate stage in simpo_exp/inference/.
"""
