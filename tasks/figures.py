"""matplotlib for task figures, imported only when a figure is drawn (it costs ~0.3 s), and
the figures classification tasks share."""

import numpy as np


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_grid(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray):
    """Up to 16 images [N, H, W, C] in a 4x4 grid, titled with true and predicted labels
    (green when right, red when wrong); each image scaled to its own range."""
    fig, axes = pyplot().subplots(4, 4, figsize=(6, 6.4), dpi=80)
    for ax, image, label, guess in zip(axes.flat, images, labels, predicted):
        lo, hi = image.min(), image.max()
        ax.imshow(((image - lo) / (hi - lo + 1e-8))[..., :3].squeeze(),
                  cmap="gray" if image.shape[-1] == 1 else None)
        ax.set_title(f"y={label} pred={guess}", fontsize=8,
                     color="green" if label == guess else "red")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int):
    """Counts of (true, predicted) label pairs, as an annotated image."""
    counts = np.zeros((classes, classes), int)
    np.add.at(counts, (labels, predicted), 1)
    fig, ax = pyplot().subplots(figsize=(5, 4.5), dpi=80)
    ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        if n:
            ax.text(j, i, n, ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    fig.tight_layout()
    return fig
