"""Layer 3: the host loop. Dispatch of the compiled steps, for one run or a fused group, and
the periodic actions (log, eval, checkpoint, early stop, profile) after each dispatch."""
