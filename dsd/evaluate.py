"""dsd-eval: the paper's metrics for finished runs, a table for a sweep, and report.html.

    dsd-eval RUN_DIR [RUN_DIR ...]   # run dirs (summary.json) or --multirun sweep dirs

Per run it writes `metrics.json` (into the run dir); for the set `metrics.csv`, `metrics.md` (one row
per method x prompt, then one mean row per method) and `report.html` into the sweep dir (or --out).

Always computed (no weights needed):
- exact metrics of the analytic prior (summary.json): distinct references reached, coverage of the
  K references (distinct / K), seeds reached, median PSNR, and ODE agreement (the fraction of seeds
  whose nearest reference is that of the DDIM sample of the same seed, sampled with dsd-sample);
- pixel diversity: Vendi score and mean pairwise cosine distance of the seeds' renders from the
  same camera (pixels mapped to [-1, 1] and flattened), averaged over the evaluation views.
With weights (local paths or cached hub ids; nothing is downloaded): CLIP-SIM (--clip), FID of all
renders against samples of the prior for the same prompt (--inception), pairwise LPIPS at the same
camera (--lpips-backbone and --lpips-linear), Vendi / pairwise distance of CLIP or DINOv2 features.
Reference samples come from dsd-sample and are cached on disk, keyed by (prior config, prompt, seeds).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsd.errors import UserError
from dsd.metrics.reference import summarize_references
from dsd.metrics.vendi import mean_pairwise_distance, vendi_score
from dsd.outputs import atomic_write_bytes, load_result, load_views, save_json

# FID reference samples use seeds far from any run's seeds: DSD follows its seed's ODE, so the
# DDIM samples of the run's own seeds would flatter it.
REFERENCE_SEED_OFFSET = 10_000
LPIPS_MIN_SIDE = 64  # smaller renders are upsampled for LPIPS (see lpips_input)
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsd" / "reference_samples"

# Table columns in display order (only those some run has are shown) and their headers.
COLUMNS: dict[str, str] = {
    "distinct_references": "distinct refs",
    "coverage": "coverage of K",
    "reached_seeds": "seeds reached",
    "median_psnr_db": "median PSNR (dB)",
    "ode_agreement": "ODE agreement",
    "clip_sim": "CLIP-SIM (x100)",
    "fid": "FID",
    "lpips_pairwise": "pairwise LPIPS",
    "clip_vendi": "Vendi (CLIP)",
    "clip_pairwise": "pairwise (CLIP)",
    "dinov2_vendi": "Vendi (DINOv2)",
    "dinov2_pairwise": "pairwise (DINOv2)",
    "pixel_vendi": "Vendi (pixels)",
    "pixel_pairwise": "pairwise (pixels)",
}
KEY_COLUMNS = ("method", "prompt", "seeds")

# --metrics names -> the flags whose weights they need
METRIC_FLAGS: dict[str, tuple[str, ...]] = {
    "exact": (),
    "pixel": (),
    "clip_sim": ("--clip",),
    "clip_diversity": ("--clip",),
    "dinov2_diversity": ("--dinov2",),
    "fid": ("--inception",),
    "lpips": ("--lpips-backbone", "--lpips-linear"),
}
# overrides that do not change the method (they name the prompt, seeds or bookkeeping)
NOT_METHOD = re.compile(r"^(prompt|seeds|seed_shard|num_seed_shards|device|hydra\.|wandb\.|trainer\.resume|"
                        r"trainer\.auto_resume|trainer\.checkpoint_every)")


@dataclass
class RunRecord:
    """One finished run dir as dsd-eval sees it."""

    run_dir: Path
    summary: dict
    config: Any  # dsd.config.Config rebuilt from .hydra/config.yaml, or None without it
    method: str
    prompt: str
    seeds: list[int]
    views: np.ndarray  # (S, V, H, W, 3) in [0, 1], seeds in `seeds` order
    turntables: dict[int, Path] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    per_seed: list[dict] = field(default_factory=list)
    shard_dirs: list[Path] = field(default_factory=list)  # the run dirs of a sharded run (see merge_shards)


@dataclass
class Options:
    paths: list[Path]
    out: Path | None
    metrics: set[str]
    clip: str | None
    dinov2: str | None
    inception: str | None
    lpips_backbone: str | None
    lpips_linear: str | None
    lpips_net: str
    fid_samples: int
    cache: Path
    device: str
    wandb_mode: str
    inline: bool
    report: bool


# ---------------------------------------------------------------- finding and loading runs


def is_run_dir(path: Path) -> bool:
    return (path / "summary.json").is_file()


def find_run_dirs(path: Path) -> list[Path]:
    """`path` itself when it is a run dir, else the run dirs one or two levels below it (a sweep)."""
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; give run dirs (with summary.json) or --multirun sweep dirs.")
    if is_run_dir(path):
        return [path]
    found: list[Path] = []
    for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if is_run_dir(child):
            found.append(child)
        else:
            found += [g for g in sorted(child.iterdir()) if g.is_dir() and is_run_dir(g)]
    if not found:
        unfinished = " (it has seed_* folders but no summary.json: the run did not finish; resume it with " \
                     "trainer.resume=true)" if any(path.glob("seed_*")) else ""
        raise UserError(
            f"{path} holds no run results: no summary.json in it or in its subdirs one or two levels down"
            f"{unfinished}. Give a dsd-run/dsd-sample run dir or a --multirun sweep dir."
        )
    return found


def load_config(run_dir: Path):
    """The run's typed Config from Hydra's `.hydra/config.yaml` (None when the run has none): the
    group options are composed first, so each group gets its own schema, then the saved values."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    from dsd.compose import compose_config

    saved = OmegaConf.load(path)
    try:
        groups = [f"{g}={saved[g]['name']}" for g in ("guidance", "prior", "representation")]
        base = compose_config(groups)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(base), saved))
    except Exception as err:  # a config from another version of dsd
        raise UserError(f"{path} cannot be read as a dsd config ({type(err).__name__}: {err}).") from None


