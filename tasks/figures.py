"""matplotlib for task figures, imported only when a figure is drawn (it costs ~0.3 s), and
the figures classification tasks share, sized for TensorBoard's image cards.

TensorBoard's Time Series tab (2.21) shows an image card's image 215 CSS px tall whatever its
size, and at most ~372 px wide (measured in Chromium, windows 1400-1920 px wide). The figures
were 360-512 px tall with 7-8 pt text: shown at 0.42-0.6 scale, 4-5 px, unreadable. Drawn
``HEIGHT_IN`` tall at ``DPI`` (280 px, shown at 0.77 scale; aspect at most 372/215), a
``TICK_PT`` label shows in an 11.7 px font and a ``TEXT_PT`` one in 12.8 px (TensorBoard's
own run names: 13 px).
"""

import numpy as np

DPI, HEIGHT_IN = 100, 2.8
TEXT_PT, TICK_PT = 12, 11
MIN_COUNT_PT = 9  # smaller counts would show under 9.6 px: the colour bar reads the cells


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def card_figure(width_in: float, rows: int = 1, cols: int = 1):
    """A figure ``HEIGHT_IN`` tall and ``width_in`` wide (at most the card's aspect) and its
    axes (a [rows, cols] array), tick labels at ``TICK_PT``."""
    fig, axes = pyplot().subplots(rows, cols, figsize=(width_in, HEIGHT_IN), dpi=DPI,
                                  squeeze=False)
    for ax in axes.flat:
        ax.tick_params(labelsize=TICK_PT)
    return fig, axes


def sample_grid(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray):
    """Up to 8 images [N, H, W, C] in a 2x4 grid, titled with true and predicted labels (dark
    green when right, dark red when wrong: 7.4:1 on white, where red was 4.0:1); each image
    scaled to its own range. (16 in a 4x4 grid left ~50 px per image and 4 px titles on the card.)"""
    fig, axes = card_figure(4.8, 2, 4)
    for ax, image, label, guess in zip(axes.flat, images, labels, predicted):
        lo, hi = image.min(), image.max()
        ax.imshow(((image - lo) / (hi - lo + 1e-8))[..., :3].squeeze(),
                  cmap="gray" if image.shape[-1] == 1 else None)
        ax.set_title(f"y={label} pred={guess}", fontsize=TEXT_PT, pad=3,
                     color="#006400" if label == guess else "#b00000")
    for ax in axes.flat:
        ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.06, hspace=0.22)
    return fig


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int):
    """Counts of (true, predicted) label pairs as an image with a colour bar, each count in
    black or white, whichever contrasts more with its cell (at least 4.58:1; black on the
    darkest blue was 1.6:1)."""
    counts = np.zeros((classes, classes), int)
    np.add.at(counts, (labels, predicted), 1)
    fig = pyplot().figure(figsize=(3.4, HEIGHT_IN), dpi=DPI)
    # Fixed places (px of 340 x 280): the square matrix, then the colour bar and its labels.
    ax = fig.add_axes((50 / 340, 42 / 280, 228 / 340, 228 / 280))
    colour_bar = fig.add_axes((288 / 340, 42 / 280, 12 / 340, 228 / 280))
    image = ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(counts.max(), 1))  # norm: set now
    from matplotlib.ticker import MaxNLocator  # (matplotlib is imported by now)

    fig.colorbar(image, cax=colour_bar, ticks=MaxNLocator(integer=True)).ax.tick_params(
        labelsize=TICK_PT)  # counts: no 0.5 ticks
    ax.tick_params(labelsize=TICK_PT)
    ax.set_xlabel("predicted", fontsize=TEXT_PT, labelpad=1)
    ax.set_ylabel("true", fontsize=TEXT_PT, labelpad=1)
    if classes <= 12:  # more labels would overlap: matplotlib's own ticks then
        ax.set_xticks(range(classes))
        ax.set_yticks(range(classes))
    size = count_size(228 / classes * 72 / DPI, len(str(counts.max())))
    for (i, j), n in np.ndenumerate(counts):
        if n and size:
            ax.text(j, i, n, ha="center", va="center", fontsize=size,
                    color=text_colour(image.cmap(image.norm(n))))
    return fig


def count_size(cell_pt: float, digits: int) -> int:
    """The font size (pt) at which ``digits`` digits (~0.62 em each) fit a ``cell_pt`` cell,
    at most ``TEXT_PT``; 0 when that is under ``MIN_COUNT_PT``."""
    size = int(min(TEXT_PT, cell_pt / (0.62 * digits + 0.3)))
    return size if size >= MIN_COUNT_PT else 0


def luminance(rgba) -> float:
    """WCAG's relative luminance of an sRGB colour (0: black, 1: white)."""
    rgb = np.asarray(rgba[:3], float)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return float(linear @ [0.2126, 0.7152, 0.0722])


def contrast(a, b) -> float:
    """WCAG's contrast ratio of two colours (1 to 21; text wants 4.5)."""
    la, lb = sorted((luminance(a), luminance(b)))
    return (lb + 0.05) / (la + 0.05)


def text_colour(background) -> str:
    """Black or white, whichever contrasts more with ``background`` (at least 4.58:1)."""
    return "black" if contrast(background, (0, 0, 0)) >= contrast(background, (1, 1, 1)) \
        else "white"
