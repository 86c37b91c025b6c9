"""Layer 1: the pure JAX core. The TrainState, the jitted train/eval programs, optimizers,
sharding helpers and the shape check: no files, no environment, no global JAX settings."""