def method_overrides(run_dir: Path) -> list[str]:
    """The run's command-line overrides that may change the method (not prompt, seeds, bookkeeping)."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(overrides_file)
            if not NOT_METHOD.match(str(o)) and not str(o).startswith("guidance=")]


def assign_methods(records: list[RunRecord]) -> None:
    """Method label: the guidance (`ddim` for dsd-sample) plus the overrides that differ between the
    set's runs of that guidance, e.g. `dsd guidance.ode=random` beside `dsd`, so sweep jobs with one
    guidance stay apart while overrides they share (trainer.steps=...) stay out of the label."""
    names = [r.summary.get("guidance") or r.summary.get("sampler", "?") for r in records]
    own = [set(method_overrides(r.run_dir)) for r in records]
    for record, name, overrides in zip(records, names, own):
        shared = set.intersection(*[o for n, o in zip(names, own) if n == name])
        record.method = " ".join([name, *sorted(overrides - shared)])


def seed_views(seed_dir: Path) -> np.ndarray:
    """(V, H, W, 3): views.npz, or result.npz as one view for runs written before views.npz."""
    if (seed_dir / "views.npz").is_file():
        return load_views(seed_dir / "views.npz")
    if (seed_dir / "result.npz").is_file():
        return load_result(seed_dir / "result.npz")[None]
    raise UserError(
        f"{seed_dir} has no results (neither views.npz nor result.npz): the run did not finish this seed; "
        "resume it with trainer.resume=true or leave its dir out."
    )


def load_run(run_dir: Path) -> RunRecord:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{run_dir / 'summary.json'} cannot be read ({err}).") from None
    seeds = [int(e["seed"]) for e in summary.get("seeds", [])]
    if not seeds:
        raise UserError(f"{run_dir} has no results: its summary.json lists no seeds.")
    views = [seed_views(run_dir / f"seed_{s}") for s in seeds]
    if len({v.shape for v in views}) != 1:
        raise UserError(f"{run_dir}: the seeds' views differ in shape ({sorted({v.shape for v in views})}).")
    turntables = {s: run_dir / f"seed_{s}" / "turntable.mp4" for s in seeds
                  if (run_dir / f"seed_{s}" / "turntable.mp4").is_file()}
    method = summary.get("guidance") or summary.get("sampler", "?")  # refined by assign_methods
    return RunRecord(run_dir, summary, load_config(run_dir), method, summary.get("prompt", "?"), seeds,
                     np.stack(views), turntables)


def shard_of(record: RunRecord) -> dict | None:
    """summary.json's seed_shard of a run that is one of several shards, else None."""
    shard = record.summary.get("seed_shard")
    return shard if shard and shard.get("count", 1) > 1 else None


