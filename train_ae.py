"""Four-stage training of the DINO-SAE autoencoder (paper §4.1, SPEC §2.5).

  stage 1  semantic-structural alignment   stem + decoder   0.5·cos + L1 + LPIPS             lr 1e-5  betas (0.9, 0.999)
  stage 2  adversarial adaptation          stem + decoder   stage 1 + 0.5·λ·L_G (DINO disc)  lr 1e-4  betas (0.5, 0.9)
  stage 3  decoder refinement              decoder          L1 + LPIPS + 0.5·λ·L_G           lr 1e-4  betas (0.5, 0.9)
  stage 4  noise augmentation              decoder          as stage 3, z + σε, σ~U(0,0.8)   lr 5.4e-5

Each stage starts from the last checkpoint of the previous one (`<out>/stage{N-1}`) and resumes its own run when
`<out>/stage{N}` already holds checkpoints. Real run, 8 GPUs (see README for the weight files):

    torchrun --nproc_per_node=8 train_ae.py --stage 1 --data /data/imagenet/train
    torchrun --nproc_per_node=8 train_ae.py --stage 2 --data /data/imagenet/train   # ... then 3 and 4

Tiny CPU run (synthetic images, random DINOv3 weights saved in the official layout and loaded by the real loader):

    python train_ae.py --stage 1 --preset tiny
"""
import argparse
import os
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import train_utils as tu
from losses import adaptive_weight, alignment_loss, build_lpips, hinge_d_loss, hinge_g_loss
from model import DCAE_CONFIGS, DCAEDecoder, DinoDiscriminator, DinoSAEEncoder, DinoVisionTransformer, load_dinov3

STAGES = {
    1: dict(train_stem=True, align=True, gan=False, noise_tau=0.0, lr=1e-5, betas=(0.9, 0.999), epochs=20),
    2: dict(train_stem=True, align=True, gan=True, noise_tau=0.0, lr=1e-4, betas=(0.5, 0.9), epochs=10),
    3: dict(train_stem=False, align=False, gan=True, noise_tau=0.0, lr=1e-4, betas=(0.5, 0.9), epochs=5),
    4: dict(train_stem=False, align=False, gan=True, noise_tau=0.8, lr=5.4e-5, betas=(0.5, 0.9), epochs=5),
}
W_COS, W_L1, W_LPIPS, W_ADV = 0.5, 1.0, 1.0, 0.5  # paper §4.1


def decoder_config(name, **overrides):
    """A DC-AE decoder configuration as plain lists, as stored in checkpoints."""
    config = dict(DCAE_CONFIGS[name], **overrides)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


