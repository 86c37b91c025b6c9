"""Layer 2: what a run writes and reads. Atomic files, checkpoints, the run-dir lock and rules,
the manifest, recorded inputs, TensorBoard and figures."""
