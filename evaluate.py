"""The shifted-vs-baseline comparison as one command (FID, CLIP scores, prior-only cosines, plots); the logic
lives in shifted_diffusion.eval_cli / shifted_diffusion.evaluation. ``python evaluate.py --help``."""

from shifted_diffusion.eval_cli import main as _run


def main(argv=None):
    return _run(argv)


if __name__ == "__main__":
    main()
