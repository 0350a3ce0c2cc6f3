"""qfsdp launcher: `python launch.py [overrides]`, `torchrun ... launch.py [overrides]`, `python launch.py -m ...`.

See README.md; `python launch.py --cfg job` prints the composed config.
"""

import hydra
from omegaconf import DictConfig

from qfsdp.config import register_configs
from qfsdp.rundir import register_resolvers

register_configs()
register_resolvers()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from qfsdp.launcher import run_job

    run_job(cfg)


if __name__ == "__main__":
    main()
