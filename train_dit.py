"""Train a diffusion transformer on DINO-SAE latents by Riemannian flow matching (paper §3.4 and §4.2, SPEC §3-4).

  latents     the frozen DINO-SAE encoder maps each (randomly flipped) image online to N tokens on S_R^{C-1}
  objective   Eq. 14: geodesic path from data (t = 0) to uniform noise on the sphere (t = 1), tangent velocity target,
              logit-normal t shifted by sqrt(N·C/4096); `--euclidean` trains the Euclidean flow-matching baseline
  conditioning class labels, dropped to the null class with probability 0.1 (classifier-free guidance)
  optimiser   AdamW lr 2e-4, betas (0.9, 0.95), no weight decay, global batch 1024, 80 epochs, bf16 autocast
              LightningDiT: EMA 0.9999, constant lr, no clipping
              DiT^DH:       EMA 0.9995, linear lr warm-up over the first 40 epochs, gradient clipping at 1.0

Real run, 8 GPUs (the autoencoder from train_ae.py stage 4):

    torchrun --nproc_per_node=8 train_dit.py --model LightningDiT-XL/1 --data /data/imagenet/train
    torchrun --nproc_per_node=8 train_dit.py --model DiTDH-XL/1 --data /data/imagenet/train --out runs/ditdh

Tiny CPU run (synthetic images, the tiny autoencoder of `python train_ae.py --stage 4 --preset tiny`):

    python train_dit.py --preset tiny

A run resumes from the newest readable checkpoint in --out; SIGTERM/SIGUSR1 checkpoint and exit 0.
"""
import argparse
import copy
import math
import os
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import train_utils as tu
from model import DiT_models
from rfm import rfm_loss, shift_alpha
from sample import initial_noise, sample_latents
from train_ae import FULL_CONFIG, TINY_CONFIG, build_dataset, load_autoencoder, print0

FAMILY_DEFAULTS = {  # paper §4.2
    "LightningDiT": dict(ema=0.9999, warmup_epochs=0, grad_clip=0.0),
    "DiTDH": dict(ema=0.9995, warmup_epochs=40, grad_clip=1.0),
}
LABEL_DROPOUT = 0.1
TINY_SIZE = dict(hidden_size=128, depth=2, num_heads=2)
TINY_HEAD = dict(head_hidden_size=256, head_depth=1, head_num_heads=2)
GRID_SAMPLES, GRID_STEPS = 16, 25


#################################################################################
#                                    Models                                     #
#################################################################################

def model_kwargs(args, ae, config, num_classes):
    """Constructor arguments of the DiT: the latent grid of the autoencoder, the classes of the data, the size."""
    kwargs = dict(input_size=config["image_size"] // ae.encoder.vit.patch_size,
                  in_channels=ae.decoder.latent_channels, num_classes=num_classes)
    if args.preset == "tiny":
        kwargs.update(TINY_SIZE, **(TINY_HEAD if family(args.model) == "DiTDH" else {}))
    return kwargs


def family(name):
    return name.split("-")[0]


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def learning_rate(step, base_lr, warmup_steps):
    """Linear warm-up to base_lr over warmup_steps, then constant (a pure function of the step: exact resume)."""
    return base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr


def drop_labels(y, null_class):
    """Replace 10% of the labels by the null class, so one network learns v(x, t, y) and v(x, t, ∅) for CFG."""
    return torch.where(torch.rand(y.shape, device=y.device) < LABEL_DROPOUT, torch.full_like(y, null_class), y)


#################################################################################
#                                  Training                                     #
#################################################################################

