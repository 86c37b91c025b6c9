"""Metric writers: the interface (``base``), the ones runner ships (``tensorboard``, ``jsonl``,
``mlflow_run``) and the ``logger`` key's writers built for a run (``configured``)."""
