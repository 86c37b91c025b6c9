"""Layer 0: what a config means. runner's typed schema, ``_target_`` resolution and the
one-line errors every other layer raises. Imports nothing else of runner."""
