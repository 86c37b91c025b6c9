"""``python -m runner [overrides]``: compose the config with Hydra and train."""

import os
import sys
from pathlib import Path

# Flags with which Hydra does not run a single job (multirun, help, config display...).
NOT_A_SINGLE_RUN = {"-m", "--multirun", "-h", "--help", "--hydra-help", "-c", "--cfg",
                    "--info", "-i", "-sc", "--shell-completion"}


def _draws_figures(args) -> bool:
    """Whether this process may draw figures: a single run with images on, and not a process
    other than 0 of a multi-process run (which writes nothing)."""
    from runner.launch import launcher_rank

    ranks = [str(launcher_rank() or 0)]
    ranks += [a.split("=", 1)[1] for a in args if a.startswith("device.process_id=")]
    return (not NOT_A_SINGLE_RUN & set(args) and "trainer.log_images=false" not in
            map(str.lower, args) and all(r.strip() in ("0", "", "null") for r in ranks))


if __name__ == "__main__" and _draws_figures(sys.argv[1:]):
    # Start the figure worker before anything else: its imports overlap this process's.
    from runner.figures import prestart

    prestart()

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from runner.errors import RunnerError, describe_error  # noqa: E402

if __name__ == "__main__" and not NOT_A_SINGLE_RUN - {"-m", "--multirun"} & set(sys.argv[1:]):
    # A run imports these anyway; now, so that the objects of every module loaded so far can
    # be frozen: Python's garbage collector then skips them (~140k objects) in each later
    # collection. Unfrozen, collections during the run's first lowering made it ~0.1 s slower.
    import gc

    import runner.train  # noqa: F401

    gc.freeze()


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
        elif NOT_A_SINGLE_RUN & set(args):
            main()
        else:
            from runner.compose_once import compose_once

            with compose_once():
                main()
    except Exception as err:
        message = describe_error(err)
        if show_traceback or message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def exit_now(code: int) -> None:
    """End the process once everything is written: run the exit handlers (logging's flush,
    tensorboardX's writers, JAX's backend cleanup...), flush the standard streams, then skip
    the rest of the interpreter's teardown (freeing every module and object: ~0.4 s that no
    output depends on). Only for a single run's ``python -m runner`` process: a multirun's
    launchers keep worker pools (joblib) that only the full teardown shuts down."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        cli()
    except SystemExit as stop:
        code = stop.code
    else:
        code = 0
    if not isinstance(code, int):  # sys.exit("message") prints the message and exits 1
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    multirun = {"-m", "--multirun"} & set(sys.argv[1:]) or "hydra.mode=MULTIRUN" in sys.argv
    if multirun or sys.getprofile() or sys.gettrace():
        sys.exit(code)  # a profiler or coverage tool writes its results at teardown
    exit_now(code)
