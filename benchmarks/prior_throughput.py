"""Throughput of the diffusion priors: UNet rows/s, and ms per guidance step for SDS vs DSD.

CPU (default): the tiny random SD of the tests (8×8×4 latents), loaded by the real prior code,
`prior.eps` with CFG at several batch sizes and one SDS / DSD guidance step per seed batch; then
the UNet forward with CFG (conditional + unconditional rows in one call) of SD, MVDream and
Zero123 built at the same tiny channel counts, so their relative cost shows.
`--full` (CUDA): the full-size SD 2.1 base UNet architecture from its config with random fp16
weights at 64×64 latents, batch 1/4/8 rows, and the full-size MVDream UNet (sd-v2-base.yaml
shape, random fp16 weights) on objects of 4 views at 256² (32×32 latents) with CFG, each with
peak memory. Prints markdown tables.

    .venv/bin/python benchmarks/prior_throughput.py               # tiny model, CPU
    .venv/bin/python benchmarks/prior_throughput.py --full        # full-size UNets, CUDA
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# stabilityai/stable-diffusion-2-1-base unet/config.json (architecture only; weights random)
SD21_BASE_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)


def timed(fn, repeats: int, sync=lambda: None) -> float:
    """Best (minimum) seconds of fn() over `repeats` calls, after one warm-up call: on a shared
    machine other load only adds time, so the minimum is the least noisy estimate (as timeit)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def tiny_tables(batches: list[int], repeats: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_sd import build_tiny_sd

    from dsd.guidance.base import GuidanceContext
    from dsd.guidance.dsd import DSD, DSDConfig
    from dsd.guidance.sds import SDS, SDSConfig
    from dsd.priors.stable_diffusion import StableDiffusionConfig, StableDiffusionPrior
    from dsd.seeding import seed_noise, step_generator

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        prior = StableDiffusionPrior(StableDiffusionConfig(pretrained=str(build_tiny_sd(Path(tmp)))))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ntiny SD on {torch.get_num_threads()} CPU threads (load average {load:.1f} at start), "
          f"latents {prior.sample_shape}, best of {repeats} calls\n")
    print("| batch (seeds) | UNet rows / call | UNet rows/s | sds ms/step | sds rows/step | dsd ms/step | dsd rows/step |")
    print("|---|---|---|---|---|---|---|")
    for batch in batches:
        cond = prior.condition("a photo of a corgi", batch=batch)
        x = torch.randn(batch, *prior.sample_shape)
        t = torch.full((batch,), 500)
        seconds = timed(lambda: prior.eps(x, t, cond, 7.5), repeats)  # noqa: B023
        rows = 2 * batch  # conditional + unconditional
        cells = [str(batch), str(rows), f"{rows / seconds:.0f}"]
        for make in (lambda: SDS(SDSConfig(), prior), lambda: DSD(DSDConfig(), prior)):
            guidance = make()
            seeds = list(range(batch))
            step = {"i": 0}

            def one_step(guidance=guidance, seeds=seeds, step=step, cond=cond, x=x) -> None:
                ctx = GuidanceContext(
                    prior=prior, cond=cond, seeds=seeds,
                    eps_star=torch.stack([seed_noise(s, prior.sample_shape) for s in seeds]),
                    generators=[step_generator(s) for s in seeds], step=step["i"], steps=100,
                )  # fmt: skip
                guidance.grad(x, ctx)
                step["i"] += 1

            before = prior.rows_evaluated
            seconds = timed(one_step, repeats)
            per_step = (prior.rows_evaluated - before) / (repeats + 1) / batch
            cells += [f"{seconds * 1e3:.1f}", f"{per_step:.2f}"]
        print("| " + " | ".join(cells) + " |")
    print("\nrows/step are prior rows per seed per step (DSD includes its cached ODE work).")
    unet_table(prior, [b for b in batches if b % MVDREAM_VIEWS == 0] or [MVDREAM_VIEWS], repeats)


MVDREAM_VIEWS = 4


def tiny_unets(sd_unet) -> dict:
    """SD, MVDream and Zero123 UNets at the tiny SD's channel counts (ldm layout: attention at every
    level but the deepest), with the inputs each takes besides x and t."""
    from dsd.priors.mvdream_model import MVDreamUNetConfig, build_mvdream_unet
    from dsd.priors.zero123_model import Zero123UNetConfig, build_unet

    c = sd_unet.config
    channels, per, context = tuple(c.block_out_channels), c.layers_per_block, c.cross_attention_dim
    heads = c.attention_head_dim  # the tiny SD's head count per level
    head_channels = channels[0] // (heads[0] if isinstance(heads, (list, tuple)) else heads)
    mvdream = build_mvdream_unet(MVDreamUNetConfig(
        num_views=MVDREAM_VIEWS, block_out_channels=channels, layers_per_block=per, head_channels=head_channels,
        cross_attention_dim=context, sample_size=c.sample_size))  # fmt: skip
    zero123 = build_unet(Zero123UNetConfig(
        block_out_channels=channels, layers_per_block=per, num_heads=channels[0] // head_channels,
        cross_attention_dim=context, sample_size=c.sample_size))  # fmt: skip
    tokens = 16  # the tiny tokenizer's length; Zero123 attends to one token (its image embedding)
    return {
        "sd21": (sd_unet, c.in_channels, lambda rows: {"encoder_hidden_states": torch.randn(rows, tokens, context)}),
        "mvdream": (mvdream, c.in_channels, lambda rows: {"encoder_hidden_states": torch.randn(rows, tokens, context),
                                                          "class_labels": torch.randn(rows, 16)}),
        "zero123": (zero123, 2 * c.in_channels, lambda rows: {"encoder_hidden_states": torch.randn(rows, 1, context)}),
    }


