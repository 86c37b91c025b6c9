"""Layer 2: the process and its platform. JAX's backend configuration, devices and ranks,
the peers of a multi-process run, signals, and compile counts."""
