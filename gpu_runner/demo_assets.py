"""Offline demo assets: a tiny SD 1.x-shaped base model and a small captioned image set.

`loratrain demo` needs a base model and images on a machine with no network and no GPU. This
module makes both from nothing: the model has SD 1.x's architecture (UNet with cross-attention,
CLIP text encoder, VAE, DDPM scheduler, a CLIP BPE tokenizer whose vocabulary is built here) at
toy sizes with random weights, saved as one .safetensors file the builtin trainer loads; the
images are coloured shapes with captions, so a LoRA trained on them has something to learn.

It lives in gpu_runner because the model file is in the builtin trainer's single-file format
(gpu_runner.trainers.builtin), and torch, diffusers and transformers (the `train` extra) are
imported only inside build_tiny_model, so importing this module costs nothing. The orchestrator
can also run it as a separate process, importing none of that:

    python -m gpu_runner.demo_assets --model PATH.safetensors --images DIR
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gpu_runner.protocol import TrainingConfig

TINY_MODEL_FILENAME = "tiny-sd15.safetensors"
TINY_MODEL_BASE_MODEL = "SD 1.5"  # the family the model reference names (#base_model=SD 1.5)
DEMO_TRIGGER_WORD = "lrtdemo"
DEMO_IMAGE_COUNT = 12
DEMO_RESOLUTION = 64


def demo_training_config() -> TrainingConfig:
    """What the demo trains with: 5 epochs of 30 steps (12 images x 10 repeats / batch 4) at
    64 px, text encoder included; on the CPU that is fp32 whatever mixed_precision says."""
    return TrainingConfig(
        resolution=DEMO_RESOLUTION,
        epochs=5,
        repeats=10,
        batch_size=4,
        network_dim=4,
        network_alpha=4,
        unet_lr=1e-3,
        text_encoder_lr=1e-4,
        optimizer="AdamW",
        lr_scheduler="constant",
        trigger_word=DEMO_TRIGGER_WORD,
        output_name="demo",
    )


# Words the tokenizer has merges for (other text is split into letters).
_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
}
_BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
_SHAPES = ("circle", "square", "triangle")
_WORDS = (
    DEMO_TRIGGER_WORD,
    *_COLOURS,
    *_BACKGROUNDS,
    *_SHAPES,
    "a",
    "on",
    "background",
    "shape",
)


# --------------------------------------------------------------------------------------------
# Demo images
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoImage:
    name: str
    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def demo_images(count: int = DEMO_IMAGE_COUNT) -> list[DemoImage]:
    """The demo set, always the same: every shape in several colours on light and dark."""
    combos = [
        (shape, colour, background)
        for background in _BACKGROUNDS
        for shape in _SHAPES
        for colour in _COLOURS
    ]
    random.Random(7).shuffle(combos)
    return [
        DemoImage(f"shape_{i:02d}", shape, colour, background)
        for i, (shape, colour, background) in enumerate(combos[:count])
    ]


def write_demo_dataset(
    directory: Path, count: int = DEMO_IMAGE_COUNT, size: int = DEMO_RESOLUTION
) -> list[Path]:
    """Write the demo PNGs with .txt captions into `directory`; return the image paths.

    Idempotent: the same call writes the same bytes.
    """
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for item in demo_images(count):
        image = Image.new("RGB", (size, size), _BACKGROUNDS[item.background])
        draw = ImageDraw.Draw(image)
        margin = size // 6
        box = (margin, margin, size - margin, size - margin)
        colour = _COLOURS[item.colour]
        if item.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif item.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            corners = [(size // 2, margin), (size - margin, size - margin), (margin, size - margin)]
            draw.polygon(corners, fill=colour)
        path = directory / f"{item.name}.png"
        image.save(path, format="PNG", optimize=False)
        path.with_suffix(".txt").write_text(item.caption + "\n", encoding="utf-8")
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# The tiny model
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte-level alphabet: every byte maps to a printable character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def write_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt for a CLIP BPE tokenizer: the byte alphabet, plus whole-word
    tokens for the demo's words (built by merges, letter pair by letter pair)."""
    alphabet = list(_bytes_to_unicode().values())
    vocab: list[str] = [*alphabet, *(c + "</w>" for c in alphabet)]
    merges: list[str] = []
    for word in _WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            if merged not in vocab:
                vocab.append(merged)
            pieces = [merged, *pieces[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """Build the tiny SD 1.x-shaped model at `path` (a .safetensors file) unless it exists.

    Idempotent: an existing file is kept (it is written under a temporary name and renamed, so
    a half-written file never counts). Needs the `train` extra (torch, diffusers, transformers).
    """
    if path.is_file():
        return path
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from gpu_runner.trainers.builtin import SdComponents, save_single_file

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = write_tokenizer_files(Path(scratch))
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
    vocab_size = len(tokenizer)
    # SD 1.x's block layout (cross-attention blocks, then a plain one), at toy widths.
    unet = UNet2DConditionModel(
        sample_size=DEMO_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    # Four blocks, as SD's VAE has: latents are 1/8 of the image size.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=DEMO_RESOLUTION,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # SD 1.x's noise schedule.
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
    )
    components = SdComponents(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    save_single_file(components, partial)
    partial.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m gpu_runner.demo_assets --model FILE --images DIR`: write what is missing."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="where the tiny model file goes")
    parser.add_argument("--images", type=Path, help="folder for the demo images and captions")
    args = parser.parse_args(argv)
    if args.model is None and args.images is None:
        parser.error("give --model, --images or both")
    if args.images is not None:
        images = write_demo_dataset(args.images)
        print(f"demo images: {len(images)} in {args.images}")
    if args.model is not None:
        build_tiny_model(args.model)
        print(f"tiny model: {args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
