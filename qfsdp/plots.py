"""The plot shapes qfsdp draws (loss curves, one bar per run, labeled points), shared by a run's loss.png, the
benchmark report and the sweep report, so they look alike and matplotlib is set up in one place."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on GPU hosts, and no GUI backend in worker processes
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path, empty: bool) -> None:
    if empty:
        # Still write the file: a report always has its plots, even when every job failed.
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def line_plot(path: Path, series: Sequence[tuple[str, Sequence[float], Sequence[float]]], *, xlabel: str,
              ylabel: str, title: str | None = None, marker: str | None = None) -> None:
    """One line per (label, xs, ys); a legend when there is more than one."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4) if len(series) > 1 else (6, 3.5))
    for label, xs, ys in series:
        ax.plot(xs, ys, label=label, marker=marker, alpha=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 1.25, 1.5, ...
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, ax, path, empty=not series)


def bar_plot(path: Path, labels: Sequence[str], values: Sequence[float], *, ylabel: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(list(labels), list(values))
    ax.set_ylabel(ylabel)
    # long labels (a job's overrides) end under their bar
    ax.tick_params(axis="x", labelsize=7)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
    ax.grid(alpha=0.3, axis="y")
    _save(fig, ax, path, empty=not labels)


def scatter_plot(path: Path, groups: Sequence[tuple[str, Sequence[tuple[str, float, float]]]], *, xlabel: str,
                 ylabel: str, line: Sequence[tuple[float, float]] = (), line_label: str | None = None,
                 title: str | None = None) -> None:
    """Labeled points, one marker and colour per (group, [(label, x, y), ...]); `line` joins some points (a
    frontier) in the order given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "os^Dv"
    for i, (group, points) in enumerate(groups):
        if not points:
            continue
        ax.scatter([x for _, x, _ in points], [y for _, _, y in points], marker=markers[i % len(markers)], s=40,
                   label=group, zorder=3)
        # labels alternate above and below their point: neighbouring points' labels overlap less
        for j, (label, x, y) in enumerate(points):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4 if j % 2 == 0 else -11), fontsize=7)
    if line:
        ax.plot([x for x, _ in line], [y for _, y in line], color="grey", linestyle="--", label=line_label,
                zorder=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if any(points for _, points in groups):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, ax, path, empty=not any(points for _, points in groups))
