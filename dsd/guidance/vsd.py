"""VSD: Variational Score Distillation (ProlificDreamer, Wang et al. 2023), after threestudio's
threestudio/models/guidance/stable_diffusion_vsd_guidance.py and configs/prolificdreamer.yaml.

Every step, with fresh t ~ U[t_min, t_max] and ε from the seed's own generator:
    x_t = √ᾱ·x + √(1−ᾱ)·ε
    grad = w(t)·(ε̂_cfg^pretrained(x_t, t) − ε^φ(x_t, t, c))                    (vsd_guidance.py:540-542)
where ε^φ is a learned score of the seed's own renders, camera-conditioned (c2w flattened, 16
values, through a small MLP as threestudio's camera embedding, :152-156). After the gradient, φ
takes `phi_updates` AdamW steps on the diffusion loss ‖φ(x_t', t', c) − target‖² of the current
renders (detached) at fresh t' ~ U{0..T−1} and noise, the camera zeroed with probability 0.1
(:561-604). ε^φ uses the φ of before the update, as threestudio (one optimizer step for both).

φ per prior (only the network differs; loop, dropout and formula are shared here):
- prior=sd21: a LoRA copy of the prior's own UNet (rank 4 on to_q/to_k/to_v/to_out of every
  attention, up-projection zero-initialised, as diffusers' LoRALinearLayer used by threestudio)
  plus the camera MLP added to the time embedding (the UNet's class embedding slot).
- prior=analytic: a small conv net of x_t, a t embedding and the camera, predicting x0 as a
  learned image plus a zero-initialised correction (so φ starts as "every render is μ").

Particles (guidance.particles):
- shared (default, the authors' setting): the seeds optimized together in one seed batch
  (trainer.seed_batch) are the particles of the prompt and share ONE φ and its optimizer; each
  step φ takes its AdamW step on the mean diffusion loss over the renders of every particle
  (every row, each with its own camera, t' and noise). In the official code the particles are n
  NeRFs (thu-ml/prolificdreamer nerf/network_particle.py:51-53, --n_particles main.py:119, 4 in
  README.md:26) and one UNet φ with one optimizer is trained on the render of whichever particle
  was drawn that step (nerf/utils.py:1068, network_particle.py:75-79, utils.py:1098-1126); here
  every particle steps every step and φ sees all their renders in one step. The DSD paper runs
  VSD with this multi-particle code (diverse-score-distillation.txt:180). threestudio supports
  one particle only (README.md:295), i.e. per_seed. With shared φ a seed's result depends on the
  seeds of its batch (the one exception to the trainer's contract), so trainer.seed_batch is part
  of the method's setting; a batch of one seed (seed_batch=1, or a last short batch) has its own
  φ, exactly as per_seed, and says so in one log line. Every seed's checkpoint carries the shared
  φ and its optimizer state (identical: they step together); on resume it is loaded once, the
  copies of the seeds that step together are checked to be identical, and a seed_batch other
  than the checkpoint's is refused (UserError naming trainer.seed_batch; a smaller one only when
  the batch holding the rest of the φ's seeds loads, since a batch missing some of its seeds is
  also what remains after a seed diverged).
- per_seed: one φ per seed (and optimizer): a seed's result does not depend on its batch.

Cost per render row and step, the same for shared and per_seed φ (φ's rows of all particles go
in one call either way): pretrained 2 prior rows (conditional + unconditional, CFG), plus on sd21
2 more UNet rows through φ (one no-grad forward for ε^φ, one forward+backward to train it; both
are counted in `prior.rows_evaluated`, the backward is not), i.e. 4 rows (+1 more with
phi_cfg_scale != 1). On the analytic prior φ is a tiny net outside the prior: 2 rows.
"""

from __future__ import annotations

import abc
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from dsd.config import GuidanceConfig
from dsd.errors import UserError
from dsd.guidance.base import Guidance, GuidanceContext
from dsd.logging import console
from dsd.priors.base import (
    Condition,
    Prior,
    add_noise,
    classifier_free_guidance,
    eps_from_v,
    eps_from_x0,
    per_row,
)
from dsd.priors.procedural import text_seed
from dsd.registry import register
from dsd.schedules import loss_weight, timestep_bounds, uniform_timestep

CAMERA_DIM = 16  # c2w 4x4 flattened (threestudio: camera_condition_type "extrinsics", TimestepEmbedding(16, ·))


