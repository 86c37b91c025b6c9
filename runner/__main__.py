"""``python -m runner [overrides]``: compose the config with Hydra and train."""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import runner  # noqa: F401  (registers the config schemas)
from runner.errors import RunnerError, describe_error


@hydra.main(version_base=None, config_path="pkg://conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one job in its Hydra run dir; the returned eval loss is what sweepers minimise."""
    # Imported here so that `--help` and `--cfg` stay fast.
    from runner.console import print_config_tree
    from runner.sweep import run_sweep_job
    from runner.train import run

    hydra_cfg = HydraConfig.get()
    run_dir, overrides = Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        parallel = "joblib" in str(hydra_cfg.launcher.get("_target_", "")).lower()
        return run_sweep_job(cfg, run_dir, overrides=overrides, parallel=parallel)
    print_config_tree(cfg)
    try:
        return run(cfg, run_dir, overrides=overrides)
    except RunnerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def cli() -> None:
    """Run ``main`` (or, for ``resume=<run_dir>``, continue that run in place, outside Hydra's
    new-run-dir machinery); a user error (bad override, bad value, missing GPU, bad checkpoint)
    prints one line and exits 1. HYDRA_FULL_ERROR=1 shows the full traceback instead."""
    show_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra's exceptions reach us unprinted
    args = sys.argv[1:]
    resume = [a for a in args if a.startswith("resume=")]
    try:
        if resume and not {"-m", "--multirun"} & set(args):
            from runner.resume import resume_run

            resume_run(resume[0].split("=", 1)[1], [a for a in args if a not in resume])
        else:
            main()
    except Exception as err:
        message = describe_error(err)
        if show_traceback or message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