def unet_table(sd_prior, batches: list[int], repeats: int) -> None:
    size = sd_prior.unet.config.sample_size
    print(f"\nUNet forward with CFG (2 × batch rows in one call), tiny channel counts "
          f"{tuple(sd_prior.unet.config.block_out_channels)}, {size}×{size} latents, best of {repeats} calls\n")
    print("| model | batch | UNet rows / call | UNet rows/s | vs sd21 |")
    print("|---|---|---|---|---|")
    unets = tiny_unets(sd_prior.unet)
    for unet, _, _ in unets.values():
        unet.requires_grad_(False).eval()
    for batch in batches:
        rows, base = 2 * batch, None
        for name, (unet, in_channels, extra) in unets.items():
            x = torch.randn(rows, in_channels, size, size)
            t = torch.full((rows,), 500)
            kwargs = extra(rows)
            with torch.no_grad():
                seconds = timed(lambda: unet(x, t, **kwargs), repeats)  # noqa: B023
            base = base or seconds
            print(f"| {name} | {batch} | {rows} | {rows / seconds:.0f} | {base / seconds:.2f}× |")
    print(f"\nmvdream: batch = objects × {MVDREAM_VIEWS} views, self-attention joined over the views of an object; "
          "zero123: 8 input channels (noisy latent ⊕ input-view latent).")


def full_table(batches: list[int], repeats: int, device_name: str) -> None:
    """The full-size SD 2.1 base UNet with random weights: fp16 on CUDA (the measurement), fp32 on
    CPU (only a check that the architecture builds and runs; CPU timings are not the target)."""
    from diffusers import UNet2DConditionModel

    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--full --device cuda needs a CUDA device (use --device cpu for a smoke check)")
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    unet = UNet2DConditionModel(**SD21_BASE_UNET).to(device, dtype).eval()
    unet.to(memory_format=torch.channels_last)
    unet.requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\nSD 2.1 base UNet ({params:.0f}M params, random weights, {dtype}, SDPA) on {where}\n")
    print("| rows | ms / call | rows/s | peak memory GiB |")
    print("|---|---|---|---|")
    for batch in batches:
        x = torch.randn(batch, 4, 64, 64, device=device, dtype=dtype)
        t = torch.full((batch,), 500, device=device)
        hidden = torch.randn(batch, 77, 1024, device=device, dtype=dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            seconds = timed(lambda: unet(x, t, encoder_hidden_states=hidden), repeats, sync)  # noqa: B023
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else "n/a"
        print(f"| {batch} | {seconds * 1e3:.1f} | {batch / seconds:.1f} | {peak} |")


def full_mvdream_table(objects: list[int], repeats: int, device_name: str) -> None:
    """The full-size MVDream UNet (sd-v2-base.yaml shape) with random weights: objects of 4 views at
    256² (32×32 latents), CFG rows in one call (2 × 4 × objects), fp16 on CUDA."""
    from dsd.priors.mvdream_model import MVDreamUNetConfig, build_mvdream_unet

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    config = MVDreamUNetConfig()
    with torch.device(device):  # initialize on the device: no 3.5 GB CPU copy first
        unet = build_mvdream_unet(config)
    unet = unet.to(dtype).eval().requires_grad_(False)
    unet.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    where = torch.cuda.get_device_name() if cuda else "CPU"
    size = config.sample_size
    print(f"\nMVDream UNet ({params:.0f}M params, random weights, {dtype}, {config.num_views} views joined in "
          f"self-attention) on {where}, {size}×{size} latents (256² renders), CFG in one call\n")
    print("| objects | rows | ms / call | rows/s | objects/s | peak memory GiB |")
    print("|---|---|---|---|---|---|")
    for n in objects:
        rows = 2 * config.num_views * n  # conditional + unconditional, same cameras
        x = torch.randn(rows, config.in_channels, size, size, device=device, dtype=dtype)
        t = torch.full((rows,), 500, device=device)
        hidden = torch.randn(rows, 77, config.cross_attention_dim, device=device, dtype=dtype)
        camera = torch.randn(rows, 16, device=device, dtype=dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            seconds = timed(lambda: unet(x, t, encoder_hidden_states=hidden, class_labels=camera),  # noqa: B023
                            repeats, sync)
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else "n/a"
        print(f"| {n} | {rows} | {seconds * 1e3:.1f} | {rows / seconds:.1f} | {n / seconds:.2f} | {peak} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size SD 2.1 UNet on CUDA")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--mvdream-objects", type=int, nargs="+", default=[1, 2, 4],
                        help="for --full: objects of 4 views per MVDream call")
    parser.add_argument("--device", default="cuda", help="for --full: cuda (the measurement) or cpu (smoke check)")
    args = parser.parse_args()
    if args.full:
        full_table(args.batches, args.repeats, args.device)
        full_mvdream_table(args.mvdream_objects, args.repeats, args.device)
    else:
        tiny_tables(args.batches, args.repeats)


if __name__ == "__main__":
    main()
