"""``python -m simpo_exp.evaluate RUN_OR_SWEEP_DIR [benchmark=NAME | benchmark=[A,B]] [key=value ...]``.

The directory may come first as a plain argument; it becomes ``evaluate.path``. Hydra composes
conf/evaluate.yaml. Never imports simpo_exp.train or another stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from simpo_exp.evaluate.config import to_evaluate_config  # stores the schema Hydra composes with
from simpo_exp.rundir import CONF_DIR
from simpo_exp.runinfo import user_errors


def _path_argument(argv: list[str]) -> list[str]:
    """A leading directory argument as ``evaluate.path='...'`` (quoted: job directories hold '=' and ','). A
    leading argument that is neither a directory nor an option nor an override (no '='): a one-line error and
    exit 2, not Hydra's "missing EQUAL" parse error."""
    if len(argv) > 1 and not argv[1].startswith("-") and Path(argv[1]).is_dir():
        quoted = argv[1].replace("\\", "\\\\").replace("'", "\\'")
        return [argv[0], f"evaluate.path='{quoted}'", *argv[2:]]
    if len(argv) > 1 and not argv[1].startswith("-") and "=" not in argv[1]:
        print(f"error: evaluate.path={argv[1]!r}: no such directory (give a run or sweep directory)", file=sys.stderr)
        raise SystemExit(2)
    return argv


def _check_benchmark_names(argv: list[str]) -> None:
    """An unknown ``benchmark=`` option: a one-line error and exit 2 (Hydra's own is a longer exit 1)."""
    known = sorted(p.stem for p in (Path(CONF_DIR) / "benchmark").glob("*.yaml"))
    for arg in argv[1:]:
        key, sep, value = arg.lstrip("+~").partition("=")
        if key != "benchmark" or not sep:
            continue
        names = [n.strip() for n in value.strip("[]").split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            print(
                f"error: invalid config value benchmark={value!r}: unknown benchmark {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(known)} (conf/benchmark/*.yaml)",
                file=sys.stderr,
            )
            raise SystemExit(2)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    runs = OmegaConf.select(cfg, "evaluate.path", throw_on_missing=False)
    with user_errors(cfg, work=f"the eval/ folder of each run under {runs}"):
        OmegaConf.resolve(cfg)
        config = to_evaluate_config(cfg)  # fails here, naming the key, before any model loads
        from simpo_exp.evaluate.run import evaluate_all

        evaluate_all(config)


if __name__ == "__main__":
    sys.argv = _path_argument(sys.argv)
    _check_benchmark_names(sys.argv)
    main()
