"""Four-stage training of the DINO-SAE autoencoder (paper §4.1).

  stage 1  semantic-structural alignment   stem + decoder   0.5·L_cos + L1 + LPIPS (Eq. 6)    lr 1e-5  betas (0.9, 0.999)
  stage 2  adversarial adaptation          stem + decoder   stage 1 + 0.5·λ·L_G (DINO disc)   lr 1e-4  betas (0.5, 0.9)
  stage 3  decoder refinement              decoder          L1 + LPIPS + 0.5·λ·L_G            lr 1e-4  betas (0.5, 0.9)
  stage 4  noise augmentation              decoder          as stage 3 on z_S + σε (Eq. 10)   lr 5.4e-5 betas (0.5, 0.9)

The decoder reads the student's tokens z_S as the encoder makes them; the run also measures ρ, the mean token norm of
z_S over its training images, which the generator needs to decode points of its spheres (model.DinoSAE). Each stage
starts from the newest checkpoint of the previous one (`<out>/stage{N-1}`) and resumes its own run when `<out>/stageN`
holds checkpoints. Real run, 8 GPUs (README: weight files):

    torchrun --nproc_per_node=8 train_ae.py --stage 1 --data /data/imagenet/train
    torchrun --nproc_per_node=8 train_ae.py --stage 2 --data /data/imagenet/train   # ... then 3 and 4

Tiny CPU run (synthetic images, random DINOv3 weights saved in the official layout and loaded by the real loader):

    python train_ae.py --stage 1 --preset tiny
"""
import argparse
import os
from types import SimpleNamespace

import torch

import train_utils as tu
from losses import adaptive_weight, alignment_loss, build_lpips, hinge_d_loss, hinge_g_loss
from model import DCAE_CONFIGS, DCAEDecoder, DinoDiscriminator, DinoSAE, DinoSAEEncoder, DinoVisionTransformer, \
    load_dinov3

# §4.1: which parts train, the loss terms, AdamW's lr and betas. Epochs are not in the paper (README).
STAGES = {
    1: dict(train_stem=True, align=True, gan=False, noise_tau=0.0, lr=1e-5, betas=(0.9, 0.999), epochs=20),
    2: dict(train_stem=True, align=True, gan=True, noise_tau=0.0, lr=1e-4, betas=(0.5, 0.9), epochs=10),
    3: dict(train_stem=False, align=False, gan=True, noise_tau=0.0, lr=1e-4, betas=(0.5, 0.9), epochs=5),
    4: dict(train_stem=False, align=False, gan=True, noise_tau=0.8, lr=5.4e-5, betas=(0.5, 0.9), epochs=5),
}
W_COS, W_L1, W_LPIPS, W_ADV = 0.5, 1.0, 1.0, 0.5  # §4.1 loss weights


def decoder_config(name, **overrides):
    """A DC-AE decoder configuration as plain lists, as stored in checkpoints."""
    config = dict(DCAE_CONFIGS[name], **overrides)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


WEIGHTS_DIR = os.environ.get("DINO_SAE_WEIGHTS", "weights")
FULL_CONFIG = dict(
    image_size=256, stem_widths=[128, 256, 512, 1024], disc_resolution=224,
    decoder=decoder_config("f16-in"),
    dino_weights=os.path.join(WEIGHTS_DIR, "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"), dino_arch="vitl16",
    disc_weights=os.path.join(WEIGHTS_DIR, "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"), disc_arch="vits16",
)
TINY_CONFIG = dict(
    image_size=64, stem_widths=[32, 32, 64, 64], disc_resolution=64,
    decoder=decoder_config("f16-in", latent_channels=128, widths=[16, 32, 32, 64, 128], depths=[0, 1, 1, 1, 1]),
    dino_arch=None, disc_arch=None,
)
ARCHITECTURE_KEYS = ("image_size", "stem_widths", "disc_resolution", "decoder")


