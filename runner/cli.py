"""The command line: compose the config with Hydra and train (``python -m runner``)."""

import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runner.config.errors import AlreadyComplete, RunnerError, describe_error
from runner.platform.preemption import stop_if_requested


@hydra.main(version_base=None, config_path="pkg://runner.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one job in its Hydra run dir; returns the final eval value of
    ``trainer.best_metric``, what sweepers minimise or maximise."""
    # Imported here, once Hydra has composed the config (bad overrides fail before them).
    from runner.io.rundir import HydraJob, remove_if_unused
    from runner.run.console import print_start
    from runner.run.search import TrialLink
    from runner.run.summary import job_value
    from runner.run.sweep import marks_failed_trials, run_sweep_job
    from runner.run.train import run

    # The modules imported so far hold ~10^5 objects that live as long as the process: frozen,
    # the garbage collector's passes skip them (unfrozen, the passes during the run's first
    # tracing and lowering took ~0.1 s).
    gc.freeze()
    hydra_cfg = HydraConfig.get()
    run_dir, overrides = Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task)
    job = HydraJob.current(cfg)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        parallel = "joblib" in str(hydra_cfg.launcher.get("_target_", "")).lower()
        return run_sweep_job(cfg, run_dir, overrides=overrides, parallel=parallel,
                             raise_failure=marks_failed_trials(hydra_cfg), hydra_job=job,
                             trial=TrialLink.of(hydra_cfg))
    try:
        summary = run(cfg, run_dir, overrides=overrides, hydra_job=job,
                      announce=lambda _: print_start(run_dir, overrides,
                                                     hydra_cfg.runtime.choices))
    except RunnerError as err:
        remove_if_unused(run_dir)  # Hydra made it for a run that failed its checks
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        remove_if_unused(run_dir)
        raise
    print_where(run_dir, summary)
    return job_value(summary)


def print_where(run_dir: Path, summary: Dict[str, Any]) -> None:
    """A run's last line: where it went, its final eval metrics, its best checkpoint's step and
    metric, how to look at it (TensorBoard, when it wrote events: logger=tensorboard)."""
    from runner.io.layout import RunPaths
    from runner.run.console import shown_path

    shown = shown_path(run_dir)
    metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(summary["eval"].items()))
    best = summary.get("best")
    best = f"  best: step {best['step']} {best['metric']}={best['value']:.4g}" if best else ""
    early = (f"  stopped early at step {summary['stopped_early_at']}"
             if summary.get("stopped_early_at") is not None else "")
    view = f"  view: tensorboard --logdir {shown}" if RunPaths(run_dir).tb.is_dir() else ""
    print(f"done: {shown}  eval {metrics}{best}{early}{view}", flush=True)


# Hydra would write .hydra/ (or open a log file) in the run dir before runner's checks could
# refuse it; runner writes them itself (runner.io.rundir), so these stay as conf/config.yaml sets.
HYDRA_WRITERS = ("hydra.output_subdir", "hydra/job_logging", "hydra.job_logging.handlers",
                 "hydra.job_logging.root.handlers")


def refuse_hydra_writers(args) -> None:
    """One line for an override that would let Hydra write into a run dir first."""
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.startswith(HYDRA_WRITERS):
            raise RunnerError(f"{arg}: runner writes .hydra/ and runner.log into a run dir "
                              f"itself, once the dir is the run's; leave {key} as it is")


# Hydra's flags, long name -> short (https://hydra.cc/docs/advanced/hydra-command-line-flags/);
# those that always take a value, and --info, which takes one of its words if one follows.
HYDRA_FLAGS = {"--help": "-h", "--hydra-help": None, "--version": None, "--cfg": "-c",
               "--resolve": None, "--package": "-p", "--run": "-r", "--multirun": "-m",
               "--shell-completion": "-sc", "--config-path": "-cp", "--config-name": "-cn",
               "--config-dir": "-cd", "--experimental-rerun": None, "--info": "-i"}
HYDRA_VALUE_FLAGS = {"--cfg", "--package", "--config-path", "--config-name", "--config-dir",
                     "--experimental-rerun"}


def overrides_first(args: Sequence[str]) -> List[str]:
    """``args`` with the overrides first and the flags after them, each flag with its value,
    both in their own order; a flag abbreviated (``--config-d``) is spelled out. Hydra's
    argparse takes the overrides (one positional list) from one unbroken run of arguments only:
    ``-m a=1 --config-dir d b=2`` was "unrecognized arguments: b=2", and ``--info a=1`` read
    a=1 as --info's value. After ``--`` (argparse's end of flags) nothing moves."""
    if "--" in args:
        return list(args)
    overrides: List[str] = []
    flags: List[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        name, equals, value = arg.partition("=")
        name = long_flag(name) or name
        flags.append(name + equals + value)
        if rest and not equals and (name in HYDRA_VALUE_FLAGS or (
                name == "--info" and not rest[0].startswith(("-", "~", "+"))
                and "=" not in rest[0])):
            flags.append(rest.pop(0))
    return overrides + flags


def long_flag(name: str) -> Optional[str]:
    """The long name of Hydra's flag ``name`` (short, long, or a unique prefix of a long one,
    as argparse takes it); None for none."""
    shorts = {short: long for long, short in HYDRA_FLAGS.items() if short}
    prefixed = [long for long in HYDRA_FLAGS if name.startswith("--") and long.startswith(name)]
    if name in HYDRA_FLAGS or name in shorts:
        return shorts.get(name, name)
    return prefixed[0] if len(prefixed) == 1 else None


def cli() -> None:
    """Run ``main`` (or, for ``resume=<run_dir>``, continue that run in place, outside Hydra's
    new-run-dir machinery); a user error (bad override, bad value, missing GPU, bad checkpoint)
    prints one line and exits 1. HYDRA_FULL_ERROR=1 shows the full traceback instead."""
    show_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # A log line the disk cannot take (ENOSPC in runner.log) is dropped instead of printing a
    # traceback per line: the run's own write fails next and says why, once.
    logging.raiseExceptions = False
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra's exceptions reach us unprinted
    # Hydra parses sys.argv itself: its flags go anywhere on the command line
    sys.argv[1:] = args = overrides_first(sys.argv[1:])
    resume = [a for a in args if a.startswith("resume=")]
    try:
        if resume and not {"-m", "--multirun"} & set(args):
            from runner.run.resume import resume_run

            run_dir, summary = resume_run(resume[0].split("=", 1)[1],
                                          [a for a in args if a not in resume])
            print_where(run_dir, summary)
        else:
            refuse_hydra_writers(args)  # before anything is imported or composed
            from runner.config.targets import register_signatures
            from runner.core.optim import SCHEMA as OPTIMIZER_SCHEMA

            # Every parameter of the target of an option in the user's config dirs is a key,
            # as for runner's own options (conf/config.yaml: signature@...).
            register_signatures(args, {"task": {}, "model": {}, "optimizer": OPTIMIZER_SCHEMA})
            # A Ctrl-C during the imports: before Hydra makes a run dir (runner.__main__)
            stop_if_requested("before the run started")
            main()
    except AlreadyComplete as done:  # requeue loops rerun the resume command: not a failure
        print(done)
    except Exception as err:
        message = describe_error(err)
        if show_traceback or message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    finally:
        # The interpreter's exit walks every object in its final garbage collections (~0.3 s
        # of a default run); frozen objects are skipped. Exit handlers still run, and files
        # are still closed and flushed.
        gc.freeze()
