"""``python -m runner.eval <run_dir> [--checkpoint last|best|<step>]``: eval metrics as JSON.

Rebuilds the model from the config stored in the run dir (so a run dir copied elsewhere works),
restores the checkpoint with ``flax.serialization.from_bytes`` and evaluates on the task's
held-out set. It only reads the run dir (a read-only copy works).
"""

import argparse
import json
import sys
from pathlib import Path

from runner.config.errors import RunnerError, describe_error
from runner.io.layout import RunPaths


def evaluate_run(run_dir: Path, which: str = "last") -> dict:
    """Eval metrics of checkpoint ``which`` (``last``, ``best`` or a step) of ``run_dir``."""
    from runner.io.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
    from runner.io.inputs import verify
    from runner.platform.device import configure_jax
    from runner.run.resume import build_stored, evaluate_checkpoint, load_run_config

    cfg, _ = load_run_config(run_dir)
    parts = build_stored(cfg, run_dir)
    verify(parts.task, run_dir)
    cfg.device.distributed = False  # one process evaluates, whatever the run was
    configure_jax(cfg.device)
    ckpt_dir = RunPaths(run_dir).checkpoints
    if which == "best":
        path = ckpt_dir / "best.msgpack"
    elif which == "last":
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise RunnerError(f"{ckpt_dir}: no step_<N>.msgpack checkpoint")
        path = found[-1][1]
    elif which.isdigit():
        path = checkpoint_path(ckpt_dir, int(which))
    else:
        raise RunnerError(f"--checkpoint {which}: use last, best or a step number")
    state, _, metrics = evaluate_checkpoint(
        cfg, parts, lambda template: (load_checkpoint(path, template), path))
    return {"run_dir": str(run_dir), "checkpoint": str(path), "step": int(state.step),
            "eval": metrics}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runner.eval",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="last", help="last (default), best or a step")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(evaluate_run(args.run_dir.expanduser().resolve(), args.checkpoint),
                         indent=2))
    except Exception as err:  # noqa: BLE001 (a user's error is one line; a bug shows all)
        message = describe_error(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