@dataclass
class VSDConfig(GuidanceConfig):
    name: str = "vsd"
    cfg_scale: float = 7.5  # pretrained CFG g (diffusers' definition, as vsd_guidance.py:512-515)
    phi_cfg_scale: float = 1.0  # φ's camera CFG (guidance_scale_lora, vsd_guidance.py:47); 1: camera row only
    t_min: float = 0.02  # fractions of T
    t_max: float = 0.98
    t_max_final: Optional[float] = 0.5  # t_max after `t_max_switch`·N steps; null: never switch
    t_max_switch: float = 0.2  # threestudio's [5000, 0.98, 0.5, 5001] of 25000 steps
    phi_lr: Optional[float] = None  # null: 1e-4 for the LoRA (threestudio), 1e-3 for the analytic φ
    phi_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    phi_eps: float = 1e-15
    phi_weight_decay: float = 0.01  # torch AdamW's default (threestudio passes only betas and eps)
    phi_updates: int = 1  # φ optimizer steps per optimization step
    camera_dropout: float = 0.1  # probability the camera is zeroed when training φ
    lora_rank: int = 4
    phi_hidden: int = 32  # analytic φ: conv channels
    # shared: the seeds of one seed batch are the particles and share one φ (the official code's
    # single UNet φ for all --n_particles, thu-ml/prolificdreamer nerf/utils.py:1098-1126);
    # per_seed: one φ per seed (threestudio's one particle, README.md:295)
    particles: str = "shared"


PARTICLE_MODES = ("shared", "per_seed")


def linear_init(layer: nn.Linear | nn.Conv2d, generator: torch.Generator) -> None:
    """torch's default init (U(±1/√fan_in) for weight and bias), drawn from `generator`."""
    bound = 1 / math.sqrt(layer.weight[0].numel())
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        if layer.bias is not None:
            layer.bias.uniform_(-bound, bound, generator=generator)


