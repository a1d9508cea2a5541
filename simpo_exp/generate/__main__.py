"""``python -m simpo_exp.generate``: compose the generate config with Hydra, validate it, generate.

Never imports simpo_exp.train: the stage needs only the model, data and its own modules.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from simpo_exp.command_line import refuse_command_line
from simpo_exp.generate.config import check_overrides, to_generate_config
from simpo_exp.rundir import CONF_DIR
from simpo_exp.runinfo import (
    fill_run_identity,
    given_overrides,
    refuse_a_folder_per_hand_started_process,
    user_errors,
)
from simpo_exp.signals import sigterm_as_interrupt


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    with sigterm_as_interrupt(), user_errors(cfg, keeps="finished shards") as go:
        if not go:  # a sweep's job whose folder another job holds: refused, the sweep goes on
            return
        refuse_a_folder_per_hand_started_process(HydraConfig.get())
        check_overrides(given_overrides(HydraConfig.get()), OmegaConf.select(cfg, "model.path", default=None))
        config = to_generate_config(fill_run_identity(cfg))  # fails here, before any model or data loads
        from simpo_exp.generate.run import generate_data

        generate_data(config)


if __name__ == "__main__":
    import sys

    refuse_command_line(sys.argv[1:], "generate")
    main()
