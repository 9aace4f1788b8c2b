"""A tiny random Stable Diffusion in diffusers layout, built offline (tests and benchmarks).

Same components and file layout as stabilityai/stable-diffusion-2-1-base (unet/, vae/,
text_encoder/, tokenizer/, scheduler/, model_index.json), so the real loading code in
dsd.priors.stable_diffusion reads it unchanged. Sizes: 8×8×4 latents, 16×16 pixels (VAE scale 2),
77 → 16 tokens, 32-d text embeddings. The scheduler has SD 2.1's betas (scaled_linear,
0.00085 → 0.012, 1000 steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = [
    "a", "an", "the", "of", "photo", "dslr", "hamburger", "teapot", "corgi", "red", "apple", "view",
    "front", "side", "back", "overhead", ",", "blurry", "ugly", "on", "table", "cat", "dog",
]  # fmt: skip
MAX_TOKENS = 16


def build_tokenizer():
    """A word-level fast tokenizer with CLIP-like special tokens, built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<|startoftext|>", "<|endoftext|>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        model_max_length=MAX_TOKENS,
    )


def build_tiny_sd(path: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny random SD to `path` (diffusers layout) and return it."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,  # as SD 2.x
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(WORDS) + 3,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    build_tokenizer().save_pretrained(path / "tokenizer")
    scheduler.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            },
            indent=2,
        )
    )
    return path


def with_scheduler(source: Path, path: Path, **overrides) -> Path:
    """The SD at `source` with its scheduler config changed by `overrides` (e.g. prediction_type,
    rescale_betas_zero_snr), written to `path`; the model folders are symlinked, not copied."""
    source, path = Path(source), Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "model_index.json"):
        (path / name).symlink_to((source / name).resolve())
    config = json.loads((source / "scheduler" / "scheduler_config.json").read_text())
    (path / "scheduler").mkdir()
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, **overrides}, indent=2))
    return path
