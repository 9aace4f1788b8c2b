"""dsd-sample: plain DDIM samples of the prior, written like a run (result.npz per seed), so
optimization results can be compared with the sample of the same seed.

A prior conditioned on cameras (analytic multiview/image, MVDream, Zero123), or any prior with a 3D
representation configured, is sampled on the evaluation views (camera.eval_*): per seed, DDIM from
the seed's ε* as the trainer uses it (the same noise in every view of a per-view prior; view slot by
view slot for a multi-view prior, whose F views are sampled jointly); each seed's row of grid.png
shows its views and its `nearest_reference` is taken over all of them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dsd import registry
from dsd.cameras import Cameras, multiview_order
from dsd.config import Config, resolve_device, validate
from dsd.logging import console
from dsd.ode import ddim_sample
from dsd.outputs import save_grid, save_json, save_png, save_result, save_views
from dsd.run import build_prior, evaluation_cameras, reference_metrics, reference_summary
from dsd.seeding import eps_star_rows, prior_eps_star
from dsd.trainer import apply_num_threads


def sample(cfg: Config, run_dir: Path) -> dict:
    seeds = validate(cfg)
    apply_num_threads(cfg.trainer.num_threads)
    device = resolve_device(cfg.device)
    run_dir = Path(run_dir)
    started = time.perf_counter()
    prior = build_prior(cfg, device)
    cameras = None
    views = 1
    if prior.needs_cameras or registry.lookup("representation", cfg.representation.name).is_3d:
        cameras = evaluation_cameras(cfg, prior)  # turntable order: metrics and the grid use it
        views = len(cameras)
        order = torch.arange(views)
        if prior.views_per_sample > 1:
            order = multiview_order(cameras, prior.views_per_sample, cfg.camera.azimuth_range)
        sampled_cameras = cameras.rows(order)  # whole objects of F views for a multi-view prior
    eps_star = torch.cat(
        [eps_star_rows(prior_eps_star(seed, prior), views, prior.views_per_sample) for seed in seeds]
    ).to(device)
    cond_cameras = None if cameras is None else Cameras.cat([sampled_cameras] * len(seeds))
    x0 = ddim_sample(
        prior,
        eps_star,
        prior.condition(cfg.prompt, batch=len(eps_star), cameras=cond_cameras),
        cfg.sampler.steps,
        cfg.sampler.cfg_scale,
    )
    images = prior.decode(x0).permute(0, 2, 3, 1).float().cpu()
    images = images.reshape(len(seeds), views, *images.shape[1:])  # (seeds, views, H, W, 3) in pixels
    if cameras is not None:  # back to turntable order
        images = images[:, torch.argsort(order)]
    entries = []
    for seed, seed_views in zip(seeds, images):
        image = seed_views[0]  # the contract: the first evaluation view
        save_result(run_dir / f"seed_{seed}" / "result.npz", image.numpy())
        save_views(run_dir / f"seed_{seed}" / "views.npz", seed_views.numpy())
        save_png(run_dir / f"seed_{seed}" / "final.png", image.numpy())
        shown = image if cameras is None else seed_views
        entries.append(
            {"seed": seed, "steps": cfg.sampler.steps, **reference_metrics(prior, cfg.prompt, shown, cameras)}
        )
    labels = [
        f"seed {e['seed']}" + (f"  ref {e['nearest_reference']}" if "nearest_reference" in e else "") for e in entries
    ]
    save_grid(run_dir / "grid.png", [v.numpy() for v in images], labels)
    summary = {
        "prompt": cfg.prompt,
        "sampler": "ddim",
        "prior": cfg.prior.name,
        "steps": cfg.sampler.steps,
        "cfg_scale": cfg.sampler.cfg_scale,
        "wall_s": round(time.perf_counter() - started, 3),
        "prior_rows": prior.rows_evaluated,
        "seeds": entries,
        **reference_summary(prior, cfg.prompt, entries, cameras),
    }
    save_json(run_dir / "summary.json", summary)
    console.print(f"[green]sampled[/green] {len(seeds)} seeds -> {run_dir}")
    return summary
