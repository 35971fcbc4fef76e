"""
Riemannian flow matching on a product of spheres (DINO-SAE paper §3.4 and App. A).

A latent is a tensor [B, C, h, w] (any trailing token layout [B, C, ...] works): every token, i.e. every spatial
position, is one point on the sphere S_R^{C-1} = {||x|| = R}, and all norms and inner products run over dim=1
(channels). Tokens never interact in a geometric operation (Eq. 11: the manifold is a product of spheres).

Time convention: t = 0 is data, t = 1 is noise, as in the paper's samplers (App. A, Alg. 1-2); the paper's Eq. 12-15
use the opposite convention, so they are read here with x0 = data and x1 = noise (see README, "Where this code differs
from the paper"). Training draws t from a shifted logit-normal; samplers integrate t from 1 down to 0 on a grid warped
by the same shift. The network predicts u_t = dx_t/dt, which points from data towards noise, so samplers step with
dt < 0.

Contents, top to bottom: sphere geometry (projection, exp/log maps), the geodesic path and its velocity (Eq. 12-13,
15), the time distribution, the loss (Eq. 14; a projected-output ablation behind `tangent=True` and the Euclidean
flow-matching baseline behind `euclidean=True`), the samplers (Alg. 1 Rodrigues, Alg. 2 Euler with projection, plain
Euler for the baseline), classifier-free guidance, and a toy study of the paper's claim that RFM converges faster than
Euclidean FM (`python rfm.py`).
"""
import argparse
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------------------
# Sphere geometry (per token, channels on dim=1)
# ---------------------------------------------------------------------------------------------------------------------

def _dot(a, b):
    return (a * b).sum(dim=1, keepdim=True)


def _sinc(x):
    # sin(x)/x, equal to 1 at x = 0; keeps exp maps division-free.
    return torch.sinc(x / math.pi)


def _check_latent(x, name):
    if x.dim() < 2:
        raise ValueError(f"{name} must be [B, C, ...] with channels on dim 1, got shape {tuple(x.shape)}")


def project_sphere(x, radius):
    """R * x / ||x|| per token: the nearest point on the sphere."""
    return radius * F.normalize(x, dim=1)


def project_tangent(x, v, radius):
    """P_x v = v - <v, x> x / R^2 per token: the part of v tangent to the sphere at x."""
    return v - _dot(v, x) / radius ** 2 * x


def sample_noise(shape, radius, generator=None, device=None, dtype=None):
    """Uniform noise on the sphere: R * eps / ||eps|| per token, eps ~ N(0, I)."""
    if len(shape) < 2:
        raise ValueError(f"shape must be [B, C, ...] with channels on dim 1, got {tuple(shape)}")
    eps = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return project_sphere(eps, radius)


def exp_map(x, v, radius):
    """Point reached from x by walking along the great circle in tangent direction v for length ||v||.

    exp_x(v) = cos(theta) x + R sin(theta) v/||v|| with theta = ||v||/R, written as cos(theta) x + sinc(theta) v so
    that v = 0 returns x exactly.
    """
    theta = v.norm(dim=1, keepdim=True) / radius
    return torch.cos(theta) * x + _sinc(theta) * v


def log_map(x, y, radius, generator=None):
    """Tangent vector at x pointing along the shortest geodesic to y, of length R * angle(x, y) (inverse of exp_map).

    The angle comes from atan2(sine, cosine), not acos (coarse near 0 and NaN for identical points in float32).
    For (nearly) antipodal pairs every direction is a shortest geodesic: a random tangent direction is used.
    """
    cos = _dot(x, y) / radius ** 2
    # Projecting twice removes the radial rounding error left by the cancellation in y - cos x near y = +-x.
    w = project_tangent(x, project_tangent(x, y, radius), radius)
    w_norm = w.norm(dim=1, keepdim=True)
    angle = torch.atan2(w_norm / radius, cos)
    antipodal = (w_norm <= 100 * torch.finfo(x.dtype).eps * radius) & (cos < 0)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = torch.where(antipodal, F.normalize(project_tangent(x, eps, radius), dim=1), F.normalize(w, dim=1))
    return radius * angle * direction


