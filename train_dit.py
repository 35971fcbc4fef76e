"""Train a diffusion transformer on DINO-SAE latents by Riemannian flow matching (paper §3.4 and §4.2).

  latents     the frozen DINO-SAE encoder maps each (randomly flipped) image online to N tokens x = R·z_S/‖z_S‖ on
              S_R^{C-1}, R = √C (Eq. 11)
  objective   Eq. 14: geodesic path from data (t = 0) to uniform noise on the sphere (t = 1, README: time convention),
              the network output regressed on the path's velocity u_t; t logit-normal, shifted by √(N·C/4096);
              `--tangent-loss` regresses its tangent projection instead (ablation), `--euclidean` trains the
              Euclidean flow-matching baseline
  conditioning class labels, dropped to the null class with probability 0.1 (classifier-free guidance)
  optimiser   AdamW lr 2e-4, betas (0.9, 0.95), no weight decay, global batch 1024, 80 epochs, bf16 autocast
              LightningDiT: EMA 0.9999, constant lr, no clipping
              DiT^DH:       EMA 0.9995, linear lr warm-up over the first 40 epochs, gradient clipping at 1.0

Real run, 8 GPUs (the autoencoder from train_ae.py stage 4):

    torchrun --nproc_per_node=8 train_dit.py --model LightningDiT-XL/1 --data /data/imagenet/train
    torchrun --nproc_per_node=8 train_dit.py --model DiTDH-XL/1 --data /data/imagenet/train --out runs/ditdh

Tiny CPU run (synthetic images, the tiny autoencoder of `python train_ae.py --stage 4 --preset tiny`):

    python train_dit.py --preset tiny

A run resumes from the newest readable checkpoint in --out; SIGTERM/SIGUSR1/SIGINT checkpoint and stop.
"""
import argparse
import copy
import os
import sys
from types import SimpleNamespace

import torch

import train_utils as tu
from model import DiT_models
from rfm import flow_matching_loss, project_sphere, shift_alpha, time_shift
from sample import initial_noise, sample_latents
from train_ae import build_dataset, image_size, load_autoencoder

FAMILY_DEFAULTS = {  # §4.2
    "LightningDiT": dict(ema=0.9999, warmup_epochs=0, grad_clip=0.0),
    "DiTDH": dict(ema=0.9995, warmup_epochs=40, grad_clip=1.0),
}
LABEL_DROPOUT = 0.1
BETAS = (0.9, 0.95)
TINY_SIZE = dict(hidden_size=128, depth=2, num_heads=2)
TINY_HEAD = dict(head_hidden_size=256, head_depth=1, head_num_heads=2)
GRID_SAMPLES, GRID_STEPS = 16, 25


#################################################################################
#                                    Models                                     #
#################################################################################

def family(name):
    return name.split("-")[0]


def model_kwargs(args, ae_config, num_classes):
    """Constructor arguments of the DiT: the latent grid of the autoencoder, the classes of the data, the size."""
    kwargs = dict(input_size=ae_config["image_size"] // 16, in_channels=ae_config["decoder"]["latent_channels"],
                  num_classes=num_classes)
    if args.preset == "tiny":
        kwargs.update(TINY_SIZE, **(TINY_HEAD if family(args.model) == "DiTDH" else {}))
    return kwargs


def model_title(args, model):
    size = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params"
    return f"{args.model} ({size})" if args.preset == "full" else f"tiny {family(args.model)} ({size})"


@torch.no_grad()
def update_ema(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def learning_rate(step, base_lr, warmup_steps):
    """Linear warm-up to base_lr over warmup_steps (step counts from 1), then constant: a pure function of the step."""
    return base_lr * min(1.0, step / warmup_steps) if warmup_steps > 0 else base_lr


def drop_labels(y, null_class, rng):
    """Replace 10% of the labels by the null class, so one network learns v(x, t, y) and v(x, t, ∅) for CFG."""
    return torch.where(rng.rand() < LABEL_DROPOUT, torch.full_like(y, null_class), y)


def draw_time_and_noise(rng, shape, alpha, radius, euclidean):
    """t ~ logit-normal(0, 1) shifted towards noise by alpha (RAE); noise uniform on the spheres (R·ε/‖ε‖ per token),
    or ε ~ N(0, I) for the Euclidean baseline."""
    t = time_shift(rng.randn().sigmoid(), alpha)
    eps = rng.randn(*shape)
    return t, eps if euclidean else project_sphere(eps, radius)


#################################################################################
#                                 Training step                                 #
#################################################################################

def train_step(model_ddp, ema, opt, ae, x, y, rng, lr, alpha, args, run):
    """One optimizer step of Eq. 14 on the global batch (--grad-accum chunks): encode online, drop labels, draw t and
    the noise, regress the velocity; clip (DiT^DH), AdamW, EMA (§4.2)."""
    model = tu.unwrap(model_ddp)
    opt.zero_grad(set_to_none=True)
    loss = 0.0
    for x_m, y_m, rng_m in run.micro_batches(model_ddp, x, y, rng):
        with torch.no_grad(), tu.autocast(x_m.device, args.precision):
            z = ae.encode_sphere(x_m)  # tokens on the sphere of radius R (Eq. 11)
        y_m = drop_labels(y_m, model.null_class, rng_m)
        t, noise = draw_time_and_noise(rng_m, z.shape[1:], alpha, ae.radius, args.euclidean)
        with tu.autocast(x_m.device, args.precision):
            chunk = flow_matching_loss(model_ddp, z, noise, t, y_m, ae.radius, euclidean=args.euclidean,
                                       tangent=args.tangent_loss) / args.grad_accum
        chunk.backward()
        loss = loss + chunk.detach()
    norm = tu.grad_norm(model.parameters())
    if run.agree({"dit": tu.finite(loss, norm)}, dict(loss=loss, grad_norm=norm, lr=lr))["dit"]:
        if args.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), args.grad_clip, norm)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        update_ema(ema, model, args.ema)


