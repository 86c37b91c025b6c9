"""``python -m runner.bench``: see ``runner.bench.suite``."""

from runner.bench.suite import main

main()
