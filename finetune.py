"""Fine-tune Stable Diffusion into a language-free decoder conditioned on multi-CLIP image embeddings.

    accelerate launch finetune.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2-base \
        --train_data_dir coco_512/ --use_ema --resolution 512 --center_crop --random_flip \
        --train_batch_size 16 --gradient_accumulation_steps 4 --gradient_checkpointing \
        --max_train_steps 30000 --checkpointing_steps 2000 --learning_rate 1e-5 --max_grad_norm 1 \
        --lr_scheduler constant --lr_warmup_steps 0 --mixed_precision fp16 --output_dir sd2-shifted-decoder
    accelerate launch finetune.py --config configs/finetune_sd2_base_coco.yaml --train_data_dir coco_512

Every flag is a field of shifted_diffusion.decoder_training.DecoderTrainConfig (also a key of the --config
YAML files); the loop is shifted_diffusion.decoder_training.train_decoder. The output folder is a standard
diffusers StableDiffusionPipeline folder (text_encoder=None) plus image_projection/,
empty_embedding.safetensors and shifted_decoder.json: load it with shifted_diffusion.decoder.load_decoder.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from shifted_diffusion.decoder_training import parse_decoder_config, train_decoder


def main(argv: Optional[Sequence[str]] = None) -> Path:
    return train_decoder(parse_decoder_config(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