def train(args):
    rank, world, device = tu.setup_distributed()
    batch = tu.check_batch(args.global_batch, world)
    dataset = build_dataset(args)  # a missing or empty folder fails before any model is built
    num_classes = dataset_classes(dataset.dataset)
    tu.seed_everything(args.seed)  # identical models (and EMA copies) on every rank
    logger = tu.Logger(args.out, tu.is_main())

    ae, ae_config = load_frozen_autoencoder(args, device)
    kwargs = model_kwargs(args, ae, ae_config, num_classes)
    model = DiT_models[args.model](**kwargs).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=device.type == "cuda")

    tu.seed_everything(args.seed + rank)  # per-rank streams for label dropout, t and noise
    ckpts = tu.CheckpointManager(args.out, keep=args.keep)
    state = ckpts.load(args.resume) if args.resume != "none" else None
    progress = dict(step=0, epoch=0, step_in_epoch=0, skipped_images=0, nonfinite=0)
    if state is not None:
        check_checkpoint(state, ckpts.loaded_path, args.model, kwargs, args.euclidean)
        if state["ae"] != os.path.abspath(args.ae):
            warnings.warn(f"{ckpts.loaded_path} was trained on the latents of {state['ae']}, this run uses {args.ae}")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        progress.update(state["progress"])
        tu.restore_rng_states(state["rng"], rank, world)
        print0(f"resumed from {ckpts.loaded_path} at step {progress['step']}")

    if args.compile:  # in place: parameter names and checkpoints stay the same
        model.compile()
    model_ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    sampler = tu.ResumableSampler(len(dataset), rank, world, args.seed)
    steps_per_epoch = len(sampler) // batch
    if steps_per_epoch == 0:
        raise ValueError(f"dataset of {len(dataset)} images is smaller than one global batch of {args.global_batch}")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup_steps = args.warmup_epochs * steps_per_epoch
    radius = ae.encoder.radius
    alpha = shift_alpha(kwargs["input_size"] ** 2, kwargs["in_channels"])
    guard = tu.NonFiniteGuard(args.max_nonfinite)
    guard.skipped_total = progress["nonfinite"]
    preempt = tu.PreemptionHandler()

    def save():
        progress["nonfinite"] = guard.skipped_total
        rng = tu.gather_rng_states(world)
        if tu.is_main():
            ckpts.save(checkpoint_state(args, kwargs, ae_config, model, ema, opt, progress, rng), progress["step"])
        tu.barrier()

    print0(f"{args.model} {kwargs}: {sum(p.numel() for p in params) / 1e6:.2f}M params, "
           f"{'Euclidean FM' if args.euclidean else 'Riemannian FM'}, {world} rank(s), batch {args.global_batch}, "
           f"{total_steps} steps, lr {args.lr} (warm-up {warmup_steps} steps), EMA {args.ema}, "
           f"grad clip {args.grad_clip or 'off'}, shift {alpha:.3g}, out {args.out}")
    bar = tu.progress_bar(total_steps, initial=progress["step"], desc=args.model)
    data = tu.endless_batches(dataset, sampler, batch, progress, args.num_workers)
    running_loss, logged_steps, grad_norm, t0, seen = torch.zeros((), device=device), 0, torch.zeros(()), time.time(), 0
    while progress["step"] < total_steps:
        x, y, n_skipped = next(data)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad(), tu.autocast(device, args.precision):
            z = ae.encoder.encode(x).float()
        with tu.autocast(device, args.precision):
            loss = rfm_loss(model_ddp, z, drop_labels(y, model.null_class), radius, alpha, euclidean=args.euclidean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lr = learning_rate(progress["step"], args.lr, warmup_steps)
        if guard.step_ok(tu.all_finite(loss, params)):
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            update_ema(ema, model, args.ema)
            running_loss += loss.detach()
            logged_steps += 1
        progress["step"] += 1
        progress["step_in_epoch"] += 1
        progress["skipped_images"] += n_skipped
        seen += x.shape[0] * world
        bar.update(1)
        step = progress["step"]
        if step % args.log_every == 0 or step == total_steps:
            logger.log(step, dict(loss=mean_over_ranks(running_loss / max(logged_steps, 1), world),
                                  grad_norm=float(grad_norm), lr=lr, img_per_s=seen / (time.time() - t0),
                                  epoch=progress["epoch"], skipped_images=progress["skipped_images"],
                                  nonfinite_steps=guard.skipped_total))
            running_loss.zero_()
            logged_steps, t0, seen = 0, time.time(), 0
        if step % args.sample_every == 0 or step == total_steps:
            save_sample_grid(ema, ae, args, radius, alpha, os.path.join(args.out, f"samples_{step:07d}.png"), device)
        if tu.checkpoint_or_stop(step, total_steps, args.ckpt_every, preempt, save):
            break
    bar.close()
    preempt.restore()
    tu.cleanup_distributed()
    return model, ema


def mean_over_ranks(value, world):
    if tu.is_distributed():
        dist.all_reduce(value)
        value = value / world
    return value.item()


def save_sample_grid(ema, ae, args, radius, alpha, path, device):
    """Samples of the EMA model for a fixed spread of classes and fixed noise: grids are comparable across steps.
    The noise comes from its own generators, so grids leave the training RNG (and exact resume) untouched."""
    if not tu.is_main():
        return
    labels = torch.arange(GRID_SAMPLES, device=device) * ema.num_classes // GRID_SAMPLES
    noise = initial_noise(range(GRID_SAMPLES), ema, radius, args.euclidean, args.seed, device)
    with torch.no_grad(), tu.autocast(device, args.precision):
        z = sample_latents(ema, labels, noise, radius, alpha, "euler" if args.euclidean else "euler-proj", GRID_STEPS)
        images = ae.decoder(z).float()
    tu.save_image_grid(images, path, nrow=GRID_SAMPLES // 2)


#################################################################################
#                       Autoencoder, data and checkpoints                       #
#################################################################################

def load_frozen_autoencoder(args, device):
    if not os.path.exists(args.ae):
        raise FileNotFoundError(f"autoencoder checkpoint {args.ae} does not exist: train it with train_ae.py "
                                "(stages 1-4) or pass --ae")
    ae, config = load_autoencoder(args.ae, device, dino_weights=args.dino_weights)
    size = TINY_CONFIG["image_size"] if args.preset == "tiny" else FULL_CONFIG["image_size"]
    if config["image_size"] != size:
        raise ValueError(f"autoencoder {args.ae} works on {config['image_size']}px images, the {args.preset} "
                         f"preset's data are {size}px")
    return ae, config


def dataset_classes(base):
    """Number of classes: the synthetic set's, or the class subfolders of an ImageFolder (a flat folder is one)."""
    return base.num_classes if hasattr(base, "num_classes") else max(len(base.classes), 1)


def checkpoint_state(args, kwargs, ae_config, model, ema, opt, progress, rng):
    return dict(kind="dino-sae-dit", model_name=args.model, model_kwargs=kwargs, euclidean=args.euclidean,
                args=vars(args), ae=os.path.abspath(args.ae), ae_config=ae_config, progress=dict(progress),
                model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), rng=rng)


def check_checkpoint(state, path, name, kwargs, euclidean):
    """A resume must continue the same model on the same latents: anything else is one clear error."""
    if state.get("kind") != "dino-sae-dit":
        found = f"a {state['kind']!r} checkpoint" if "kind" in state else "not a DINO-SAE checkpoint"
        raise ValueError(f"{path} is {found}, not a DiT checkpoint written by train_dit.py")
    if (state["model_name"], state["model_kwargs"]) != (name, kwargs):
        raise ValueError(f"{path} holds {state['model_name']} {state['model_kwargs']}; this run builds {name} {kwargs}")
    if state["euclidean"] != euclidean:
        raise ValueError(f"{path} was trained with {'Euclidean' if state['euclidean'] else 'Riemannian'} flow "
                         "matching; pass the same --euclidean setting to resume it")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(DiT_models), default="LightningDiT-XL/1",
                   help="the tiny preset keeps the family (LightningDiT or DiTDH) and shrinks the size to width 128")
    p.add_argument("--preset", choices=["full", "tiny"], default="full",
                   help="tiny: synthetic 64px images, the tiny autoencoder, a 128-wide DiT (CPU, minutes)")
    p.add_argument("--ae", default=None, help="train_ae.py checkpoint file or stage folder "
                                              "(default runs/ae/stage4, tiny: runs/tiny/ae/stage4)")
    p.add_argument("--dino-weights", help="DINOv3 ViT-L/16 file, if not where the autoencoder checkpoint says")
    p.add_argument("--out", default=None, help="run folder (default runs/dit, tiny: runs/tiny/dit)")
    p.add_argument("--euclidean", action="store_true", help="Euclidean flow matching (the ablation baseline)")
    p.add_argument("--global-batch", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ema", type=float, default=None, help="EMA decay (default 0.9999 LightningDiT, 0.9995 DiTDH)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="linear lr warm-up (default 0 LightningDiT, 40 DiTDH)")
    p.add_argument("--grad-clip", type=float, default=None, help="max grad norm, 0 = off (default 0 LightningDiT, "
                                                                "1.0 DiTDH)")
    p.add_argument("--sample-every", type=int, default=10000)
    p.add_argument("--ckpt-every", type=int, default=10000)
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    tu.add_run_args(p)
    args = p.parse_args(argv)
    defaults = dict(FAMILY_DEFAULTS[family(args.model)])
    if args.preset == "tiny":
        defaults.update(ema=0.99, warmup_epochs=min(defaults["warmup_epochs"], 1))  # runs of a few hundred steps
        tu.apply_preset(p, args, dict(out="runs/tiny/dit", ae="runs/tiny/ae/stage4", global_batch=16, num_workers=0,
                                      log_every=10, sample_every=100, ckpt_every=100, max_steps=300, lr=1e-3,
                                      precision="fp32"))  # CPU bf16 is emulated: slower than fp32
    tu.apply_preset(p, args, defaults)  # the family's EMA, warm-up and clipping where no flag was given
    if not 0 <= args.ema < 1 or args.grad_clip < 0 or args.warmup_epochs < 0:
        p.error(f"need 0 <= --ema < 1, --grad-clip >= 0, --warmup-epochs >= 0; got {args.ema}, {args.grad_clip}, "
                f"{args.warmup_epochs}")
    args.out = args.out or "runs/dit"
    args.ae = args.ae or "runs/ae/stage4"
    return args


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