# ---------------------------------------------------------------------------------------------------------------------
# Probability paths (Eq. 12-13 and 15; the linear path of the Euclidean baseline)
# ---------------------------------------------------------------------------------------------------------------------

def _check_path_inputs(x_data, x_noise, t):
    _check_latent(x_data, "x_data")
    if x_noise.shape != x_data.shape:
        raise ValueError(f"x_noise shape {tuple(x_noise.shape)} differs from x_data shape {tuple(x_data.shape)}")
    if t.shape != (x_data.shape[0],):
        raise ValueError(f"t must have shape [B] = [{x_data.shape[0]}], got {tuple(t.shape)}")


def _per_sample(t, x):
    """[B] -> [B, 1, ...] broadcasting against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def geodesic_path(x_data, x_noise, t, radius, generator=None):
    """Point x_t on the great circle from x_data (t = 0) to x_noise (t = 1) and its velocity u_t = dx_t/dt.

    Eq. 12-13: x_t = [sin((1-t)W) x0 + sin(tW) x1] / sin W with W = angle(x0, x1), x0 = data, x1 = noise.
    Eq. 15:    u_t = W / sin W (cos(tW) x1 - cos((1-t)W) x0), tangent at x_t with ||u_t|| = R W.
    Both are evaluated in the equivalent exp-map form x_t = exp_{x0}(t m), m = log_{x0}(x1), which has no division by
    sin W: it becomes the straight line x0 + t (x1 - x0) as W -> 0 and stays finite for antipodal pairs.
    """
    _check_path_inputs(x_data, x_noise, t)
    t = _per_sample(t.to(x_data.dtype), x_data)
    m = log_map(x_data, x_noise, radius, generator)
    angle = m.norm(dim=1, keepdim=True) / radius
    x_t = exp_map(x_data, t * m, radius)  # Eq. 12-13
    # u_t is m transported to x_t: cos(tW) m - W sin(tW) x0, written with sinc so that W -> 0 gives u_t -> m.
    u_t = torch.cos(t * angle) * m - t * angle ** 2 * _sinc(t * angle) * x_data  # Eq. 15
    return x_t, u_t


def linear_path(x_data, x_noise, t):
    """Euclidean flow-matching path x_t = (1-t) x_data + t x_noise and its velocity x_noise - x_data."""
    _check_path_inputs(x_data, x_noise, t)
    t = _per_sample(t.to(x_data.dtype), x_data)
    return (1 - t) * x_data + t * x_noise, x_noise - x_data


# ---------------------------------------------------------------------------------------------------------------------
# Time distribution (RAE): logit-normal, shifted towards noise by the resolution-dependent map
# ---------------------------------------------------------------------------------------------------------------------

def time_shift(t, alpha):
    """t -> alpha t / (1 + (alpha - 1) t): fixes 0 and 1, moves mass towards noise (t = 1) for alpha > 1."""
    return alpha * t / (1 + (alpha - 1) * t)


def shift_alpha(num_tokens, channels):
    """Shift sqrt(N C / 4096) (RAE): 8.0 for 256 tokens x 1024 channels."""
    return math.sqrt(num_tokens * channels / 4096)


def sample_time(n, alpha, generator=None, device=None):
    """Training times: t ~ logit-normal(0, 1), then shifted."""
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    t = torch.randn(n, generator=generator, device=device).sigmoid()
    return time_shift(t, alpha)


def time_grid(steps, alpha):
    """steps + 1 sampling times from 1 (noise) down to 0 (data), uniform then warped by the training shift."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    return time_shift(torch.linspace(1, 0, steps + 1, dtype=torch.float64), alpha)


# ---------------------------------------------------------------------------------------------------------------------
# Loss (Eq. 14)
# ---------------------------------------------------------------------------------------------------------------------

