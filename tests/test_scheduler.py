"""Our noise schedule and DDIM sampler against diffusers' own DDIMScheduler (an independent
implementation), on the tiny Stable Diffusion of tests/tiny_sd.py."""

import pytest
import torch
from tiny_sd import with_scheduler  # noqa: E402  (tests/ is on sys.path, see conftest.py)

from dsd.errors import UserError
from dsd.ode import OdeTrajectories, ddim_sample, ddim_timesteps
from dsd.priors.stable_diffusion import StableDiffusionConfig, StableDiffusionPrior, alphas_cumprod_from

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SCHEDULES = [
    {},  # diffusers' defaults: linear 1e-4 -> 0.02, T = 1000
    SD,
    {"beta_schedule": "linear", "beta_start": 0.0002, "beta_end": 0.03, "num_train_timesteps": 500},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": torch.linspace(1e-3, 0.02, 1000).tolist()},
]


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("config", SCHEDULES)
def test_alphas_cumprod_match_diffusers(config, zero_snr):
    from diffusers import DDIMScheduler

    config = {**config, "rescale_betas_zero_snr": zero_snr}
    ours = alphas_cumprod_from(config)
    theirs = DDIMScheduler(**config).alphas_cumprod.double()  # diffusers builds them in float32
    assert ours.dtype == torch.float64 and ours.shape == theirs.shape
    if zero_snr:  # diffusers' DDIM keeps ᾱ(T−1) = 0; ours is clamped (see the next test)
        assert float(theirs[-1]) == pytest.approx(0.0, abs=1e-9) and float(ours[-1]) == 2.0**-24
        ours, theirs = ours[:-1], theirs[:-1]
    # float32 rounding of diffusers' cumprod over T steps is ~1e-6 relative; an off-by-one index
    # or a wrong schedule is > 1e-3.
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize(
    "field, value",
    [("beta_schedule", "sigmoid"), ("variance_type", "learned_range"), ("timestep_type", "continuous"),
     ("rescale_betas_zero_snr", "yes")],
)
def test_unsupported_scheduler_fields_are_refused(field, value):
    with pytest.raises(UserError, match=f"{field}={value!r} is not"):
        alphas_cumprod_from({**SD, field: value})


def test_trained_betas_must_cover_every_timestep():
    with pytest.raises(UserError, match="trained_betas has 10 values but num_train_timesteps=1000"):
        alphas_cumprod_from({"trained_betas": [0.01] * 10})


def test_loading_refuses_an_unsupported_schedule_naming_the_checkpoint(tiny_sd, tmp_path):
    path = with_scheduler(tiny_sd, tmp_path / "sd", beta_schedule="sigmoid")
    with pytest.raises(UserError, match=f"prior.pretrained={path} scheduler: beta_schedule='sigmoid'"):
        StableDiffusionPrior(StableDiffusionConfig(pretrained=str(path)))


