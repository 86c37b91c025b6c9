"""Layer 4: runs and sweeps. Build a run from its config, open its session in a run dir,
resume it, run sweep jobs and fused groups."""