def image_size(preset):
    return TINY_CONFIG["image_size"] if preset == "tiny" else FULL_CONFIG["image_size"]


#################################################################################
#                                   Models                                      #
#################################################################################

def tiny_dinov3(depth, seed):
    """A random DINOv3-shaped ViT (width 128, 2 heads) whose blocks do real work (LayerScale 0.2, not 1e-5) and whose
    final norm has an affine part, as a trained one does: token norms then vary, as z_S's do with real weights."""
    torch.manual_seed(seed)
    vit = DinoVisionTransformer(embed_dim=128, depth=depth, num_heads=2)
    with torch.no_grad():
        for block in vit.blocks:
            block.ls1.gamma.fill_(0.2)
            block.ls2.gamma.fill_(0.2)
        vit.norm.weight.uniform_(0.5, 1.5)
        vit.norm.bias.normal_(0, 0.2)
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


def load_vit(path, arch, flag):
    """The frozen DINOv3 of one role; a missing, unreadable or wrong-size file is one line naming the flag."""
    try:
        return load_dinov3(path, arch)
    except FileNotFoundError as error:
        raise tu.MissingFileError(f"{flag}: {error}") from None
    except ValueError as error:
        raise tu.DataError(f"{flag}: {error}") from None


def build_autoencoder(config, encoder=True):
    """DINO-SAE of a configuration: stem + DINOv3 from `config['dino_weights']`, DC-AE decoder (random init)."""
    decoder = DCAEDecoder(**config["decoder"])
    if not encoder:
        return DinoSAE(None, decoder)
    vit = load_vit(config["dino_weights"], config.get("dino_arch"), "--dino-weights")
    if decoder.latent_channels != vit.embed_dim:
        raise tu.DataError(f"--dino-weights {config['dino_weights']}: a ViT of width {vit.embed_dim}, but the decoder "
                           f"reads {decoder.latent_channels} channels")
    return DinoSAE(DinoSAEEncoder(vit, config["stem_widths"]), decoder)


def build_discriminator(config):
    vit = load_vit(config["disc_weights"], config.get("disc_arch"), "--disc-weights")
    return DinoDiscriminator(vit, resolution=config["disc_resolution"])


def load_autoencoder(path, device="cpu", dino_weights=None, encoder=True, what="--ae"):
    """A trained DINO-SAE (frozen, eval mode, with its ρ) from a train_ae.py checkpoint file or stage folder ->
    (model, checkpoint state + its resolved "path"). encoder=False builds the decoder only (no DINOv3 file needed)."""
    state, file = tu.load_checkpoint(path, "dino-sae-ae", what)
    config = dict(state["config"], **({"dino_weights": dino_weights} if dino_weights else {}))
    ae = build_autoencoder(config, encoder)
    if encoder:
        ae.encoder.stem.load_state_dict(state["stem"])
    ae.decoder.load_state_dict(state["decoder"])
    ae.rho = state.get("rho")
    return ae.requires_grad_(False).eval().to(device), dict(state, config=config, path=file)


#################################################################################
#                                 Training step                                 #
#################################################################################

def generator_loss(ae, lpips, disc, x, stage, rng=None):
    """The stage's objective on one (micro-)batch (§4.1) -> (loss, metrics, encoder/decoder outputs). `rng` draws the
    latent noise of Eq. 10 and the discriminator's augmentation."""
    out = ae(x, with_teacher=stage["align"], noise_tau=stage["noise_tau"], rng=rng)
    l1 = (out["x_hat"].float() - x.float()).abs().mean()
    lp = lpips(out["x_hat"].float(), x.float()).mean()
    rec = W_L1 * l1 + W_LPIPS * lp
    metrics = {"l1": l1.detach(), "lpips": lp.detach()}
    if stage["align"]:
        cos = alignment_loss(out["z_s"], out["z_t"])  # Eq. 6
        rec = rec + W_COS * cos
        metrics["cos"] = cos.detach()
    loss = rec
    if stage["gan"]:
        g = hinge_g_loss(disc(out["x_hat"], rng))
        lam = adaptive_weight(rec, g, tu.unwrap(ae).decoder.last_layer_weight)
        loss = rec + W_ADV * lam * g
        metrics.update(g=g.detach(), lam=lam)
    metrics["loss"] = loss.detach()
    return loss, metrics, out


