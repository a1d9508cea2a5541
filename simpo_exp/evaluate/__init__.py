"""The evaluate stage: from a trained run (or a whole sweep) to the numbers the paper reports.

``python -m simpo_exp.evaluate RUN_OR_SWEEP_DIR benchmark=rule`` (see the README's "Evaluation
(evaluate stage)"). Modules: config (the ``benchmark`` group and ``evaluate.*`` keys), runs (finding
runs, rebuilding the trained and the starting policy from a run's saved config), benchmarks (local
prompt files and output formats), judge (rule, OpenAI-compatible pairwise, alpaca-eval), lmeval
(lm-evaluation-harness), run (shards, judging, results). Shared pieces come from simpo_exp.inference.
"""