def camera_mlp(out_dim: int, generator: torch.Generator) -> nn.Sequential:
    """threestudio's camera embedding: Linear(16, d), SiLU, Linear(d, d) (TimestepEmbedding)."""
    mlp = nn.Sequential(nn.Linear(CAMERA_DIM, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
    linear_init(mlp[0], generator)
    linear_init(mlp[2], generator)
    return mlp


def v_target(x0: Tensor, noise: Tensor, a: Tensor) -> Tensor:
    """v = √a·ε − √(1−a)·x0, the training target of a v-prediction network (Salimans & Ho 2022)."""
    a = per_row(a, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


class LearnedScore(abc.ABC):
    """The φ network family of a prior: particles (one parameter set per seed) and their raw output."""

    prediction_type: str = "epsilon"  # or v_prediction

    @abc.abstractmethod
    def new_particle(self, generator: torch.Generator) -> nn.Module:
        """A fresh φ, its random init drawn from `generator` (on CPU)."""

    @abc.abstractmethod
    def raw(self, particles: list[nn.Module], x_t: Tensor, t: Tensor, cond: Condition, camera: Tensor) -> Tensor:
        """Raw prediction (ε or v) of row i's particle for rows x_t (B, C, H, W), t (B,), camera (B, 16)."""


class ConvScore(LearnedScore):
    """Analytic prior: x0^φ = μ + conv(x_t, emb(t), emb(camera)), ε^φ = ε from x0^φ."""

    class Particle(nn.Module):
        def __init__(self, shape: tuple[int, int, int], hidden: int, generator: torch.Generator) -> None:
            super().__init__()
            channels = shape[0]
            self.mu = nn.Parameter(torch.zeros(shape))
            self.time = nn.Linear(CAMERA_DIM, hidden)
            self.camera = camera_mlp(hidden, generator)
            self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
            self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
            self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
            for layer in (self.time, self.conv_in, self.conv_mid):
                linear_init(layer, generator)
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

        def forward(self, x_t: Tensor, t_features: Tensor, camera: Tensor) -> Tensor:
            bias = (self.time(t_features) + self.camera(camera))[:, :, None, None]
            h = nn.functional.silu(self.conv_in(x_t) + bias)
            h = nn.functional.silu(self.conv_mid(h))
            return self.mu + self.conv_out(h)

    def __init__(self, prior: Prior, hidden: int) -> None:
        self.prior, self.hidden = prior, hidden

    def new_particle(self, generator):
        return ConvScore.Particle(self.prior.sample_shape, self.hidden, generator)

    def t_features(self, t: Tensor) -> Tensor:
        """Sinusoidal features of t/T, 8 frequencies. (B, 16)"""
        s = t.double()[:, None] / self.prior.num_train_timesteps
        freqs = 2.0 ** torch.arange(CAMERA_DIM // 2, dtype=torch.float64, device=t.device) * math.pi
        return torch.cat([torch.sin(s * freqs), torch.cos(s * freqs)], dim=1)

    def raw(self, particles, x_t, t, cond, camera):
        out = torch.empty_like(x_t)
        features = self.t_features(t).to(x_t)
        for particle, rows in unique_particles(particles).items():
            index = torch.tensor(rows, device=x_t.device)
            x0 = particle(x_t[index], features[index], camera[index])
            out[index] = eps_from_x0(x_t[index], x0, self.prior.alpha(t[index].cpu()).to(x_t.device))
        return out


class LoraUNetScore(LearnedScore):
    """sd21: the prior's UNet with per-particle LoRA on its attention projections and a camera
    embedding, applied by forward hooks that act only inside `active` (the prior's own calls see
    the plain UNet). Rows of different particles run in ONE UNet call (per-row LoRA weights)."""

    class Particle(nn.Module):
        def __init__(self, shapes: list[tuple[int, int]], rank: int, embed_dim: int, generator: torch.Generator):
            super().__init__()
            self.down = nn.ParameterList()
            self.up = nn.ParameterList()
            for in_features, out_features in shapes:
                # diffusers' LoRALinearLayer (models/lora.py:217-218 in diffusers 0.42.1): down ~ N(0, 1/rank), up = 0
                self.down.append(nn.Parameter(torch.randn(rank, in_features, generator=generator) / rank))
                self.up.append(nn.Parameter(torch.zeros(out_features, rank)))
            self.camera = camera_mlp(embed_dim, generator)

    def __init__(self, prior: Prior, rank: int) -> None:
        from diffusers.models.attention_processor import Attention

        self.prior, self.rank = prior, rank
        self.prediction_type = prior.prediction_type
        unet = prior.unet
        self.layers: list[nn.Linear] = []
        for module in unet.modules():
            if isinstance(module, Attention):
                self.layers.extend([module.to_q, module.to_k, module.to_v, module.to_out[0]])
        self.embed_dim = unet.time_embedding.linear_2.out_features
        self._rows: Optional[tuple[list[nn.Module], Tensor]] = None  # (unique particles, row -> index)
        for i, layer in enumerate(self.layers):
            layer.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, args, output):
            if self._rows is None:
                return None
            particles, index = self._rows
            down = torch.stack([p.down[i] for p in particles])[index]  # (B, r, in)
            up = torch.stack([p.up[i] for p in particles])[index]  # (B, out, r)
            h = args[0].flatten(1, -2).to(down.dtype)  # (B, L, in)
            delta = torch.einsum("blr,bor->blo", torch.einsum("bli,bri->blr", h, down), up)
            return output + delta.reshape(output.shape).to(output.dtype)

        return hook

    def new_particle(self, generator):
        shapes = [(layer.in_features, layer.out_features) for layer in self.layers]
        return LoraUNetScore.Particle(shapes, self.rank, self.embed_dim, generator)

    @contextmanager
    def active(self, particles: list[nn.Module]):
        """Inside: the UNet's attention layers get each row's LoRA, its class embedding the camera."""
        unique = list(unique_particles(particles))
        index = torch.tensor([unique.index(p) for p in particles], device=self.prior.device)
        unet, saved = self.prior.unet, self.prior.unet.class_embedding
        self._rows = (unique, index)
        dtype = self.prior.dtype

        class RowCamera(nn.Module):  # each row's particle's camera MLP, in the UNet's dtype
            def forward(self, labels: Tensor) -> Tensor:
                out = torch.zeros(len(labels), unet.time_embedding.linear_2.out_features, device=labels.device)
                for i, particle in enumerate(unique):
                    rows = (index == i).nonzero().flatten()
                    out = out.index_put((rows,), particle.camera(labels[rows].float()))
                return out.to(dtype)

        unet.class_embedding = RowCamera()
        try:
            yield
        finally:
            self._rows, unet.class_embedding = None, saved

    def raw(self, particles, x_t, t, cond, camera):
        prior = self.prior
        hidden = prior.text_embeddings(cond, torch.zeros(len(x_t), dtype=torch.bool))
        with self.active(particles):
            out = prior.unet(x_t.to(prior.device, prior.dtype), t.to(prior.device), encoder_hidden_states=hidden,
                             class_labels=camera.to(prior.device)).sample
        prior.rows_evaluated += len(x_t)
        return out.to(x_t.dtype).to(x_t.device)


def unique_particles(particles: list[nn.Module]) -> dict[nn.Module, list[int]]:
    """Particle -> the rows it serves, in first-seen order."""
    rows: dict[nn.Module, list[int]] = {}
    for row, particle in enumerate(particles):
        rows.setdefault(particle, []).append(row)
    return rows


def make_learned_score(cfg: VSDConfig, prior: Prior) -> LearnedScore:
    if prior.name == "sd21":
        return LoraUNetScore(prior, cfg.lora_rank)
    if prior.name == "analytic":
        return ConvScore(prior, cfg.phi_hidden)
    raise UserError(f"guidance=vsd does not support prior={prior.name}; accepted priors: analytic, sd21.")


@register("guidance", "vsd", VSDConfig)
class VSD(Guidance):
    def __init__(self, cfg: VSDConfig, prior: Prior) -> None:
        super().__init__(cfg, prior)
        check_config(cfg)
        self.score = make_learned_score(cfg, prior)
        default_lr = 1e-4 if isinstance(self.score, LoraUNetScore) else 1e-3
        self.lr = default_lr if cfg.phi_lr is None else cfg.phi_lr
        self.particles: dict[int, nn.Module] = {}  # seed -> φ (one object for the seeds that share it)
        self.optimizers: dict[int, torch.optim.Optimizer] = {}  # seed -> φ's optimizer
        self.groups: dict[int, tuple[int, ...]] = {}  # seed -> the seeds sharing its φ (itself: per seed)
        self.pending: dict[int, dict] = {}  # seed -> its checkpointed φ, restored when it next steps
        self.said_alone = False

    # ---- particles ------------------------------------------------------------------------
    def new_group(self, group: tuple[int, ...], device: torch.device) -> nn.Module:
        """A fresh φ and optimizer for the seeds `group`; a group of one is drawn as per seed."""
        generator = torch.Generator().manual_seed(text_seed("vsd-phi:" + ",".join(str(s) for s in sorted(group))))
        phi = self.score.new_particle(generator).to(device)
        optimizer = torch.optim.AdamW(
            phi.parameters(), lr=self.lr, betas=tuple(self.cfg.phi_betas), eps=self.cfg.phi_eps,
            weight_decay=self.cfg.phi_weight_decay,
        )  # fmt: skip
        for seed in group:
            self.particles[seed], self.optimizers[seed], self.groups[seed] = phi, optimizer, group
        return phi

    def particle(self, seed: int, device: torch.device) -> nn.Module:
        """The seed's φ, a φ of its own when it has none yet."""
        if seed not in self.particles:
            self.new_group((seed,), device)
        return self.particles[seed]

    def particles_for(self, seeds: list[int], device: torch.device) -> list[nn.Module]:
        """Each row's φ for one step of the seeds `seeds` (one per row): restores checkpointed φ,
        and in shared mode gives the batch's seeds one φ."""
        batch = list(dict.fromkeys(seeds))
        self.restore(batch, device)
        if self.cfg.particles == "shared":
            self.join(batch, device)
        return [self.particle(seed, device) for seed in seeds]

    def join(self, batch: list[int], device: torch.device) -> None:
        """Shared mode: the batch's seeds get one new φ, or already share one (a subset of its
        seeds: the others finished or diverged)."""
        known = {self.groups[s] for s in batch if s in self.groups}
        if not known:
            if len(batch) == 1 and not self.said_alone:
                self.said_alone = True
                console.print(f"guidance.particles=shared: seed {batch[0]} is alone in its seed batch, so it has "
                              "a φ of its own (as per_seed); particles that share φ are the seeds of one batch "
                              "(trainer.seed_batch).", markup=False)
            self.new_group(tuple(batch), device)
        elif len(known) > 1 or any(s not in self.groups for s in batch):
            raise UserError(self.regroup_message(batch))

    def regroup_message(self, batch: list[int]) -> str:
        shared = sorted({self.groups[s] for s in batch if s in self.groups})
        return (f"guidance.particles=shared: seeds {batch} step together but their φ was shared by the seed "
                f"batches {[list(g) for g in shared]}; resume with the trainer.seed_batch the run was started "
                "with (the particles sharing φ are the seeds of one batch).")

    def state_for(self, seed: int) -> dict:
        if seed in self.pending:
            return self.pending[seed]
        if seed not in self.particles:
            return {}
        return {"seed": seed, "group": list(self.groups[seed]), "phi": self.particles[seed].state_dict(),
                "phi_optimizer": self.optimizers[seed].state_dict()}

    def load_state(self, state: dict) -> None:
        """Kept until the seed's next step (`restore`): the seeds that share a φ are checked then."""
        if "phi" in state:
            self.pending[state["seed"]] = state

    def restore(self, batch: list[int], device: torch.device) -> None:
        """Load the checkpointed φ of the batch's seeds, once per shared φ, after checking that the
        copies of the seeds stepping together are identical (they were saved at the same step)."""
        by_group: dict[tuple[int, ...], list[int]] = {}
        for seed in batch:
            if seed in self.pending:
                by_group.setdefault(tuple(self.pending[seed].get("group", [seed])), []).append(seed)
        for group, seeds in by_group.items():
            if len(group) > 1 and self.cfg.particles == "per_seed":
                raise UserError(f"seed {seeds[0]}'s checkpoint holds a φ shared by seeds {list(group)} "
                                "(guidance.particles=shared); resume with guidance.particles=shared.")
            if any(s in self.groups for s in group):
                raise UserError(self.regroup_message(batch))
            first = self.pending[seeds[0]]
            for seed in seeds[1:]:
                if not same_state(first, self.pending[seed], skip=("seed",)):
                    raise UserError(f"the checkpoints of seeds {seeds[0]} and {seed} hold different copies of their "
                                    "shared φ (guidance.particles=shared): they were not saved at the same step. "
                                    "Restart these seeds (delete their seed_<s> directories) or resume each from "
                                    "a checkpoint of the same step.")
            phi = self.new_group(group, device)
            phi.load_state_dict(first["phi"])
            self.optimizers[seeds[0]].load_state_dict(first["phi_optimizer"])
            for seed in group:
                self.pending.pop(seed, None)

    # ---- the method ---------------------------------------------------------------------------
    def t_range(self, ctx: GuidanceContext) -> tuple[int, int]:
        cfg, hi = self.cfg, self.cfg.t_max
        if cfg.t_max_final is not None and ctx.step >= cfg.t_max_switch * ctx.steps:
            hi = cfg.t_max_final
        return timestep_bounds(self.prior.num_train_timesteps, cfg.t_min, hi)

    def eps_phi(self, particles, x_t: Tensor, t: Tensor, cond: Condition, camera: Tensor) -> Tensor:
        """ε^φ with camera CFG (the zero camera is φ's unconditional); one call per branch needed."""
        scale = self.cfg.phi_cfg_scale
        if scale != 1:
            batch = len(x_t)
            raw = self.score.raw(particles * 2, torch.cat([x_t, x_t]), torch.cat([t, t]), cond.cat([cond, cond]),
                                 torch.cat([camera, torch.zeros_like(camera)]))
            eps = self.to_eps(raw, x_t.repeat(2, 1, 1, 1), torch.cat([t, t]))
            return classifier_free_guidance(eps[batch:], eps[:batch], torch.full((batch,), scale))
        return self.to_eps(self.score.raw(particles, x_t, t, cond, camera), x_t, t)

    def to_eps(self, raw: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        if self.score.prediction_type == "v_prediction":
            return eps_from_v(x_t, raw, self.prior.alpha(t.cpu()).to(x_t.device))
        return raw

    def grad(self, x, ctx: GuidanceContext):
        particles = self.particles_for(ctx.seeds, x.device)
        camera = camera_rows(ctx, x)
        t_min, t_max = self.t_range(ctx)
        t = ctx.per_sample(lambda g: uniform_timestep(g, t_min, t_max)).to(x.device)
        noise = ctx.randn_like_rows(x)
        a = self.prior.alpha(t)
        x_t = add_noise(x, noise, a)
        eps_pretrained = self.prior.eps(x_t, t, ctx.cond, self.cfg.cfg_scale)
        with torch.no_grad():
            eps_learned = self.eps_phi(particles, x_t, t, ctx.cond, camera)
        grad = per_row(loss_weight(a), x) * (eps_pretrained - eps_learned)
        phi_loss = [self.train_phi(particles, x.detach(), ctx, camera) for _ in range(self.cfg.phi_updates)]
        return grad, {"t": float(t.float().mean()), "phi_loss": phi_loss[-1] if phi_loss else float("nan")}

    def phi_loss(self, particles, x0: Tensor, t: Tensor, noise: Tensor, cond: Condition, camera: Tensor) -> Tensor:
        """Σ over particles of the mean diffusion loss of its rows (threestudio's mse_loss per batch)."""
        a = self.prior.alpha(t.cpu()).to(x0.device)
        target = noise if self.score.prediction_type == "epsilon" else v_target(x0, noise, a)
        raw = self.score.raw(particles, add_noise(x0, noise, a), t, cond, camera)
        errors = ((raw.float() - target.float()) ** 2).flatten(1).mean(1)
        return sum(errors[rows].mean() for rows in unique_particles(particles).values())

    def train_phi(self, particles, x0: Tensor, ctx: GuidanceContext, camera: Tensor) -> float:
        """One AdamW step of every particle on its rows, fresh t' ∈ {0..T−1} and noise (vsd_guidance.py:570-579)."""
        T = self.prior.num_train_timesteps
        t = ctx.per_sample(lambda g: torch.randint(0, T, (), generator=g)).to(x0.device)
        noise = ctx.randn_like_rows(x0)
        dropped = ctx.rand_rows() < self.cfg.camera_dropout
        camera = torch.where(dropped.to(x0.device)[:, None], torch.zeros_like(camera), camera)
        unique = unique_particles(particles)
        for particle in unique:
            particle.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self.phi_loss(particles, x0, t, noise, ctx.cond, camera)
            loss.backward()
        optimizers = {id(p): self.optimizers[s] for s, p in self.particles.items()}
        for particle in unique:
            optimizers[id(particle)].step()
        return float(loss.detach()) / len(unique)


def same_state(a, b, skip: tuple[str, ...] = ()) -> bool:
    """Two checkpointed states (nested dicts/lists of tensors and numbers) are bitwise equal."""
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(same_state(a[k], b[k]) for k in a if k not in skip))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def camera_rows(ctx: GuidanceContext, like: Tensor) -> Tensor:
    """Each row's c2w flattened (B, 16) in 3D; zeros (the "no camera" input) in 2D."""
    if ctx.cameras is None:
        return torch.zeros(len(ctx.seeds), CAMERA_DIM, dtype=like.dtype, device=like.device)
    return ctx.cameras.c2w.reshape(len(ctx.cameras), CAMERA_DIM).to(like)


def check_config(cfg: VSDConfig) -> None:
    for lo, hi in ((cfg.t_min, cfg.t_max), (cfg.t_min, cfg.t_max_final)):
        if hi is not None and not 0 <= lo <= hi < 1:
            raise UserError(f"guidance t range [{lo}, {hi}] (guidance.t_min, guidance.t_max/t_max_final) is not "
                            "accepted: need 0 <= t_min <= t_max < 1.")
    if not 0 <= cfg.camera_dropout <= 1:
        raise UserError(f"guidance.camera_dropout={cfg.camera_dropout} is not accepted; use a probability in [0, 1].")
    if cfg.phi_updates < 0 or cfg.lora_rank < 1 or cfg.phi_hidden < 1:
        raise UserError(f"guidance.phi_updates={cfg.phi_updates}, lora_rank={cfg.lora_rank}, phi_hidden="
                        f"{cfg.phi_hidden}: need phi_updates >= 0, lora_rank >= 1, phi_hidden >= 1.")
    if cfg.phi_lr is not None and cfg.phi_lr <= 0 or len(cfg.phi_betas) != 2:
        raise UserError(f"guidance.phi_lr={cfg.phi_lr} must be > 0 (or null) and guidance.phi_betas="
                        f"{list(cfg.phi_betas)} two numbers.")
    if cfg.particles not in PARTICLE_MODES:
        raise UserError(f"guidance.particles={cfg.particles!r} is not accepted; use one of {', '.join(PARTICLE_MODES)}.")
    if not 0 <= cfg.t_max_switch <= 1:
        raise UserError(f"guidance.t_max_switch={cfg.t_max_switch} is not accepted; use a fraction in [0, 1].")
