"""PNG plots of `spectra.analysis.collect` series: one overview of the model-wide curves next to loss and learning
rate, and one heatmap (layer x checkpoint) per per-layer series. Drawn with matplotlib's Agg canvas directly, so no
global backend is changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spectra.files import atomic_file

TITLES = {
    "frac_neg": "fraction of weights at −1",
    "frac_zero": "fraction of weights at 0",
    "frac_pos": "fraction of weights at +1",
    "scale": "scale γ",
    "latent_norm": "latent weight norm ‖W‖",
    "flip_rate": "state flips since previous checkpoint (fraction)",
    "max_update": "largest element-wise update max|ΔW|",
    "update_norm": "update norm ‖ΔW‖",
}


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'spectra-lm[plot]'") from e
    return Figure, FigureCanvasAgg


def _save(fig, path: Path) -> Path:
    _, FigureCanvasAgg = _matplotlib()
    FigureCanvasAgg(fig)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return path


def _points(xs: list, ys: list) -> tuple[list, list]:
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _with_lr(ax, metrics: dict[str, Any]) -> None:
    """The learning rate on a twin axis, dashed grey."""
    x, lr = _points(metrics["train"]["tokens"], metrics["train"]["lr"])
    if x:
        twin = ax.twinx()
        twin.plot(x, lr, color="grey", linestyle="--", linewidth=1, label="lr")
        twin.set_ylabel("learning rate", color="grey")


def plot_overview(series: dict[str, Any], path: Path) -> Path:
    """Loss and LR, ternary states, flip rate, largest update, scales and latent norms against tokens."""
    Figure, _ = _matplotlib()
    model, ckpt, metrics = series["model"], series["checkpoints"], series["metrics"]
    quantized = "flip_rate" in model
    fig = Figure(figsize=(13, 11), layout="constrained")
    axes = fig.subplots(3, 2, sharex=True).ravel()
    q = series["quantizer"]
    title = series["family"] if not q else f"{series['family']}, quantizer {q['name']} {q['options'] or ''}".rstrip()
    fig.suptitle(f"{title}: {series['run_dir']}")

    ax = axes[0]
    x, y = _points(metrics["train"]["tokens"], metrics["train"]["loss"])
    ax.plot(x, y, linewidth=1, label="train loss")
    x, y = _points(metrics["val"]["tokens"], metrics["val"]["val_loss"])
    if x:
        ax.plot(x, y, marker="o", label="val loss")
    ax.set_ylabel("loss")
    ax.legend(loc="upper center")
    _with_lr(ax, metrics)

    ax = axes[1]
    if quantized:
        for key, color in (("frac_neg", "tab:blue"), ("frac_zero", "tab:grey"), ("frac_pos", "tab:red")):
            ax.plot(ckpt["tokens"], model[key], marker=".", color=color, label=key.removeprefix("frac_"))
        ax.set_ylabel("fraction of weights")
        ax.legend()
    ax.set_title("states of all block weights")

    ax = axes[2]
    if quantized:
        ax.plot(ckpt["delta_tokens"], model["flip_rate"], marker=".")
    ax.set_ylabel(TITLES["flip_rate"])
    _with_lr(ax, metrics)

    ax = axes[3]
    ax.plot(ckpt["delta_tokens"], model["max_update"], marker=".", color="tab:purple")
    ax.set_ylabel(TITLES["max_update"])
    _with_lr(ax, metrics)

    ax = axes[4]
    if quantized:
        for name, s in series["layers"].items():
            ax.plot(ckpt["tokens"], s["scale"], linewidth=0.7, alpha=0.5)
        ax.plot(ckpt["tokens"], model["scale"], color="black", linewidth=2, label="mean over layers")
        ax.legend()
    ax.set_ylabel(TITLES["scale"] + " per layer")

    ax = axes[5]
    ax.plot(ckpt["tokens"], model["latent_norm"], marker=".", color="tab:green")
    ax.set_ylabel(TITLES["latent_norm"] + " (all blocks)")

    for ax in axes[4:]:
        ax.set_xlabel("tokens")
    return _save(fig, path)


def plot_layer_heatmap(series: dict[str, Any], key: str, path: Path) -> Path:
    """One row per block layer, one column per checkpoint (or checkpoint pair), colour = the series value."""
    Figure, _ = _matplotlib()
    names = list(series["layers"])
    values = [series["layers"][n][key] for n in names]
    delta = key in ("flip_rate", "max_update", "update_norm")
    tokens = series["checkpoints"]["delta_tokens" if delta else "tokens"]
    fig = Figure(figsize=(max(6, 0.5 * len(tokens) + 4), max(3, 0.18 * len(names) + 1.5)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label=TITLES[key])
    ax.set_yticks(range(len(names)), names, fontsize=max(4, min(8, 400 // max(1, len(names)))))
    stride = max(1, len(tokens) // 8)
    ticks = list(range(0, len(tokens), stride))
    ax.set_xticks(ticks, [_si(tokens[i]) for i in ticks])
    ax.set_xlabel("tokens" + (" (at the later checkpoint of each pair)" if delta else ""))
    ax.set_title(f"{TITLES[key]}, per layer")
    return _save(fig, path)


def _si(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def plot_all(series: dict[str, Any], out_dir: Path) -> list[Path]:
    """overview.png plus layers_<series>.png for every per-layer series that has values."""
    out_dir = Path(out_dir)
    files = [plot_overview(series, out_dir / "overview.png")]
    first = next(iter(series["layers"].values()))
    for key, values in first.items():
        if values:
            files.append(plot_layer_heatmap(series, key, out_dir / f"layers_{key}.png"))
    return files