def flow_matching_loss(model, x_data, x_noise, t, y, radius, *, euclidean=False, tangent=False):
    """Flow-matching loss for given noise and times; model(x_t, t, y) predicts the velocity dx_t/dt.

    Riemannian (default): geodesic path from x_data to x_noise (points of the spheres) and Eq. 14 as written,
    E||v - u_t||^2 on the raw network output v, taken as the per-element mean of (v - u_t)^2 (mean over tokens of
    ||v - u_t||^2 / C, RAE's scale, which gradient clipping at 1.0 assumes). The network is thus also taught to keep its
    output tangent. tangent=True is an ablation: it regresses P_{x_t} v, blind to the radial part that the samplers
    discard anyway. euclidean=True is the ablation baseline: Gaussian noise, straight path, target x_noise - x_data.
    """
    _check_latent(x_data, "x_data")
    if euclidean and tangent:
        raise ValueError("tangent=True projects onto the sphere's tangent spaces; the Euclidean baseline has no sphere")
    # The path needs at least float32 (bf16 latents would blur angles near 0 and pi).
    dtype = torch.promote_types(x_data.dtype, torch.float32)
    x_data, x_noise, t = x_data.to(dtype), x_noise.to(dtype), t.to(dtype)
    if euclidean:
        x_t, target = linear_path(x_data, x_noise, t)
    else:
        x_t, target = geodesic_path(x_data, x_noise, t, radius)
    v = model(x_t, t, y)
    if tangent:
        v = project_tangent(x_t, v, radius)
    return ((v - target) ** 2).mean()  # Eq. 14


def rfm_loss(model, x_data, y, radius, alpha, *, euclidean=False, tangent=False, generator=None):
    """flow_matching_loss with t ~ shifted logit-normal and noise uniform on the spheres (Gaussian for euclidean=True)
    drawn from `generator` (the trainer draws them per sample instead: train_dit.draw_time_and_noise)."""
    dtype = torch.promote_types(x_data.dtype, torch.float32)
    t = sample_time(x_data.shape[0], alpha, generator, x_data.device)
    if euclidean:
        x_noise = torch.randn(x_data.shape, generator=generator, device=x_data.device, dtype=dtype)
    else:
        x_noise = sample_noise(x_data.shape, radius, generator, x_data.device, dtype)
    return flow_matching_loss(model, x_data, x_noise, t, y, radius, euclidean=euclidean, tangent=tangent)


# ---------------------------------------------------------------------------------------------------------------------
# Samplers (App. A): velocity_fn(x, t) with t a [B] tensor; t runs from 1 (noise) to 0 (data)
# ---------------------------------------------------------------------------------------------------------------------

def _time_steps(x, steps, alpha):
    ts = time_grid(steps, alpha).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        yield x.new_full((x.shape[0],), t), t_next - t


@torch.no_grad()
def sample_euler_proj(velocity_fn, x_noise, radius, alpha, steps=50):
    """Alg. 2 (corrected): v_tan = P_x v; x <- x + dt v_tan; x <- R x/||x||.

    The paper's last line renormalises v_tan instead of x, a typo. Error with the exact velocity is O(1/steps^2).
    """
    _check_latent(x_noise, "x_noise")
    x = x_noise
    for t, dt in _time_steps(x, steps, alpha):
        v = project_tangent(x, velocity_fn(x, t), radius)
        x = project_sphere(x + dt * v, radius)  # Alg. 2
    return x


@torch.no_grad()
def sample_rodrigues(velocity_fn, x_noise, radius, alpha, steps=50):
    """Alg. 1: rotate x along the great circle of v_tan by theta = ||v_tan|| |dt| / R, i.e. x <- exp_x(dt v_tan).

    exp_map's sinc form is the division-free Rodrigues update (v_tan = 0 leaves x unchanged); exact on geodesics.
    """
    _check_latent(x_noise, "x_noise")
    x = x_noise
    for t, dt in _time_steps(x, steps, alpha):
        v = project_tangent(x, velocity_fn(x, t), radius)
        x = exp_map(x, dt * v, radius)  # Alg. 1
    return x