WEIGHTS_DIR = os.environ.get("DINO_SAE_WEIGHTS", "weights")
FULL_CONFIG = dict(
    image_size=256, stem_widths=[128, 256, 512, 1024], disc_resolution=224,
    decoder=decoder_config("f16-in"),
    dino_weights=os.path.join(WEIGHTS_DIR, "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"),
    disc_weights=os.path.join(WEIGHTS_DIR, "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
)
TINY_CONFIG = dict(
    image_size=64, stem_widths=[32, 32, 64, 64], disc_resolution=64,
    decoder=decoder_config("f16-in", latent_channels=128, widths=[16, 32, 32, 64, 128], depths=[0, 1, 1, 1, 1]),
)
ARCHITECTURE_KEYS = ("image_size", "stem_widths", "disc_resolution", "decoder")


#################################################################################
#                                   Models                                      #
#################################################################################

def tiny_dinov3(depth, seed):
    """A random DINOv3-shaped ViT (width 128, 2 heads) whose blocks do real work (LayerScale 0.2, not 1e-5)."""
    torch.manual_seed(seed)
    vit = DinoVisionTransformer(embed_dim=128, depth=depth, num_heads=2)
    with torch.no_grad():
        for block in vit.blocks:
            block.ls1.gamma.fill_(0.2)
            block.ls2.gamma.fill_(0.2)
    return vit


def make_tiny_weights(weights_dir):
    """Write the tiny encoder ViT and discriminator ViT in the official DINOv3 layout (once; reused after)."""
    paths = {}
    for name, depth, seed in (("dino_weights", 4, 1), ("disc_weights", 12, 2)):
        path = os.path.join(weights_dir, f"tiny_dinov3_{name.split('_')[0]}.pth")
        if tu.is_main() and not os.path.isfile(path):
            os.makedirs(weights_dir, exist_ok=True)
            torch.save(tiny_dinov3(depth, seed).state_dict(), path + ".part")
            os.replace(path + ".part", path)
        paths[name] = path
    tu.barrier()
    return paths


class AutoEncoder(nn.Module):
    """DINO-SAE: image -> spherical latent (stem + frozen DINOv3) -> DC-AE decoder -> image."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x, with_teacher=False, noise_tau=0.0):
        with torch.set_grad_enabled(torch.is_grad_enabled() and requires_grad(self.encoder.stem)):
            enc = self.encoder(x, with_teacher=with_teacher)
        z = enc["z"]
        if self.training and noise_tau > 0:
            z = add_latent_noise(z, noise_tau)
        return dict(enc, x_hat=self.decoder(z))


def requires_grad(module):
    return any(p.requires_grad for p in module.parameters())


def add_latent_noise(z, tau):
    """Eq. 10: z + σ·ε with σ ~ U(0, τ) per sample, so the decoder tolerates the generator's imperfect latents."""
    sigma = torch.rand(z.shape[0], 1, 1, 1, device=z.device) * tau
    return z + sigma * torch.randn_like(z)


def build_autoencoder(config):
    vit = load_dinov3(config["dino_weights"])
    encoder = DinoSAEEncoder(vit, config["stem_widths"])
    decoder = DCAEDecoder(**config["decoder"])
    if decoder.latent_channels != vit.embed_dim:
        raise ValueError(f"decoder latent_channels {decoder.latent_channels} != DINOv3 width {vit.embed_dim}")
    return AutoEncoder(encoder, decoder)


def load_autoencoder(path, device="cpu", dino_weights=None):
    """A trained DINO-SAE (frozen, eval mode) from a train_ae.py checkpoint file or run folder -> (model, config)."""
    ckpt = tu.CheckpointManager(path).load("auto") if os.path.isdir(path) else tu.CheckpointManager(".").load(path)
    if ckpt is None or ckpt.get("kind") != "dino-sae-ae":
        raise ValueError(f"{path} holds no DINO-SAE autoencoder checkpoint (written by train_ae.py)")
    config = dict(ckpt["config"], **({"dino_weights": dino_weights} if dino_weights else {}))
    ae = build_autoencoder(config)
    ae.encoder.stem.load_state_dict(ckpt["stem"])
    ae.decoder.load_state_dict(ckpt["decoder"])
    return ae.requires_grad_(False).eval().to(device), config


#################################################################################
#                                 Training step                                 #
#################################################################################

def generator_loss(ae, lpips, disc, x, stage):
    """Losses of the autoencoder for one batch -> (total, metrics, reconstructions)."""
    out = ae(x, with_teacher=stage["align"], noise_tau=stage["noise_tau"])
    x_hat = out["x_hat"]
    l1 = (x_hat.float() - x.float()).abs().mean()
    lp = lpips(x_hat.float(), x.float()).mean()
    rec = W_L1 * l1 + W_LPIPS * lp
    metrics = {"l1": l1.detach(), "lpips": lp.detach()}
    if stage["align"]:
        cos = alignment_loss(out["z_s"], out["z_t"])  # Eq. 6
        rec = rec + W_COS * cos
        metrics["cos"] = cos.detach()
    loss = rec
    if stage["gan"]:
        g = hinge_g_loss(disc(x_hat))
        last = (ae.module if isinstance(ae, DDP) else ae).decoder.last_layer_weight
        lam = adaptive_weight(rec, g, last)
        loss = rec + W_ADV * lam * g
        metrics.update(g=g.detach(), lam=lam)
    metrics["loss"] = loss.detach()
    return loss, metrics, x_hat


def quantize(x):
    """The discriminator judges 8-bit images, as the generator's outputs will be saved."""
    return torch.round((x.float().clamp(-1, 1) + 1) * 127.5) / 127.5 - 1  # fp32: bf16 cannot hold the 256 levels


def discriminator_loss(disc, x, x_hat):
    return hinge_d_loss(disc(x), disc(quantize(x_hat.detach())))


def train(args):
    stage = dict(STAGES[args.stage], lr=args.lr or STAGES[args.stage]["lr"])
    rank, world, device = tu.setup_distributed()
    batch = tu.check_batch(args.global_batch, world)
    out_dir = os.path.join(args.out, f"stage{args.stage}")
    dataset = build_dataset(args)  # a missing or empty folder fails before any model is built
    config = build_config(args)
    tu.seed_everything(args.seed)  # identical models on every rank (LPIPS's random trunk in tests is not DDP-synced)
    logger = tu.Logger(out_dir, tu.is_main())

    ae = build_autoencoder(config).to(device)
    ae.encoder.stem.requires_grad_(stage["train_stem"])
    disc = None
    if stage["gan"]:
        disc = DinoDiscriminator(load_dinov3(config["disc_weights"]), resolution=config["disc_resolution"]).to(device)
    lpips = build_lpips(pretrained=not args.random_lpips).to(device)
    params = [p for p in ae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage["lr"], betas=stage["betas"], weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=stage["lr"], betas=stage["betas"], weight_decay=0.0) if disc else None

    tu.seed_everything(args.seed + rank)  # per-rank streams for DiffAugment and latent noise
    ckpts = tu.CheckpointManager(out_dir, keep=args.keep)
    state = ckpts.load(args.resume) if args.resume != "none" else None
    progress = dict(step=0, epoch=0, step_in_epoch=0, skipped_images=0, nonfinite=0)
    if state is not None:
        check_checkpoint(state, args.stage, config, ckpts.loaded_path)
        load_weights(ae, disc, state)
        opt.load_state_dict(state["opt"])
        if opt_d:
            opt_d.load_state_dict(state["opt_d"])
        for optimizer in filter(None, (opt, opt_d)):  # this run's lr and betas, not the saved ones (--lr may change)
            for group in optimizer.param_groups:
                group.update(lr=stage["lr"], betas=stage["betas"])
        progress.update(state["progress"])
        tu.restore_rng_states(state["rng"], rank, world)
        print0(f"resumed stage {args.stage} from {ckpts.loaded_path} at step {progress['step']}")
    elif args.stage > 1:
        init_from_previous_stage(args, ae, disc, config)

    if args.compile:  # in place: parameter names and checkpoints stay the same
        for module in [ae.decoder, ae.encoder.stem, *ae.encoder.vit.blocks]:
            module.compile()
    ddp = lambda m: DDP(m, device_ids=[device] if device.type == "cuda" else None) if world > 1 else m
    ae_ddp, disc_ddp = ddp(ae), disc and ddp(disc)
    sampler = tu.ResumableSampler(len(dataset), rank, world, args.seed)
    steps_per_epoch = len(sampler) // batch
    if steps_per_epoch == 0:
        raise ValueError(f"dataset of {len(dataset)} images is smaller than one global batch of {args.global_batch}")
    total_steps = args.max_steps or (args.epochs or stage["epochs"]) * steps_per_epoch
    guard, guard_d = tu.NonFiniteGuard(args.max_nonfinite), tu.NonFiniteGuard(args.max_nonfinite)  # G and D apart:
    guard.skipped_total = progress["nonfinite"]  # a D that stays NaN must stop the run even while G steps are fine
    preempt = tu.PreemptionHandler()
    grid_images = fixed_images(dataset, min(8, batch))

    def save():
        progress["nonfinite"] = guard.skipped_total + guard_d.skipped_total
        rng = tu.gather_rng_states(world)
        if tu.is_main():
            ckpts.save(checkpoint_state(args, config, ae, disc, opt, opt_d, progress, rng), progress["step"])
        tu.barrier()

    print0(f"stage {args.stage}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable params, {world} rank(s), "
           f"batch {args.global_batch}, {total_steps} steps, lr {stage['lr']}, out {out_dir}")
    bar = tu.progress_bar(total_steps, initial=progress["step"], desc=f"AE stage {args.stage}")
    ae_ddp.train()
    data = tu.endless_batches(dataset, sampler, batch, progress, args.num_workers)
    t0, seen = time.time(), 0
    while progress["step"] < total_steps:
        x, _, n_skipped = next(data)
        x = x.to(device, non_blocking=True)
        if disc is not None:
            disc.requires_grad_(False)  # the generator step needs gradients through D, not into it
        with tu.autocast(device, args.precision):
            loss, metrics, x_hat = generator_loss(ae_ddp, lpips, disc, x, stage)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if guard.step_ok(tu.all_finite(loss, params)):
            opt.step()
        if disc is not None:
            disc.requires_grad_(True)
            with tu.autocast(device, args.precision):
                d_loss = discriminator_loss(disc_ddp, x, x_hat)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            if guard_d.step_ok(tu.all_finite(d_loss, disc.parameters())):
                opt_d.step()
            metrics["d_loss"] = d_loss.detach()
        progress["step"] += 1
        progress["step_in_epoch"] += 1
        progress["skipped_images"] += n_skipped
        seen += x.shape[0] * world
        bar.update(1)
        step = progress["step"]
        if step % args.log_every == 0 or step == total_steps:
            logger.log(step, dict({k: float(v) for k, v in metrics.items()}, lr=stage["lr"],
                                  img_per_s=seen / (time.time() - t0), skipped_images=progress["skipped_images"],
                                  nonfinite_steps=guard.skipped_total + guard_d.skipped_total))
            t0, seen = time.time(), 0
        if step % args.sample_every == 0 or step == total_steps:
            save_reconstructions(ae, grid_images, os.path.join(out_dir, f"recon_{step:07d}.png"), device, args.precision)
        if tu.checkpoint_or_stop(step, total_steps, args.ckpt_every, preempt, save):
            break
    bar.close()
    preempt.restore()
    tu.cleanup_distributed()
    return ae, disc


def fixed_images(dataset, n):
    """The first n readable images, reconstructed in every grid so progress is comparable across steps."""
    images = []
    for i in range(len(dataset)):
        item = dataset.dataset[i]
        if item is not None:
            images.append(item[0])
        if len(images) == n:
            break
    return torch.stack(images)


def save_reconstructions(ae, images, path, device, precision):
    if not tu.is_main():
        return
    ae.eval()
    with torch.no_grad(), tu.autocast(device, precision):
        x_hat = ae(images.to(device))["x_hat"].float()
    ae.train()
    tu.save_image_grid(torch.cat([images.to(device), x_hat.clamp(-1, 1)]), path, nrow=images.shape[0])


#################################################################################
#                         Checkpoints, stages and config                        #
#################################################################################

def checkpoint_state(args, config, ae, disc, opt, opt_d, progress, rng):
    state = dict(kind="dino-sae-ae", stage=args.stage, args=vars(args), config=config, progress=dict(progress),
                 stem=ae.encoder.stem.state_dict(), decoder=ae.decoder.state_dict(), opt=opt.state_dict(), rng=rng)
    if disc is not None:
        state.update(disc=disc.state_dict(), opt_d=opt_d.state_dict())
    return state


def check_checkpoint(state, stage, config, path, from_stage=None):
    expected = stage if from_stage is None else from_stage
    if state.get("kind") != "dino-sae-ae":
        raise ValueError(f"{path} is not a DINO-SAE autoencoder checkpoint")
    if state["stage"] != expected:
        raise ValueError(f"{path} is a stage-{state['stage']} checkpoint; stage {stage} needs stage {expected}")
    for key in ARCHITECTURE_KEYS:
        if state["config"][key] != config[key]:
            raise ValueError(f"{path} was trained with {key}={state['config'][key]}, this run has {config[key]}")


def load_weights(ae, disc, state):
    ae.encoder.stem.load_state_dict(state["stem"])
    ae.decoder.load_state_dict(state["decoder"])
    if disc is not None and "disc" in state:
        disc.load_state_dict(state["disc"])


def init_from_previous_stage(args, ae, disc, config):
    source = args.init or os.path.join(args.out, f"stage{args.stage - 1}")
    if not os.path.exists(source):
        if args.from_scratch:
            print0(f"stage {args.stage} starts from scratch (--from-scratch)")
            return
        raise FileNotFoundError(f"stage {args.stage} starts from the stage-{args.stage - 1} checkpoint, but {source} "
                                "does not exist: train that stage first, pass --init, or --from-scratch")
    manager = tu.CheckpointManager(source if os.path.isdir(source) else os.path.dirname(source) or ".")
    state = manager.load("auto" if os.path.isdir(source) else source)
    if state is None:
        raise FileNotFoundError(f"no checkpoint in {source}: train stage {args.stage - 1} first")
    check_checkpoint(state, args.stage, config, manager.loaded_path, from_stage=args.stage - 1)
    load_weights(ae, disc, state)
    print0(f"stage {args.stage} initialised from {manager.loaded_path}")


def build_config(args):
    if args.preset == "tiny":
        config = dict(TINY_CONFIG, **make_tiny_weights(os.path.join(args.out, "weights")))
    else:
        config = dict(FULL_CONFIG)
    if args.dino_weights:
        config["dino_weights"] = args.dino_weights
    if args.disc_weights:
        config["disc_weights"] = args.disc_weights
    return config


def build_dataset(args):
    if args.preset == "tiny" and not args.data:
        base = tu.SyntheticImages(num_items=args.num_images, image_size=TINY_CONFIG["image_size"], seed=args.seed)
    else:
        if not args.data:
            raise ValueError("--data is required (an ImageFolder, e.g. ImageNet train) unless --preset tiny")
        size = TINY_CONFIG["image_size"] if args.preset == "tiny" else FULL_CONFIG["image_size"]
        base = tu.ImageFolderDataset(args.data, size)
    return tu.HorizontalFlip(base, args.seed)


def print0(*a):
    if tu.is_main():
        print(*a, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=[1, 2, 3, 4], required=True)
    p.add_argument("--preset", choices=["full", "tiny"], default="full",
                   help="tiny: synthetic 64px images, random tiny DINOv3 files, small decoder (CPU, minutes)")
    p.add_argument("--out", default=None, help="run folder; stage N writes <out>/stageN (default runs/ae, runs/tiny/ae)")
    p.add_argument("--init", help="checkpoint file or folder of the previous stage (default <out>/stage{N-1})")
    p.add_argument("--from-scratch", action="store_true", help="allow a stage > 1 to start without a previous stage")
    p.add_argument("--dino-weights", help=f"DINOv3 ViT-L/16 file (default {FULL_CONFIG['dino_weights']})")
    p.add_argument("--disc-weights", help=f"DINOv3 ViT-S/16 file for the discriminator (default {FULL_CONFIG['disc_weights']})")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="default: the stage's lr of the paper")
    p.add_argument("--epochs", type=int, default=None, help="default per stage: 20, 10, 5, 5 (not given in the paper)")
    p.add_argument("--sample-every", type=int, default=2000)
    p.add_argument("--ckpt-every", type=int, default=2000)
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder, stem and ViT blocks")
    p.add_argument("--random-lpips", action="store_true", help="LPIPS with a random VGG (tests; no VGG16 file needed)")
    tu.add_run_args(p)
    args = p.parse_args(argv)
    if args.preset == "tiny":
        tu.apply_preset(p, args, dict(out="runs/tiny/ae", global_batch=8, num_workers=0, log_every=10, sample_every=50,
                                      ckpt_every=50, max_steps=40, lr=5e-4,
                                      precision="fp32"))  # CPU bf16 is emulated: slower than fp32
    args.out = args.out or "runs/ae"
    return args


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