#################################################################################
#                                      Run                                      #
#################################################################################

def train(args):
    _, world, device = tu.setup_distributed()
    run = tu.Run(args.out, args, device)
    dataset = build_dataset(args)  # a missing or empty folder fails before any model is built
    run.plan(len(dataset), args.global_batch, args.epochs, args.max_steps)
    ae_state = check_autoencoder(args)
    kwargs = model_kwargs(args, ae_state["config"], dataset_classes(dataset.dataset))
    state = run.resume(lambda s, path: check_checkpoint(s, path, args, kwargs, ae_state["path"]))

    tu.seed_everything(args.seed)  # identical models (and EMA copies) on every rank
    ae, _ = load_autoencoder(ae_state["path"], device, args.dino_weights)
    model = DiT_models[args.model](**kwargs).to(device)
    model.grad_checkpointing = args.grad_checkpoint
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=BETAS, weight_decay=0.0,
                            fused=device.type == "cuda")
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
    if args.compile:  # in place: parameter names and checkpoints stay the same
        model.compile()
    model_ddp = tu.ddp(model, device)
    warmup_steps = args.warmup_epochs * run.steps_per_epoch
    alpha = shift_alpha(kwargs["input_size"] ** 2, kwargs["in_channels"])

    tu.print0(f"{model_title(args, model)}, {'Euclidean FM' if args.euclidean else 'Riemannian FM'}"
              f"{' (tangent loss)' if args.tangent_loss else ''}, {world} rank(s), global batch {args.global_batch} "
              f"({run.batch // args.grad_accum} per rank × {args.grad_accum}), {run.total_steps} steps, lr {args.lr} "
              f"(warm-up {warmup_steps} steps), EMA {args.ema}, grad clip {args.grad_clip or 'off'}, "
              f"shift {alpha:.3g}, rho {ae.rho:.4g}, out {args.out}")
    for step, x, y, rng in run.batches(dataset, desc=args.model if args.preset == "full" else "tiny DiT"):
        train_step(model_ddp, ema, opt, ae, x, y, rng, learning_rate(step, args.lr, warmup_steps), alpha, args, run)
        run.end_step(lambda: checkpoint_state(args, kwargs, ae_state, model, ema, opt),
                     lambda step: save_sample_grid(ema, ae, args, alpha, os.path.join(args.out,
                                                                                      f"samples_{step:07d}.png")))
    tu.cleanup_distributed()
    return SimpleNamespace(model=model, ema=ema, stopped=run.stopped)


