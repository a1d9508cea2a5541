"""simpo-exp: Hydra-composed SimPO experiments (train, generate, evaluate, compare, dashboard).

A regular package (not a namespace one), so that an installed copy is found whole and never merged with
another checkout's ``simpo_exp`` folder on the path."""
