"""dsd-sample: plain DDIM samples of the prior, written like a run (result.npz per seed), so
optimization results can be compared with the sample of the same seed."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dsd.config import Config, resolve_device, validate
from dsd.logging import console
from dsd.ode import ddim_sample
from dsd.outputs import save_grid, save_json, save_png, save_result
from dsd.run import build_prior, reference_metrics, reference_summary
from dsd.seeding import seed_noise


def sample(cfg: Config, run_dir: Path) -> dict:
    seeds = validate(cfg)
    device = resolve_device(cfg.device)
    run_dir = Path(run_dir)
    started = time.perf_counter()
    prior = build_prior(cfg, device)
    eps_star = torch.stack([seed_noise(seed, prior.sample_shape) for seed in seeds]).to(device)
    x0 = ddim_sample(
        prior,
        eps_star,
        prior.condition(cfg.prompt, batch=len(seeds)),
        cfg.sampler.steps,
        cfg.sampler.cfg_scale,
    )
    images = prior.decode(x0).permute(0, 2, 3, 1).float().cpu()
    entries = []
    for seed, image in zip(seeds, images):
        save_result(run_dir / f"seed_{seed}" / "result.npz", image.numpy())
        save_png(run_dir / f"seed_{seed}" / "final.png", image.numpy())
        entries.append(
            {"seed": seed, "steps": cfg.sampler.steps, **reference_metrics(prior, cfg.prompt, image)}
        )
    save_grid(run_dir / "grid.png", [im.numpy() for im in images], [f"seed {s}" for s in seeds])
    summary = {
        "prompt": cfg.prompt,
        "sampler": "ddim",
        "prior": cfg.prior.name,
        "steps": cfg.sampler.steps,
        "cfg_scale": cfg.sampler.cfg_scale,
        "wall_s": round(time.perf_counter() - started, 3),
        "prior_rows": prior.rows_evaluated,
        "seeds": entries,
        **reference_summary(prior, cfg.prompt, entries),
    }
    save_json(run_dir / "summary.json", summary)
    console.print(f"[green]sampled[/green] {len(seeds)} seeds -> {run_dir}")
    return summary