def merge_shards(records: list[RunRecord]) -> list[RunRecord]:
    """The shards of one sharded run (same method, prompt and full seed list: the jobs of
    `dsd-run --multirun ... seed_shard=0,1,... num_seed_shards=N`) as one record with the seeds
    of all of them, in the full list's order, so the table has the row one unsharded run gives."""
    groups: dict[tuple, list[RunRecord]] = {}
    for record in records:
        shard = shard_of(record)
        key = (id(record),) if shard is None else (record.method, record.prompt, tuple(shard["all_seeds"]),
                                                   shard["count"])
        groups.setdefault(key, []).append(record)
    return [group[0] if shard_of(group[0]) is None else merged_record(group) for group in groups.values()]


def merged_record(shards: list[RunRecord]) -> RunRecord:
    by_index: dict[int, RunRecord] = {}
    for record in shards:
        index = shard_of(record)["index"]
        if index in by_index:
            raise UserError(f"{by_index[index].run_dir} and {record.run_dir} are both shard {index} of {record.method} "
                            f"/ {record.prompt!r} with the same seeds; give the dirs of one sweep only.")
        by_index[index] = record
    first = by_index[min(by_index)]
    count, order = shard_of(first)["count"], shard_of(first)["all_seeds"]
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        from dsd.logging import console

        console.print(f"warning: {first.method} / {first.prompt}: shards {missing} of {count} are missing "
                      "(unfinished or not given); its row has the seeds of the others only.", markup=False)
    position = {seed: i for i, seed in enumerate(order)}
    entries = sorted((e for r in by_index.values() for e in r.summary["seeds"]), key=lambda e: position[e["seed"]])
    views = dict(zip((s for r in by_index.values() for s in r.seeds), (v for r in by_index.values() for v in r.views)))
    summary = {**first.summary, "seeds": entries}
    if "distinct_references" in first.summary:  # the set-level numbers, over the seeds of every shard
        summary.update(summarize_references([e["nearest_reference"] for e in entries],
                                            [e["psnr_to_reference"] for e in entries],
                                            first.summary["reach_threshold_db"]))
    seeds = [int(e["seed"]) for e in entries]
    return replace(first, summary=summary, seeds=seeds, views=np.stack([views[s] for s in seeds]),
                   turntables={s: p for r in by_index.values() for s, p in r.turntables.items()},
                   shard_dirs=[by_index[i].run_dir for i in sorted(by_index)])


# ---------------------------------------------------------------- reference samples (dsd-sample)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "prompt"