def quantize(x):
    """The discriminator judges 8-bit images, as the generator's outputs will be saved."""
    return torch.round((x.float().clamp(-1, 1) + 1) * 127.5) / 127.5 - 1  # fp32: bf16 cannot hold the 256 levels


def discriminator_loss(disc, x, x_hat, rng=None):
    return hinge_d_loss(disc(x, rng), disc(quantize(x_hat.detach()), rng))


def train_step(ae_ddp, disc_ddp, lpips, opt, opt_d, x, rng, stage, args, run):
    """One optimizer step of the stage's objective on the global batch (--grad-accum chunks), and from stage 2 one
    discriminator step on the same real images and this step's fakes. Also tallies ‖z_S‖ per token for ρ."""
    ae, disc, n = tu.unwrap(ae_ddp), disc_ddp and tu.unwrap(disc_ddp), args.grad_accum
    opt.zero_grad(set_to_none=True)
    if disc is not None:
        disc.requires_grad_(False)  # the generator's loss needs gradients through D, not into it
    metrics, pairs, norm_sum, tokens = {}, [], 0.0, 0
    for x_m, rng_m in run.micro_batches(ae_ddp, x, rng):
        with tu.autocast(x_m.device, args.precision):
            loss, parts, out = generator_loss(ae_ddp, lpips, disc, x_m, stage, rng_m)
        (loss / n).backward()
        for name, value in parts.items():
            metrics[name] = metrics.get(name, 0.0) + value / n
        pairs.append((x_m, out["x_hat"].detach(), rng_m))
        z_s = out["z_s"].detach().float()
        norm_sum, tokens = norm_sum + z_s.norm(dim=-1).sum(), tokens + z_s.shape[0] * z_s.shape[1]
    checks = {"G": tu.finite(metrics["loss"], tu.grad_norm(parameters(opt)))}
    if disc is not None:
        disc.requires_grad_(True)
        opt_d.zero_grad(set_to_none=True)
        d_total = 0.0
        for x_m, fake, rng_m in run.accumulate(disc_ddp, pairs):
            with tu.autocast(x_m.device, args.precision):
                d_loss = discriminator_loss(disc_ddp, x_m, fake, rng_m) / n
            d_loss.backward()
            d_total = d_total + d_loss.detach()
        checks["D"] = tu.finite(d_total, tu.grad_norm(parameters(opt_d)))
        metrics["d_loss"] = d_total
    ok = run.agree(checks, dict(metrics, lr=opt.param_groups[0]["lr"]), {"rho": (norm_sum, tokens)})
    if ok["G"]:
        opt.step()
    if ok.get("D"):
        opt_d.step()


