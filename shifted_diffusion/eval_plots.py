"""The seed's two plots: FID against the CLIP image-image and image-text scores, one curve per prior (its
settings in order of guidance), each point labelled by its guidance scales. With a Frechet distance in other
features than InceptionV3's (the results' ``settings.fd_name``), the y axis is that number, named as such."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_tradeoffs", "plot_path", "PLOTS"]

PLOTS = {"clip_image_image": "fid_vs_clip_image_image.png", "clip_image_text": "fid_vs_clip_image_text.png"}


def plot_path(output_dir, key: str, fd_name: str = "fid") -> Path:
    """Where ``plot_tradeoffs`` writes the plot of ``key`` (``fid`` in its name replaced by ``fd_name``)."""
    return Path(output_dir) / PLOTS[key].replace("fid", fd_name, 1)


def plot_tradeoffs(results: dict, output_dir) -> list[Path]:
    """Write the PNGs of ``PLOTS`` for ``Evaluator.run``'s results (nothing without a decoder; ``fid`` in the names
    replaced by the results' ``fd_name``): their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fd_name = (results.get("settings") or {}).get("fd_name") or "fid"
    fd_label = {"fid": "FID", "fd_clip": "Frechet distance (CLIP image features, not FID)"}.get(fd_name, fd_name)
    curves = {name: [e for e in entries if fd_name in e] for name, entries in results["priors"].items()}
    if not any(curves.values()):
        return []
    written = []
    for key in PLOTS:
        figure, axes = plt.subplots(figsize=(6, 4.5))
        for name, entries in curves.items():
            entries = sorted(entries, key=lambda e: (e["prior_guidance_scale"], e["guidance_scale"]))
            xs, ys = [e[key] for e in entries], [e[fd_name] for e in entries]
            axes.plot(xs, ys, marker="o", label=name)
            for e, x, y in zip(entries, xs, ys):
                axes.annotate(f"{e['prior_guidance_scale']:g}/{e['guidance_scale']:g}", (x, y), fontsize=7,
                              textcoords="offset points", xytext=(3, 3))
        axes.set_xlabel(f"CLIP {key.split('_', 1)[1].replace('_', '-')} similarity")
        axes.set_ylabel(fd_label)
        axes.set_title("labels: prior guidance / decoder guidance")
        axes.legend()
        figure.tight_layout()
        path = plot_path(output_dir, key, fd_name)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written
