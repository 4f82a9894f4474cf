"""Images per second of two decoder folders on the same embeddings, in one run (e.g. the GAN against the diffusion
decoder at 25 steps).

    python benchmarks/decoder_speed.py --decoder gan=outputs/toy_gan --decoder diffusion=outputs/toy_decoder \
        [--batch 64] [--num_inference_steps 25] [--guidance_scale 3] [--repeats 3] [--num_threads 2] [--json out.json]

Each decoder generates --batch images from random embeddings of its CLIP dim (one warm-up call, then --repeats
timed calls; the median counts); prints one JSON object with images/s per decoder and their ratios to the first.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from shifted_diffusion.decoder import load_decoder
from shifted_diffusion.threads import torch_threads


def _named(text: str) -> tuple:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoder", type=_named, action="append", required=True, metavar="NAME=FOLDER")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--num_inference_steps", type=int, default=25, help="diffusion decoders' DDIM steps")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="diffusion decoders' guidance")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num_threads", type=int, default=2, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the JSON here")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out = {"batch": args.batch, "num_inference_steps": args.num_inference_steps,
           "guidance_scale": args.guidance_scale, "device": args.device, "decoders": {}}
    with torch_threads(args.num_threads):
        for name, folder in args.decoder:
            decoder = load_decoder(folder, device=args.device)
            embeds = torch.randn(args.batch, decoder.clip_dim, generator=torch.Generator().manual_seed(0))

            def call():
                generators = [torch.Generator(device=args.device).manual_seed(i) for i in range(args.batch)]
                return decoder.generate(embeds, guidance_scale=args.guidance_scale,
                                        num_inference_steps=args.num_inference_steps, generator=generators)

            call()  # warm-up
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                call()
                seconds.append(time.perf_counter() - start)
            median = statistics.median(seconds)
            out["decoders"][name] = {"folder": folder, "type": type(decoder).__name__, "seconds": seconds,
                                     "images_per_s": args.batch / median}
        first = next(iter(out["decoders"].values()))["images_per_s"]
        for entry in out["decoders"].values():
            entry["ratio_to_first"] = entry["images_per_s"] / first
        out["torch_threads"] = torch.get_num_threads()
    out["platform"], out["torch"] = platform.platform(), torch.__version__
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
