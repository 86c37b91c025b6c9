"""``python -m runner.bench``: runner measured against hand-written JAX (and PyTorch). The run
path never imports this package."""