def cached_samples(cfg, prompt: str, seeds: list[int], cache: Path, device: str) -> Path:
    """dsd-sample of `prompt` for `seeds` under the run's prior (and cameras, which a camera-
    conditioned prior or a 3D representation samples on), cached in a dir keyed by exactly that."""
    from dsd import registry

    key = {"prior": asdict(cfg.prior), "prompt": prompt, "seeds": seeds, "sampler": asdict(cfg.sampler),
           "representation_3d": registry.lookup("representation", cfg.representation.name).is_3d,
           "camera": asdict(cfg.camera)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    out = cache / f"{_slug(prompt)}-{len(seeds)}-{digest}"
    if (out / "summary.json").is_file():  # sample() writes it last: the set is complete
        return out
    from dsd.sample import sample

    sample(replace(cfg, prompt=prompt, seeds=list(seeds), device=device), out)
    save_json(out / "key.json", key)
    return out


def sample_images(sample_dir: Path) -> np.ndarray:
    """(N, H, W, 3): every view of every sample (views.npz where dsd-sample wrote it, else result.npz)."""
    summary = json.loads((sample_dir / "summary.json").read_text())
    return np.concatenate([seed_views(sample_dir / f"seed_{e['seed']}") for e in summary["seeds"]])


def two_d_config(cfg):
    """The run's config with the 2D image representation: FID compares renders with 2D prior samples."""
    from dsd.representations.image import ImageConfig

    return replace(cfg, representation=ImageConfig())


# ---------------------------------------------------------------- metrics


def exact_metrics(record: RunRecord) -> dict:
    """The analytic prior's exact metrics from summary.json; {} for other priors."""
    s = record.summary
    if "distinct_references" not in s:
        return {}
    k = s.get("num_references")  # written by runs since it was added
    if k is None and record.config is not None and hasattr(record.config.prior, "num_references"):
        k = record.config.prior.num_references
    if k is None and s.get("prior") == "analytic":
        from dsd.priors.analytic import AnalyticPriorConfig

        k = AnalyticPriorConfig().num_references  # runs without .hydra/config.yaml: the default K
    out = {
        "distinct_references": s["distinct_references"],
        "reached_seeds": s["reached_seeds"],
        "median_psnr_db": s["median_psnr_to_reference"],
        "mean_psnr_db": s["mean_psnr_to_reference"],
        "reach_threshold_db": s["reach_threshold_db"],
    }
    if k:
        out["num_references"] = k
        out["coverage"] = s["distinct_references"] / k
    return out


def ode_agreement(record: RunRecord, opts: Options) -> dict:
    """Fraction of seeds whose nearest reference is that of the DDIM sample of the same seed."""
    if record.config is None or "nearest_reference" not in record.summary["seeds"][0] or record.summary.get("sampler"):
        return {}
    ddim_dir = cached_samples(record.config, record.prompt, record.seeds, opts.cache, opts.device)
    ddim = {e["seed"]: e["nearest_reference"] for e in json.loads((ddim_dir / "summary.json").read_text())["seeds"]}
    agree = [e["nearest_reference"] == ddim[e["seed"]] for e in record.summary["seeds"]]
    for entry, seed in zip(record.per_seed, record.seeds):
        entry["ddim_nearest_reference"] = ddim[seed]
    return {"ode_agreement": sum(agree) / len(agree)}


def per_view_diversity(views: np.ndarray, features: Callable[[torch.Tensor], torch.Tensor], prefix: str) -> dict:
    """Vendi score and mean pairwise cosine distance of the seeds' features, one camera at a time
    (seeds rendered from the same view are compared), averaged over the views. views: (S, V, H, W, 3)."""
    vendi, pairwise = [], []
    for v in range(views.shape[1]):
        f = features(torch.from_numpy(np.ascontiguousarray(views[:, v])).permute(0, 3, 1, 2).float())
        vendi.append(vendi_score(f))
        pairwise.append(mean_pairwise_distance(f))
    return {f"{prefix}_vendi": float(np.mean(vendi)), f"{prefix}_pairwise": float(np.mean(pairwise))}


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """Flattened pixels mapped to [-1, 1]: centred, so unrelated images are near-orthogonal rather than
    all similar through their common positive offset."""
    return (images * 2 - 1).reshape(len(images), -1)


def as_images(array: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) numpy -> (N, 3, H, W) float tensor."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float()


def _metrics_module(name: str, flag: str):
    import importlib

    try:
        return importlib.import_module(f"dsd.metrics.{name}")
    except ImportError as err:
        raise UserError(f"{flag} needs dsd.metrics.{name}, which this install cannot import ({err}).") from None


@dataclass
class Networks:
    """The weight-based metric networks the user pointed at (loaded once for all runs)."""

    clip_encoder: Any = None
    clip_scorer: Any = None
    dinov2: Any = None
    inception: Any = None
    lpips: Any = None
    # Inception features of each cached reference-sample dir: every method of a prompt shares one
    reference_features: dict = field(default_factory=dict)

    @classmethod
    def load(cls, opts: Options) -> Networks:
        nets = cls()
        if opts.metrics & {"clip_sim", "clip_diversity"}:
            features = _metrics_module("image_features", "--clip")
            if "clip_sim" in opts.metrics:
                nets.clip_scorer = features.ClipScorer.from_pretrained(opts.clip, key="--clip")
            if "clip_diversity" in opts.metrics:  # the scorer's CLIP when loaded: one copy of the model
                nets.clip_encoder = (
                    features.ImageEncoder(nets.clip_scorer.model, "clip", nets.clip_scorer.preprocess)
                    if nets.clip_scorer is not None
                    else features.ImageEncoder.from_pretrained(opts.clip, kind="clip", key="--clip"))
        if "dinov2_diversity" in opts.metrics:
            features = _metrics_module("image_features", "--dinov2")
            nets.dinov2 = features.ImageEncoder.from_pretrained(opts.dinov2, kind="dinov2", key="--dinov2")
        if "fid" in opts.metrics:
            nets.inception = _metrics_module("fid", "--inception").InceptionFeatures.from_file(opts.inception, "--inception")
        if "lpips" in opts.metrics:
            for flag in ("--lpips-backbone", "--lpips-linear"):  # name our flags, not the loader's key
                if not Path(_flag_value(opts, flag)).is_file():
                    raise UserError(f"{flag}={_flag_value(opts, flag)!r} is not a file; no weights can be downloaded "
                                    f"here: point {flag} at a local copy (see dsd-eval --help).")
            nets.lpips = _metrics_module("lpips", "--lpips-backbone").LPIPS.from_files(
                opts.lpips_backbone, opts.lpips_linear, net=opts.lpips_net, key="--lpips")
        return nets


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([fn(images[i : i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def network_metrics(record: RunRecord, nets: Networks, opts: Options) -> dict:
    out: dict = {}
    flat = record.views.reshape(-1, *record.views.shape[2:])  # (S*V, H, W, 3): every render
    if nets.clip_scorer is not None:  # in the paper's units: 100 x cosine (its Table 2)
        sims = batched(lambda x: nets.clip_scorer.similarity(x, record.prompt), as_images(flat)).reshape(
            len(record.seeds), -1) * nets.clip_scorer.PAPER_SCALE
        out["clip_sim"] = float(sims.mean())
        for entry, row in zip(record.per_seed, sims):
            entry["clip_sim"] = float(row.mean())
    if nets.clip_encoder is not None:
        out.update(per_view_diversity(record.views, nets.clip_encoder.features, "clip"))
    if nets.dinov2 is not None:
        out.update(per_view_diversity(record.views, nets.dinov2.features, "dinov2"))
    if nets.lpips is not None:
        from dsd.metrics.lpips import pairwise_lpips

        per_view = []
        for v in range(record.views.shape[1]):
            d = pairwise_lpips(lpips_input(as_images(record.views[:, v])), nets.lpips)
            i, j = torch.triu_indices(len(d), len(d), offset=1)
            per_view.append(float(d[i, j].mean()) if len(i) else 0.0)
        out["lpips_pairwise"] = float(np.mean(per_view))
    if nets.inception is not None:
        out.update(fid_metrics(record, flat, nets, opts))
    return out


def lpips_input(images: torch.Tensor) -> torch.Tensor:
    """Renders smaller than LPIPS_MIN_SIDE upsampled (bilinear) to it: AlexNet's stride-4 conv and two
    stride-2 pools leave nothing of inputs under 31 px (the analytic prior's 16-32 px renders)."""
    if min(images.shape[-2:]) >= LPIPS_MIN_SIDE:
        return images
    scale = LPIPS_MIN_SIDE / min(images.shape[-2:])
    size = (round(images.shape[-2] * scale), round(images.shape[-1] * scale))
    return torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)


def fid_metrics(record: RunRecord, renders: np.ndarray, nets: Networks, opts: Options) -> dict:
    if record.config is None:
        raise UserError(f"--inception (FID) needs the run's prior config, but {record.run_dir}/.hydra/config.yaml "
                        "is missing; FID compares with samples of that prior.")
    if len(renders) < 2:
        raise UserError(f"{record.run_dir}: FID needs at least 2 renders and this run has {len(renders)}; "
                        "run more seeds or evaluate it with --metrics exact,pixel.")
    from dsd.metrics.fid import extract_features, frechet_distance

    seeds = list(range(REFERENCE_SEED_OFFSET, REFERENCE_SEED_OFFSET + opts.fid_samples))
    ref_dir = cached_samples(two_d_config(record.config), record.prompt, seeds, opts.cache, opts.device)
    if ref_dir not in nets.reference_features:
        nets.reference_features[ref_dir] = extract_features(as_images(sample_images(ref_dir)), nets.inception)
    reference = nets.reference_features[ref_dir]
    return {"fid": frechet_distance(extract_features(as_images(renders), nets.inception), reference),
            "fid_reference_samples": len(reference), "fid_reference_dir": str(ref_dir)}


def pixel_metrics(record: RunRecord) -> dict:
    return per_view_diversity(record.views, pixel_features, "pixel")


def evaluate_run(record: RunRecord, nets: Networks, opts: Options) -> dict:
    """Fills record.metrics / record.per_seed and writes <run dir>/metrics.json."""
    record.per_seed = [{k: e[k] for k in ("seed", "nearest_reference", "psnr_to_reference", "reached") if k in e}
                       for e in record.summary["seeds"]]
    if "exact" in opts.metrics:
        record.metrics.update(exact_metrics(record))
        record.metrics.update(ode_agreement(record, opts))
    if "pixel" in opts.metrics:
        record.metrics.update(pixel_metrics(record))
    record.metrics.update(network_metrics(record, nets, opts))
    metrics_json = {
        "method": record.method,
        "prompt": record.prompt,
        "prior": record.summary.get("prior"),
        "representation": record.summary.get("representation"),
        "seeds": record.seeds,
        "views_per_seed": int(record.views.shape[1]),
        "metrics": record.metrics,
        "per_seed": record.per_seed,
    }
    if record.shard_dirs:  # each shard's dir gets the metrics of the whole (merged) run
        metrics_json["shard_dirs"] = [str(d) for d in record.shard_dirs]
    for run_dir in record.shard_dirs or [record.run_dir]:
        save_json(run_dir / "metrics.json", metrics_json)
    return record.metrics


# ---------------------------------------------------------------- the set's table


def table_rows(records: list[RunRecord]) -> tuple[list[str], list[dict]]:
    """Columns and rows: one row per run (method x prompt), sorted, then one mean row per method
    (mean over its prompts of every metric it has; `prompt` says how many)."""
    columns = [c for c in COLUMNS if any(c in r.metrics for r in records)]
    rows = [{"method": r.method, "prompt": r.prompt, "seeds": len(r.seeds), **{c: r.metrics.get(c) for c in columns}}
            for r in sorted(records, key=lambda r: (r.method, r.prompt))]
    means = []
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        mean = {"method": method, "prompt": f"mean of {len(mine)} prompt{'s' * (len(mine) != 1)}",
                "seeds": sum(r["seeds"] for r in mine), "mean_row": True}
        for c in columns:
            values = [r[c] for r in mine if r[c] is not None]
            mean[c] = float(np.mean(values)) if values else None
        means.append(mean)
    return [*KEY_COLUMNS, *columns], rows + means


def format_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def header(column: str) -> str:
    return COLUMNS.get(column, column)


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    atomic_write_bytes(path, buffer.getvalue().encode())


def write_markdown(path: Path, columns: list[str], rows: list[dict]) -> None:
    lines = ["| " + " | ".join(header(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format_value(row.get(c)) for c in columns]
        if row.get("mean_row"):
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def log_wandb(opts: Options, out: Path, columns: list[str], rows: list[dict]) -> None:
    from dsd.logging import RunLogger

    logger = RunLogger(opts.wandb_mode, out, {"runs": [str(p) for p in opts.paths], "metrics": sorted(opts.metrics)},
                       "dsd", None, out.name, name=f"dsd-eval-{out.name}", job_type="eval")
    if logger.run is not None:
        import wandb

        logger.run.log({"metrics": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])})
    logger.finish()


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="dsd-eval",
        description="Metrics of finished dsd-run/dsd-sample runs: metrics.json per run; metrics.csv, "
                    "metrics.md and report.html for the set. Weights are local paths (or hub ids already cached).",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="RUN_DIR", help="run dirs or --multirun sweep dirs")
    parser.add_argument("--out", type=Path, help="where the set's table and report go (default: the sweep dir)")
    parser.add_argument("--metrics", default="auto",
                        help=f"comma list of {', '.join(METRIC_FLAGS)}; auto: exact, pixel and every metric "
                             "whose weights are given")
    parser.add_argument("--clip", help="CLIP model dir or cached hub id (CLIP-SIM, CLIP diversity)")
    parser.add_argument("--dinov2", help="DINOv2 model dir or cached hub id (DINOv2 diversity)")
    parser.add_argument("--inception", help="pytorch-fid Inception weights file pt_inception-2015-12-05-*.pth (FID)")
    parser.add_argument("--lpips-backbone", help="torchvision AlexNet/VGG16 state dict file (LPIPS)")
    parser.add_argument("--lpips-linear", help="the lpips package's linear-layer weights file, e.g. alex.pth (LPIPS)")
    parser.add_argument("--lpips-net", default="alex", choices=("alex", "vgg"))
    parser.add_argument("--fid-samples", type=int, default=100, help="prior samples per prompt for FID (paper: 100)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"reference-sample cache (default {DEFAULT_CACHE})")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="for dsd-sample")
    parser.add_argument("--wandb-mode", default="auto", choices=("auto", "online", "offline", "disabled"))
    parser.add_argument("--inline", action="store_true", help="embed images and videos in report.html (one file)")
    parser.add_argument("--no-report", dest="report", action="store_false", help="skip report.html")
    a = parser.parse_args(argv)
    opts = Options(a.paths, a.out, set(), a.clip, a.dinov2, a.inception, a.lpips_backbone, a.lpips_linear,
                   a.lpips_net, a.fid_samples, a.cache, a.device, a.wandb_mode, a.inline, a.report)
    opts.metrics = resolve_metrics(a.metrics, opts)
    if opts.fid_samples < 2:
        raise UserError(f"--fid-samples={opts.fid_samples} must be >= 2 (a covariance needs two samples).")
    return opts


def _flag_value(opts: Options, flag: str) -> str | None:
    return getattr(opts, flag.lstrip("-").replace("-", "_"))


def resolve_metrics(spec: str, opts: Options) -> set[str]:
    """The metrics to compute; one asked for by name without its weights is a UserError naming the flag."""
    if spec == "auto":
        lpips_given = [f for f in ("--lpips-backbone", "--lpips-linear") if _flag_value(opts, f)]
        if len(lpips_given) == 1:
            other = ({"--lpips-backbone", "--lpips-linear"} - set(lpips_given)).pop()
            raise UserError(f"{lpips_given[0]} was given without {other} PATH; LPIPS needs both files.")
        return {m for m, flags in METRIC_FLAGS.items() if all(_flag_value(opts, f) for f in flags)}
    asked = {m.strip() for m in spec.split(",") if m.strip()}
    unknown = asked - set(METRIC_FLAGS)
    if unknown or not asked:
        raise UserError(f"--metrics={spec!r} is not accepted; use auto or a comma list of: {', '.join(METRIC_FLAGS)}.")
    for metric in sorted(asked):
        missing = [f for f in METRIC_FLAGS[metric] if not _flag_value(opts, f)]
        if missing:
            raise UserError(f"--metrics {metric} needs weights: give {' and '.join(f + ' PATH' for f in missing)} "
                            "(a local file/dir, or a hub id already in the Hugging Face cache).")
    return asked


def output_dir(opts: Options) -> Path:
    if opts.out is not None:
        return opts.out
    if len(opts.paths) == 1:
        return opts.paths[0]
    common = Path(os.path.commonpath([p.resolve() for p in opts.paths]))
    if common == Path(common.anchor):
        raise UserError("the run dirs share no parent dir; give --out DIR for metrics.csv/md and report.html.")
    return common


def evaluate(opts: Options) -> tuple[Path, list[RunRecord]]:
    from dsd.logging import console, make_progress

    run_dirs = [d for p in opts.paths for d in find_run_dirs(p)]
    records = [load_run(d) for d in dict.fromkeys(run_dirs)]  # a dir named twice counts once
    assign_methods(records)
    records = merge_shards(records)
    out = output_dir(opts)
    nets = Networks.load(opts)
    with make_progress() as progress:
        task = progress.add_task("dsd-eval runs", total=len(records), info="")
        for record in records:
            progress.update(task, info=f"{record.method} / {record.prompt}")
            evaluate_run(record, nets, opts)
            progress.advance(task)
    columns, rows = table_rows(records)
    write_csv(out / "metrics.csv", columns, rows)
    write_markdown(out / "metrics.md", columns, rows)
    if opts.report:
        from dsd.report import write_report

        write_report(out, records, columns, rows, inline=opts.inline)
    log_wandb(opts, out, columns, rows)
    console.print(f"[green]evaluated[/green] {len(records)} runs -> {out}/metrics.md" +
                  (", report.html" if opts.report else ""))
    return out, records


def main(argv: list[str] | None = None) -> None:
    """dsd-eval entry point: user errors are one paragraph on stderr and exit code 2 (as dsd-run)."""
    from dsd.logging import report_error

    try:
        evaluate(parse_args(argv))
    except UserError as err:
        report_error(f"error: {err}")
        sys.exit(err.exit_code)