def parameters(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


#################################################################################
#                                    Run                                        #
#################################################################################

def train(args):
    stage = dict(STAGES[args.stage], lr=args.lr or STAGES[args.stage]["lr"])
    _, world, device = tu.setup_distributed()
    out_dir = os.path.join(args.out, f"stage{args.stage}")
    run = tu.Run(out_dir, args, device)
    dataset = build_dataset(args)  # a missing or empty folder fails before any model is built
    run.plan(len(dataset), args.global_batch, args.epochs or stage["epochs"], args.max_steps)
    config = build_config(args)
    state = run.resume(lambda s, path: check_checkpoint(s, args.stage, config, path))
    start = state or previous_stage(args, config)

    tu.seed_everything(args.seed)  # identical models on every rank (the tests' random-trunk LPIPS too)
    ae = build_autoencoder(config).to(device)
    ae.encoder.stem.requires_grad_(stage["train_stem"])
    ae.encoder.vit.grad_checkpointing = ae.decoder.grad_checkpointing = args.grad_checkpoint
    disc = build_discriminator(config).to(device) if stage["gan"] else None
    lpips = build_lpips(pretrained=not args.random_lpips).to(device)
    opt = adamw([p for p in ae.parameters() if p.requires_grad], stage, device)
    opt_d = adamw(disc.parameters(), stage, device) if disc else None
    if start is not None:
        load_weights(ae, disc, start)
    if state is not None:
        load_optimizers(opt, opt_d, state, stage)
    if args.compile:  # in place: parameter names and checkpoints stay the same
        for module in [ae.decoder, ae.encoder.stem, *ae.encoder.vit.blocks]:
            module.compile()
    ae_ddp, disc_ddp = tu.ddp(ae, device), disc and tu.ddp(disc, device)
    grid = fixed_images(dataset, min(8, run.batch))

    trainable = sum(p.numel() for p in parameters(opt)) / 1e6
    tu.print0(f"stage {args.stage}: {trainable:.2f}M trainable params, {world} rank(s), global batch "
              f"{args.global_batch} ({run.batch // args.grad_accum} per rank × {args.grad_accum} micro-batches), "
              f"{run.total_steps} steps, lr {stage['lr']}, betas {stage['betas']}, out {out_dir}")
    ae_ddp.train()
    for step, x, _, rng in run.batches(dataset, desc=f"AE stage {args.stage}"):
        train_step(ae_ddp, disc_ddp, lpips, opt, opt_d, x, rng, stage, args, run)
        run.end_step(lambda: checkpoint_state(args, config, ae, disc, opt, opt_d, run.tally("rho")),
                     lambda step: save_reconstructions(ae, grid, os.path.join(out_dir, f"recon_{step:07d}.png"),
                                                       args.precision))
    if run.tally("rho") is not None:
        tu.print0(f"stage {args.stage}: mean token norm of z_S (rho) {run.tally('rho'):.4f}")
    tu.cleanup_distributed()
    return SimpleNamespace(ae=ae, disc=disc, stopped=run.stopped)


def adamw(params, stage, device):
    return torch.optim.AdamW(params, lr=stage["lr"], betas=stage["betas"], weight_decay=0.0,
                             fused=device.type == "cuda")


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


def save_reconstructions(ae, images, path, precision):
    device = next(ae.decoder.parameters()).device
    ae.eval()
    with torch.no_grad(), tu.autocast(device, precision):
        x_hat = ae(images.to(device))["x_hat"].float()
    ae.train()
    tu.save_image_grid(torch.cat([images.to(device), x_hat]), path, nrow=images.shape[0])


#################################################################################
#                         Checkpoints, stages and config                        #
#################################################################################

def checkpoint_state(args, config, ae, disc, opt, opt_d, rho):
    state = dict(kind="dino-sae-ae", stage=args.stage, args=vars(args), config=config, rho=rho,
                 stem=ae.encoder.stem.state_dict(), decoder=ae.decoder.state_dict(), opt=opt.state_dict())
    if disc is not None:
        state.update(disc=disc.state_dict(), opt_d=opt_d.state_dict())
    return state


def check_checkpoint(state, stage, config, path, from_stage=None):
    expected = stage if from_stage is None else from_stage
    if state.get("kind") != "dino-sae-ae":
        raise tu.DataError(f"{path} is not a DINO-SAE autoencoder checkpoint (written by train_ae.py)")
    if state["stage"] != expected:
        raise tu.DataError(f"{path} is a stage-{state['stage']} checkpoint; stage {stage} needs stage {expected}")
    for key in ARCHITECTURE_KEYS:
        if state["config"].get(key) != config[key]:
            raise tu.DataError(f"{path} was trained with {key}={state['config'].get(key)}, this run has {config[key]}")


def load_weights(ae, disc, state):
    ae.encoder.stem.load_state_dict(state["stem"])
    ae.decoder.load_state_dict(state["decoder"])
    if disc is not None and "disc" in state:
        disc.load_state_dict(state["disc"])


def load_optimizers(opt, opt_d, state, stage):
    opt.load_state_dict(state["opt"])
    if opt_d is not None:
        opt_d.load_state_dict(state["opt_d"])
    for optimizer in filter(None, (opt, opt_d)):  # this run's lr and betas, not the saved ones (--lr may change)
        for group in optimizer.param_groups:
            group.update(lr=stage["lr"], betas=stage["betas"])


def previous_stage(args, config):
    """Stage N > 1 starts from the newest checkpoint of stage N-1 (or --init); stage 1 and --from-scratch from
    random weights."""
    if args.stage == 1:
        return None
    source = args.init or os.path.join(args.out, f"stage{args.stage - 1}")
    if args.from_scratch and not os.path.exists(source):
        tu.print0(f"stage {args.stage} starts from scratch (--from-scratch)")
        return None
    if not os.path.exists(source):
        raise tu.MissingFileError(f"stage {args.stage} starts from the stage-{args.stage - 1} checkpoint, but {source} "
                                  "does not exist: train that stage first, pass --init, or --from-scratch")
    state, path = tu.load_checkpoint(source, "dino-sae-ae", "--init")
    check_checkpoint(state, args.stage, config, path, from_stage=args.stage - 1)
    tu.print0(f"stage {args.stage} starts from {path}")
    return state


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
    """Training images with random horizontal flips: an image folder, or synthetic images with the tiny preset."""
    if args.preset == "tiny" and not args.data:
        base = tu.SyntheticImages(num_items=args.num_images, image_size=image_size(args.preset), seed=args.seed)
    elif not args.data:
        raise tu.UsageError("--data is required (an ImageFolder, e.g. ImageNet train) unless --preset tiny")
    else:
        base = tu.ImageFolderDataset(args.data, image_size(args.preset))
    return tu.HorizontalFlip(base, args.seed)


def parse_args(argv=None):
    p = tu.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=[1, 2, 3, 4], required=True)
    p.add_argument("--preset", choices=["full", "tiny"], default="full",
                   help="tiny: synthetic 64px images, random tiny DINOv3 files, small decoder (CPU, minutes)")
    p.add_argument("--out", default=None, help="run folder; stage N writes <out>/stageN (default runs/ae, runs/tiny/ae)")
    p.add_argument("--init", help="checkpoint file or folder of the previous stage (default <out>/stage{N-1})")
    p.add_argument("--from-scratch", action="store_true", help="allow a stage > 1 to start without a previous stage")
    p.add_argument("--dino-weights", help=f"DINOv3 ViT-L/16 file (default {FULL_CONFIG['dino_weights']})")
    p.add_argument("--disc-weights", help=f"DINOv3 ViT-S/16 file for the discriminator (default "
                                          f"{FULL_CONFIG['disc_weights']})")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="default: the stage's lr of the paper")
    p.add_argument("--sample-every", type=int, default=2000)
    p.add_argument("--ckpt-every", type=int, default=2000)
    p.add_argument("--random-lpips", action="store_true",
                   help="LPIPS with a random VGG trunk: plumbing checks only, no VGG16 file needed")
    tu.add_run_args(p)
    args = p.parse_args(argv)
    tu.check_run_args(args)
    if args.preset == "tiny":  # a few dozen steps on CPU: fp32 (CPU bf16 is emulated), a large lr to see learning
        tiny = dict(out="runs/tiny/ae", global_batch=8, num_workers=0, log_every=10, sample_every=50, ckpt_every=50,
                    lr=5e-4, precision="fp32")
        if args.epochs is None:
            tiny["max_steps"] = 40
        tu.apply_preset(p, args, "tiny preset", tiny)
    args.out = args.out or "runs/ae"
    if args.lr is not None and args.lr <= 0:
        raise tu.UsageError(f"--lr must be positive, got {args.lr}")
    return args


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    tu.cli(main)
