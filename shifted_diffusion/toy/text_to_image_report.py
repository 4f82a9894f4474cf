"""The toy text-to-image benchmark's report: the PNG grid (one row per caption) and the markdown table."""

from __future__ import annotations

import numpy as np

from .world import ATTRIBUTES

PRIORS = ("shifted", "baseline")

def labelled_grid(rows: list, labels: list, header: list, label_width: int = 300):
    """Rows of equal-size PIL images with a caption strip on the left and a header row of column names."""
    from PIL import Image, ImageDraw

    cell_w, cell_h = rows[0][0].size
    columns = max(len(r) for r in rows)
    header_h = 16
    grid = Image.new("RGB", (label_width + cell_w * columns, header_h + cell_h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(header):
        draw.text((label_width + j * cell_w + 2, 2), name, fill=(0, 0, 0))
    for i, (row, label) in enumerate(zip(rows, labels)):
        top = header_h + i * cell_h
        words, lines, line = label.split(), [], ""
        for word in words:  # wrap at ~48 characters
            if len(line) + len(word) + 1 > 48:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for k, text in enumerate(lines[:4]):
            draw.text((4, top + 4 + 12 * k), text, fill=(0, 0, 0))
        for j, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((cell_w, cell_h)), (label_width + j * cell_w, top))
    return grid


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.4g}" if abs(value) >= 10 else f"{value:.3f}"


def format_table(results: dict) -> str:
    """Markdown: one row per method; attribute accuracy on the mentioned (text) / all (image) attributes;
    the last column scores the prior's embeddings themselves (attributes of their nearest real image)."""
    header = ["method", "attr acc ↑", "all attrs ↑"] + list(ATTRIBUTES) + ["cos text ↑", "cos gt ↑", "FD ↓",
                                                                          "diversity", "prior emb. NN acc ↑"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(name, m):
        acc = m.get("attribute_accuracy", {})
        cells = [name, _cell(acc.get("mean")), _cell(acc.get("all"))] + [_cell(acc.get(a)) for a in ATTRIBUTES]
        cells += [_cell(m.get("cos_text")), _cell(m.get("cos_gt")), _cell(m.get("fd")),
                  _cell(m.get("diversity", {}).get("mean")),
                  _cell(m.get("prior_embedding_nn_attribute_accuracy", {}).get("mean"))]
        lines.append("| " + " | ".join(cells) + " |")

    steps = results["config"].get("prior_num_inference_steps", results["config"].get("prior_steps"))
    for name in PRIORS:
        row(f"text→image, {name} prior ({steps} steps)", results["text_to_image"][name])
    labels = {"text_only": "text→image, text-only decoder (image scale 0)",
              **{name: f"text + {name} prior embedding → text+image decoder" for name in PRIORS}}
    for name, metrics in results.get("text_and_image", {}).items():
        row(labels[name], metrics)
    row("image→image (all 5 attributes)", results["image_to_image"])
    row("real images (reference)", results["reference"]["real_images"])
    if "autoencoder" in results["reference"]:  # a decoder with a latent autoencoder (not the GAN)
        row("autoencoder reconstructions", results["reference"]["autoencoder"])
    return "\n".join(lines)