@torch.no_grad()
def sample_euler(velocity_fn, x_noise, alpha, steps=50):
    """Plain Euler for the Euclidean baseline: x <- x + dt v."""
    _check_latent(x_noise, "x_noise")
    x = x_noise
    for t, dt in _time_steps(x, steps, alpha):
        x = x + dt * velocity_fn(x, t)
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------------------------------

def guided_velocity(model, y, scale, radius, interval=(0.0, 1.0), null_class=1000):
    """velocity_fn(x, t) for the samplers: v = v_u + scale (v_c - v_u) where interval[0] <= t <= interval[1].

    Guidance acts on all channels (DiT/LightningDiT guide only the first 3, a known bug); outside the interval the
    conditional velocity is used. Both branches run as one batched forward of [cond; uncond]. The result is
    projected to the tangent space; radius=None skips the projection (Euclidean baseline).
    """
    t_lo, t_hi = interval
    if not 0 <= t_lo <= t_hi <= 1:
        raise ValueError(f"interval must satisfy 0 <= t_lo <= t_hi <= 1, got {interval}")

    def velocity_fn(x, t):
        inside = (t >= t_lo) & (t <= t_hi)
        if scale == 1 or not inside.any():
            v = model(x, t, y)
        else:
            y_null = torch.full_like(y, null_class)
            v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null])).chunk(2)
            v = torch.where(_per_sample(inside, v_c), v_u + scale * (v_c - v_u), v_c)
        return v if radius is None else project_tangent(x, v, radius)

    return velocity_fn


# ---------------------------------------------------------------------------------------------------------------------
# Toy check of the convergence claim (abstract): 4 tokens on S^15 (R = 4), mixture of 8 classes, RFM vs Euclidean FM
# ---------------------------------------------------------------------------------------------------------------------

class ToyMLP(nn.Module):
    """Velocity MLP for [B, C, T] token sets: 3 hidden layers of 256, SiLU, Fourier time features; ignores y."""

    def __init__(self, channels, tokens, width=256, frequencies=6):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(frequencies), persistent=False)
        dim = channels * tokens
        self.net = nn.Sequential(
            nn.Linear(dim + 1 + 2 * frequencies, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, dim),
        )

    def forward(self, x, t, y=None):
        angles = t[:, None] * self.freqs
        h = torch.cat([x.flatten(1), t[:, None], angles.sin(), angles.cos()], dim=1)
        return self.net(h).view_as(x)


def toy_data(n, centers, radius, generator):
    """token_i = R normalize(mu_{c,i} + 0.15 eps) for a uniformly drawn class c; centers [classes, C, T]."""
    c = torch.randint(centers.shape[0], (n,), generator=generator)
    return project_sphere(centers[c] + 0.15 * torch.randn(n, *centers.shape[1:], generator=generator), radius)


