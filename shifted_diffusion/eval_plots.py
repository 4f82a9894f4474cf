"""The seed's two plots: FID against the CLIP image-image and image-text scores, one curve per prior (its
settings in order of guidance), each point labelled by its guidance scales."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_tradeoffs", "PLOTS"]

PLOTS = {"clip_image_image": "fid_vs_clip_image_image.png", "clip_image_text": "fid_vs_clip_image_text.png"}


def plot_tradeoffs(results: dict, output_dir) -> list[Path]:
    """Write the PNGs of ``PLOTS`` for ``Evaluator.run``'s results (nothing without a decoder): their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, file_name in PLOTS.items():
        curves = {name: [e for e in entries if "fid" in e] for name, entries in results["priors"].items()}
        if not any(curves.values()):
            continue
        figure, axes = plt.subplots(figsize=(6, 4.5))
        for name, entries in curves.items():
            entries = sorted(entries, key=lambda e: (e["prior_guidance_scale"], e["guidance_scale"]))
            xs, ys = [e[key] for e in entries], [e["fid"] for e in entries]
            axes.plot(xs, ys, marker="o", label=name)
            for e, x, y in zip(entries, xs, ys):
                axes.annotate(f"{e['prior_guidance_scale']:g}/{e['guidance_scale']:g}", (x, y), fontsize=7,
                              textcoords="offset points", xytext=(3, 3))
        axes.set_xlabel(f"CLIP {key.split('_', 1)[1].replace('_', '-')} similarity")
        axes.set_ylabel("FID")
        axes.set_title("labels: prior guidance / decoder guidance")
        axes.legend()
        figure.tight_layout()
        path = Path(output_dir) / file_name
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written