def save_sample_grid(ema, ae, args, alpha, path):
    """Samples of the EMA model for a fixed spread of classes and fixed noise: grids are comparable across steps.
    The noise comes from its own generators, so grids leave the training RNG (and exact resume) untouched."""
    device = next(ema.parameters()).device
    labels = torch.arange(GRID_SAMPLES, device=device) * ema.num_classes // GRID_SAMPLES
    noise = initial_noise(range(GRID_SAMPLES), ema, ae.radius, args.euclidean, args.seed, device)
    with torch.no_grad(), tu.autocast(device, args.precision):
        z = sample_latents(ema, labels, noise, ae.radius, alpha, "euler" if args.euclidean else "euler-proj",
                           GRID_STEPS)
        images = ae.decode_sphere(z).float()
    tu.save_image_grid(images, path, nrow=GRID_SAMPLES // 2)


#################################################################################
#                       Autoencoder, data and checkpoints                       #
#################################################################################

def check_autoencoder(args):
    """The autoencoder checkpoint the latents come from, checked before any model is built -> its state + path."""
    state, path = tu.load_checkpoint(args.ae, "dino-sae-ae", "--ae")
    size = image_size(args.preset)
    if state["config"]["image_size"] != size:
        raise tu.DataError(f"--ae {path} works on {state['config']['image_size']}px images, the {args.preset} "
                           f"preset's data are {size}px")
    if state.get("rho") is None:
        raise tu.DataError(f"--ae {path} holds no measured mean token norm rho: train it with this train_ae.py")
    if state["stage"] < 4:
        tu.print0(f"warning: --ae {path} is a stage-{state['stage']} autoencoder; the paper trains the DiT on "
                  "stage 4 (noise-augmented decoder)", file=sys.stderr)
    return dict(state, path=path)


def dataset_classes(base):
    """Number of classes: the synthetic set's, or the class subfolders of an ImageFolder (a flat folder is one)."""
    return base.num_classes if hasattr(base, "num_classes") else max(len(base.classes), 1)


def checkpoint_state(args, kwargs, ae_state, model, ema, opt):
    return dict(kind="dino-sae-dit", model_name=args.model, model_kwargs=kwargs, euclidean=args.euclidean,
                args=vars(args), ae=ae_state["path"], ae_config=ae_state["config"], model=model.state_dict(),
                ema=ema.state_dict(), opt=opt.state_dict())


def check_checkpoint(state, path, args, kwargs, ae_path):
    """A resume must continue the same model on the same latents: anything else is one clear error."""
    if state.get("kind") != "dino-sae-dit":
        found = f"a {state['kind']!r} checkpoint" if "kind" in state else "not a DINO-SAE checkpoint"
        raise tu.DataError(f"{path} is {found}, not a DiT checkpoint written by train_dit.py")
    if (state["model_name"], state["model_kwargs"]) != (args.model, kwargs):
        raise tu.DataError(f"{path} holds {state['model_name']} {state['model_kwargs']}; this run builds "
                           f"{args.model} {kwargs}")
    if state["euclidean"] != args.euclidean:
        raise tu.DataError(f"{path} was trained with {'Euclidean' if state['euclidean'] else 'Riemannian'} flow "
                           "matching; pass the same --euclidean setting to resume it")
    if os.path.abspath(state["ae"]) != os.path.abspath(ae_path):
        tu.print0(f"warning: {path} was trained on the latents of {state['ae']}, this run uses {ae_path}",
                  file=sys.stderr)


def parse_args(argv=None):
    p = tu.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(DiT_models), default="LightningDiT-XL/1",
                   help="the tiny preset keeps the family (LightningDiT or DiTDH) and shrinks the size to width 128")
    p.add_argument("--preset", choices=["full", "tiny"], default="full",
                   help="tiny: synthetic 64px images, the tiny autoencoder, a 128-wide DiT (CPU, minutes)")
    p.add_argument("--ae", default=None, help="train_ae.py checkpoint file or stage folder "
                                              "(default runs/ae/stage4, tiny: runs/tiny/ae/stage4)")
    p.add_argument("--dino-weights", help="DINOv3 ViT-L/16 file, if not where the autoencoder checkpoint says")
    p.add_argument("--out", default=None, help="run folder (default runs/dit, tiny: runs/tiny/dit)")
    p.add_argument("--euclidean", action="store_true", help="Euclidean flow matching (the ablation baseline)")
    p.add_argument("--tangent-loss", action="store_true",
                   help="ablation: regress the tangent projection P_x v of the output instead of v itself (Eq. 14)")
    p.add_argument("--global-batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ema", type=float, default=None, help="EMA decay (default 0.9999 LightningDiT, 0.9995 DiTDH)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="linear lr warm-up (default 0 LightningDiT, 40 DiTDH)")
    p.add_argument("--grad-clip", type=float, default=None, help="max grad norm, 0 = off (default 0 LightningDiT, "
                                                                "1.0 DiTDH)")
    p.add_argument("--sample-every", type=int, default=10000)
    p.add_argument("--ckpt-every", type=int, default=10000)
    tu.add_run_args(p)
    args = p.parse_args(argv)
    tu.check_run_args(args)
    defaults = dict(FAMILY_DEFAULTS[family(args.model)])
    if args.preset == "tiny":  # runs of a few hundred steps on CPU: fp32 (CPU bf16 is emulated), a large lr
        defaults.update(ema=0.99, warmup_epochs=min(defaults["warmup_epochs"], 1))
        tiny = dict(out="runs/tiny/dit", ae="runs/tiny/ae/stage4", global_batch=16, num_workers=0, log_every=10,
                    sample_every=100, ckpt_every=100, lr=1e-3, precision="fp32")
        if args.epochs is None:
            tiny["max_steps"] = 300
        tu.apply_preset(p, args, "tiny preset", tiny)
    tu.apply_preset(p, args, f"{family(args.model)} defaults", defaults)  # §4.2, where no flag was given
    args.epochs = 80 if args.epochs is None else args.epochs
    args.out = args.out or "runs/dit"
    args.ae = args.ae or "runs/ae/stage4"
    if not 0 <= args.ema < 1 or args.grad_clip < 0 or args.warmup_epochs < 0 or args.lr <= 0:
        raise tu.UsageError(f"need 0 <= --ema < 1, --grad-clip >= 0, --warmup-epochs >= 0, --lr > 0; got {args.ema}, "
                            f"{args.grad_clip}, {args.warmup_epochs}, {args.lr}")
    return args


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    tu.cli(main)