def mmd2(x, y, bandwidths=(0.5, 1.0, 2.0)):
    """Unbiased MMD^2 with a sum of Gaussian kernels on flattened samples."""
    x, y = x.flatten(1).double(), y.flatten(1).double()

    def kernel(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * s ** 2)) for s in bandwidths)

    n, m = len(x), len(y)
    kxx, kyy = kernel(x, x), kernel(y, y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return (xx + yy - 2 * kernel(x, y).mean()).item()


def toy_samples(model, method, n, channels, tokens, radius, alpha, sample_steps, generator):
    """Euler with projection from uniform noise on the sphere for "rfm", plain Euler from N(0, I) for "fm"."""
    if method == "fm":
        return sample_euler(model, torch.randn(n, channels, tokens, generator=generator), alpha, sample_steps)
    return sample_euler_proj(model, sample_noise((n, channels, tokens), radius, generator), radius, alpha, sample_steps)


def off_sphere(x, radius):
    """Mean relative distance of the tokens of x to the sphere, |(||x|| / R) - 1|."""
    return (x.norm(dim=1) / radius - 1).abs().mean().item()


def toy_study(seeds=(0, 1, 2), steps=500, eval_every=100, batch=512, num_eval=2000, sample_steps=32,
              channels=16, tokens=4, radius=4.0, classes=8, alpha=1.0, tangent=False):
    """Train the toy MLP by RFM and by Euclidean FM per seed, from the same initial weights and data stream.

    Returns {method: {step: [MMD^2 per seed]}} and {method: [off_sphere of the final samples per seed]}. MMD^2 compares
    num_eval samples (sample_steps Euler steps) with as many held-out points, on unit tokens (x / R). alpha = 1:
    RAE's shift formula targets large latents and would give 0.125 here. tangent=True trains RFM with the projected
    loss (the rfm_loss ablation).
    """
    curves = {"rfm": {}, "fm": {}}
    final_off_sphere = {"rfm": [], "fm": []}
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        centers = F.normalize(torch.randn(classes, channels, tokens, generator=g), dim=1)
        held_out = toy_data(num_eval, centers, radius, g)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the caller's RNG
            torch.manual_seed(seed)
            init = ToyMLP(channels, tokens)
        for method in ("rfm", "fm"):
            model = copy.deepcopy(init)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            g_train = torch.Generator().manual_seed(seed + 1000)
            for step in range(1, steps + 1):
                loss = rfm_loss(model, toy_data(batch, centers, radius, g_train), None, radius, alpha,
                                euclidean=method == "fm", tangent=tangent and method == "rfm", generator=g_train)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step % eval_every == 0 or step == steps:
                    samples = toy_samples(model, method, num_eval, channels, tokens, radius, alpha, sample_steps,
                                          torch.Generator().manual_seed(seed + 2000))
                    curves[method].setdefault(step, []).append(mmd2(samples / radius, held_out / radius))
            final_off_sphere[method].append(off_sphere(samples, radius))
    return curves, final_off_sphere


def main():
    parser = argparse.ArgumentParser(description="Toy check of the paper's convergence claim (abstract): Riemannian "
                                                 "vs Euclidean flow matching on 4 tokens on S^15.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500, help="training steps per run")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--sample-steps", type=int, default=32)
    parser.add_argument("--tangent-loss", action="store_true",
                        help="train RFM on the tangent projection of the output (ablation; default: Eq. 14 as written)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads: the toy MLP is too small to gain from more, and a busy CPU slows them")
    args = parser.parse_args()
    if min(args.steps, args.eval_every, args.sample_steps, args.threads) < 1:
        parser.error("--steps, --eval-every, --sample-steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)

    curves, final_off_sphere = toy_study(args.seeds, args.steps, args.eval_every, sample_steps=args.sample_steps,
                                         tangent=args.tangent_loss)
    print(f"MMD^2 vs held-out data, mean over seeds {args.seeds} (per-seed values in brackets)")
    print(f"{'step':>6} {'RFM':>10} {'FM':>10} {'RFM/FM':>8}")
    for step in curves["rfm"]:
        rfm, fm = curves["rfm"][step], curves["fm"][step]
        mean_rfm, mean_fm = sum(rfm) / len(rfm), sum(fm) / len(fm)
        print(f"{step:>6} {mean_rfm:>10.5f} {mean_fm:>10.5f} {mean_rfm / mean_fm:>8.3f}   "
              f"[{', '.join(f'{v:.4f}' for v in rfm)}] [{', '.join(f'{v:.4f}' for v in fm)}]")
    for method, name in (("rfm", "RFM"), ("fm", "FM")):
        values = final_off_sphere[method]
        print(f"{name} samples off the sphere: mean | ||x||/R - 1 | = {sum(values) / len(values):.3g}")


if __name__ == "__main__":
    main()