def test_zero_terminal_snr_ode_from_the_last_timestep_is_finite(tiny_sd, tmp_path):
    """With ᾱ(T−1) = 0, x0 = (x − √(1−ᾱ)·ε)/√ᾱ at the first grid point g_0 = T−1 would be 0/0
    (v-prediction gives ε = x there exactly) and σ(T−1) infinite; ᾱ(T−1) is clamped to 2⁻²⁴."""
    path = with_scheduler(tiny_sd, tmp_path / "sd", prediction_type="v_prediction", rescale_betas_zero_snr=True)
    prior = StableDiffusionPrior(StableDiffusionConfig(pretrained=str(path)))
    assert prior.alphas_cumprod[-1] == 2.0**-24 and prior.alphas_cumprod[-2] > 2.0**-24
    eps_star = torch.randn(2, *prior.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = prior.condition("a teapot", batch=2)
    ode = OdeTrajectories(prior, 4, 7.5)
    x0 = ode.x0_at([0, 1], eps_star, cond, torch.tensor([0, 4]))  # at T−1 and at the end
    assert torch.isfinite(x0).all() and x0.abs().max() < 1e3


# ---- DDIM sampling against diffusers --------------------------------------------------------


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def prior64(request, tiny_sd, tmp_path_factory):
    """The tiny SD, epsilon or v-prediction (same random UNet, read as v), with its UNet in float64
    so the comparison is limited only by diffusers' float32 ᾱ."""
    path = with_scheduler(tiny_sd, tmp_path_factory.mktemp("sd"), prediction_type=request.param)
    prior = StableDiffusionPrior(StableDiffusionConfig(pretrained=str(path)))
    prior.unet.double()
    prior.dtype = torch.float64  # predict_eps casts its inputs to this
    return prior, path


def diffusers_ddim(prior, path, eps_star, prompt, steps, g):
    """DDIM by diffusers' DDIMScheduler from the checkpoint's own scheduler config, CFG written out
    from raw UNet calls. Returns the states x(t) before each step, the state after the last one,
    and the final clean prediction.

    Same math as dsd.ode's grid linspace(T−1, 0, n+1) (the official DSD grid): "trailing" spacing
    gives timesteps T−1, T−1−T/n, …, T/n − 1, and diffusers steps each one to t − T//n, i.e. to the
    next grid point — for n dividing T, exactly our grid (asserted below). The last step goes
    to t − T//n < 0, where diffusers uses final_alpha_cumprod = ᾱ(0) with set_alpha_to_one=False:
    our last grid point 0. Our output is x0 at that point (one more UNet call at t = 0), which is
    diffusers' pred_original_sample of one more step from t = 0. eta = 0: the deterministic ODE.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_pretrained(
        path, subfolder="scheduler", timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False
    )
    scheduler.set_timesteps(steps)
    ids = prior.tokenizer([prompt, ""], padding="max_length", max_length=prior.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        cond, uncond = prior.text_encoder(ids)[0].double()
    batch = len(eps_star)

    def guided(x, t):  # ε or v alike: CFG is linear in the output, so it commutes with v -> ε
        with torch.no_grad():
            out_c = prior.unet(x, t, encoder_hidden_states=cond.expand(batch, -1, -1)).sample
            out_u = prior.unet(x, t, encoder_hidden_states=uncond.expand(batch, -1, -1)).sample
        return out_u + g * (out_c - out_u)

    x, states = eps_star.clone(), []
    for t in scheduler.timesteps:
        states.append(x)
        x = scheduler.step(guided(x, t), t, x, eta=0.0).prev_sample
    states.append(x)
    last = torch.tensor(0)
    x0 = scheduler.step(guided(x, last), last, x, eta=0.0).pred_original_sample
    return scheduler.timesteps, states, x0


@pytest.mark.parametrize("steps", [4, 10])
def test_ddim_matches_diffusers_ddim_scheduler(prior64, steps):
    prior, path = prior64
    g = 7.5
    eps_star = torch.randn(2, *prior.sample_shape, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    timesteps, states, x0 = diffusers_ddim(prior, path, eps_star, "a teapot", steps, g)
    assert timesteps.tolist() == ddim_timesteps(prior.num_train_timesteps, steps)[:-1].tolist()

    cond = prior.condition("a teapot", batch=2)
    ours = ddim_sample(prior, eps_star, cond, steps, g)
    assert ours.dtype == torch.float64
    # Limited by diffusers' float32 ᾱ (~1e-7 relative, amplified up to 1/√ᾱ(T−1) ≈ 15 in x0);
    # a wrong ᾱ index or CFG form is off by > 1e-3.
    torch.testing.assert_close(ours, x0, rtol=1e-5, atol=1e-5)
    ode = OdeTrajectories(prior, steps, g)
    for j, state in enumerate(states):
        x_j, _ = ode.state_at([0, 1], eps_star, cond, torch.tensor([j, j]))
        torch.testing.assert_close(x_j, state, rtol=1e-5, atol=1e-5)
