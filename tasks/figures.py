"""matplotlib for task figures, imported only when a figure is drawn (it costs ~0.5 s)."""


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
