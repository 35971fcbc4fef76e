"""Generation and reconstruction for evaluation (paper App. A and §4).

Generation: the EMA DiT carries noise (t = 1) to latents (t = 0) with Euler + projection (Alg. 2) or Rodrigues
rotations (Alg. 1) on the spheres, or with plain Euler from Gaussian noise for a DiT trained by Euclidean flow matching;
classifier-free guidance acts on all channels inside a t interval; the DINO-SAE decoder turns the sphere points into
images (model.DinoSAE.decode_sphere; only the decoder is loaded). Labels are class-balanced by default (sample i has
class i mod K: 50 per class for 50k ImageNet samples, RAE's "equal" sampling) or drawn at random (`--label-sampling
random`, as DiT/ADM); sample i's noise depends only on (seed, i), so the images do not depend on the number of ranks or
the batch size. Output: an npz in the ADM evaluator's format (`arr_0` uint8 [N,H,W,3] = clamp(127.5x + 128), `arr_1`
the labels) and a PNG grid.

    torchrun --nproc_per_node=8 sample.py --dit runs/dit --num-samples 50000 --cfg-scale 1.0 --sampler euler-proj \\
        --steps 50 --out samples.npz
    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz

Reconstruction (rFID, PSNR): the ADM center crops of a folder's images and their DINO-SAE reconstructions (the decoder
reading z_S), in the same order, as <out>_originals.npz and <out>_reconstructions.npz.

    torchrun --nproc_per_node=8 sample.py --recon --ae runs/ae/stage4 --data /data/imagenet/val --out recon
    python fid.py recon_reconstructions.npz recon_originals.npz --paired

Each rank writes its share next to the output and rank 0 assembles the npz (one node, or a shared file system).
"""
import argparse
import os

import numpy as np
import torch

import train_utils as tu
from model import DiT_models
from rfm import guided_velocity, project_sphere, sample_euler, sample_euler_proj, sample_rodrigues, shift_alpha
from train_ae import image_size, load_autoencoder

SAMPLERS = ("euler-proj", "rodrigues", "euler")
GRID_IMAGES = 64


#################################################################################
#                                  Generation                                   #
#################################################################################

def load_dit(path, device):
    """The EMA DiT of a train_dit.py checkpoint file or run folder (frozen, eval mode) -> (model, checkpoint)."""
    state, _ = tu.load_checkpoint(path, "dino-sae-dit", "--dit")
    model = DiT_models[state["model_name"]](**state["model_kwargs"])
    model.load_state_dict(state["ema"])
    return model.requires_grad_(False).eval().to(device), state


def sample_labels(num_samples, num_classes, how, seed):
    """'equal': sample i has class i mod K (every class num_samples / K times, ±1); 'random': uniform, seeded."""
    if how == "equal":
        return torch.arange(num_samples) % num_classes
    return torch.randint(num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))


def initial_noise(indices, model, radius, euclidean, seed, device):
    """Noise [len(indices), C, h, w] at t = 1: sample i's from a generator seeded by (seed, i). Uniform on the sphere
    (R·ε/‖ε‖ per token) for RFM, ε ~ N(0, I) for the Euclidean baseline."""
    shape = (model.in_channels, model.input_size, model.input_size)
    eps = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 2 ** 32 + i))
                       for i in indices]).to(device)
    return eps if euclidean else project_sphere(eps, radius)


def sample_latents(model, labels, noise, radius, alpha, sampler, steps, cfg_scale=1.0, interval=(0.0, 1.0)):
    """Integrate the DiT's velocity from noise (t = 1) to latents (t = 0) on the shifted time grid (App. A)."""
    network = lambda x, t, y: model(x, t, y).float()  # guidance and geometry in fp32 under bf16 autocast
    spherical = sampler != "euler"
    velocity = guided_velocity(network, labels, cfg_scale, radius if spherical else None, interval, model.null_class)
    if sampler == "euler-proj":
        return sample_euler_proj(velocity, noise, radius, alpha, steps)  # Alg. 2
    if sampler == "rodrigues":
        return sample_rodrigues(velocity, noise, radius, alpha, steps)  # Alg. 1
    return sample_euler(velocity, noise, alpha, steps)


def generate(args):
    rank, world, device = tu.setup_distributed()
    check_shares(args.num_samples, world)
    model, state = load_dit(args.dit, device)
    sampler = args.sampler or ("euler" if state["euclidean"] else "euler-proj")
    if (sampler == "euler") != state["euclidean"]:
        trained, use = ("Euclidean", "euler") if state["euclidean"] else ("Riemannian", "euler-proj or rodrigues")
        raise tu.UsageError(f"{args.dit} was trained with {trained} flow matching: use --sampler {use}")
    ae = load_decoder(args.ae or state["ae"], model, device)
    alpha = shift_alpha(model.input_size ** 2, model.in_channels)
    labels = sample_labels(args.num_samples, model.num_classes, args.label_sampling, args.seed)
    mine = list(range(rank, args.num_samples, world))
    tu.print0(f"{args.num_samples} samples of {state['model_name']} (EMA, step {state['progress']['step']}), "
              f"{sampler} {args.steps} steps, CFG {args.cfg_scale} on t in {args.cfg_interval}, "
              f"{args.label_sampling} labels, {world} rank(s)")
    images = []
    bar = tu.progress_bar(len(mine), desc="sampling")
    for start in range(0, len(mine), args.batch_size):
        indices = mine[start:start + args.batch_size]
        noise = initial_noise(indices, model, ae.radius, state["euclidean"], args.seed, device)
        with torch.no_grad(), tu.autocast(device, args.precision):
            z = sample_latents(model, labels[indices].to(device), noise, ae.radius, alpha, sampler, args.steps,
                               args.cfg_scale, tuple(args.cfg_interval))
            images.append(tu.to_uint8(ae.decode_sphere(z)))
        bar.update(len(indices))
    bar.close()
    images = torch.cat(images).numpy()
    shards = write_shards(args.out, {"arr_0": images}, rank, world)
    if tu.is_main():
        arr = np.empty((args.num_samples, *images.shape[1:]), dtype=np.uint8)
        for r, part in enumerate(read_shards(shards, "arr_0")):
            arr[r::world] = part  # rank r made samples r, r + W, r + 2W, ...
        save_npz(args.out, arr_0=arr, arr_1=labels.numpy())
        save_grid(arr[:GRID_IMAGES], args.out[:-len(".npz")] + ".png")
        remove(shards)
        tu.print0(f"wrote {args.out} (arr_0 {arr.shape} uint8) and its grid")
    tu.cleanup_distributed()


def load_decoder(path, model, device):
    """The decoder (and ρ) of the autoencoder the DiT was trained on; the DINOv3 encoder is not needed to sample."""
    ae, state = load_autoencoder(path, device, encoder=False, what="--ae")
    latent = (ae.decoder.latent_channels, state["config"]["image_size"] // 16)
    if latent != (model.in_channels, model.input_size):
        raise tu.DataError(f"--ae {path} makes latents of {latent[0]} channels on a {latent[1]}² grid, the DiT "
                           f"expects {model.in_channels} on {model.input_size}²")
    return ae


#################################################################################
#                                Reconstruction                                 #
#################################################################################

def reconstruct(args):
    rank, world, device = tu.setup_distributed()
    dataset = recon_dataset(args)  # a missing or empty folder fails before any model is built
    num = args.num_samples or len(dataset)
    if num > len(dataset):
        raise tu.UsageError(f"--num-samples {num} exceeds the {len(dataset)} images of {args.data}")
    check_shares(num, world)
    ae, state = load_autoencoder(args.ae, device, args.dino_weights)
    if state["config"]["image_size"] != image_size(args.preset):
        raise tu.DataError(f"--ae {args.ae} works on {state['config']['image_size']}px images, not "
                           f"{image_size(args.preset)}px")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=range(rank, num, world),
                                         num_workers=args.num_workers, collate_fn=tu.collate_skip)
    size = state["config"]["image_size"]
    none = torch.empty(0, size, size, 3, dtype=torch.uint8)  # a rank may get unreadable images only
    originals, reconstructions = [none], [none]
    bar = tu.progress_bar(len(loader.sampler), desc="reconstructing")
    for x, _, n_skipped in loader:
        bar.update(len(x) + n_skipped)
        if len(x) == 0:
            continue
        x = x.to(device, non_blocking=True)
        with torch.no_grad(), tu.autocast(device, args.precision):
            x_hat = ae(x)["x_hat"]
        originals.append(tu.to_uint8(x))
        reconstructions.append(tu.to_uint8(x_hat))
    bar.close()
    shard = {"originals": torch.cat(originals).numpy(), "reconstructions": torch.cat(reconstructions).numpy()}
    shards = write_shards(args.out + ".npz", shard, rank, world)
    if tu.is_main():
        grid = []
        for key in shard:  # concatenated rank by rank for both keys: the pairs stay aligned
            arr = np.concatenate(list(read_shards(shards, key)))
            save_npz(f"{args.out}_{key}.npz", arr_0=arr)
            grid.append(arr[:GRID_IMAGES // 2])
        save_grid(np.concatenate(grid), args.out + ".png")
        remove(shards)
        tu.print0(f"wrote {args.out}_originals.npz and {args.out}_reconstructions.npz: {len(arr)} images "
                  f"({num - len(arr)} unreadable images skipped)")
    tu.cleanup_distributed()


def recon_dataset(args):
    if args.data:
        return tu.ImageFolderDataset(args.data, image_size(args.preset))  # ADM center crop, no flip
    if args.preset != "tiny":
        raise tu.UsageError("--recon needs --data (an image folder, e.g. ImageNet val) unless --preset tiny")
    return tu.SyntheticImages(num_items=args.num_samples or GRID_IMAGES, image_size=image_size(args.preset),
                              seed=args.seed)


#################################################################################
#                                    Output                                     #
#################################################################################

def check_shares(num, world):
    if num < world:
        raise tu.UsageError(f"{num} images cannot be shared by {world} ranks: use at least one image per rank")


def write_shards(out, arrays, rank, world):
    """Every rank writes its arrays next to `out` -> the shard paths of all ranks, complete once this returns."""
    paths = [f"{out}.shard{r}of{world}.npz" for r in range(world)]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_npz(paths[rank], **arrays)
    tu.barrier()
    return paths


def read_shards(paths, key):
    """Array `key` of each shard in rank order, loaded one at a time (50k images are 9.8 GB)."""
    for path in paths:
        with np.load(path) as f:
            yield f[key]


def remove(paths):
    for path in paths:
        os.remove(path)


def save_npz(path, **arrays):
    """Written through a temp file and renamed: an interrupted job never leaves a truncated npz under its name."""
    with open(path + ".part", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".part", path)


def save_grid(images, path):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    tu.save_image_grid(x, path, nrow=8)


def parse_args(argv=None):
    p = tu.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["full", "tiny"], default="full", help="tiny: defaults point at the tiny runs")
    p.add_argument("--recon", action="store_true", help="reconstruct --data with --ae instead of generating")
    p.add_argument("--dit", default=None, help="train_dit.py checkpoint file or run folder (default runs/dit, "
                                               "tiny: runs/tiny/dit)")
    p.add_argument("--ae", default=None, help="train_ae.py checkpoint file or stage folder (generation: default the "
                                              "one the DiT was trained on; --recon: runs/ae/stage4, tiny: "
                                              "runs/tiny/ae/stage4)")
    p.add_argument("--dino-weights", help="--recon: DINOv3 ViT-L/16 file, if not where the autoencoder checkpoint says")
    p.add_argument("--data", help="--recon: image folder (ImageNet val); synthetic images when omitted with "
                                  "--preset tiny")
    p.add_argument("--num-samples", type=int, default=None, help="default 50000 (tiny: 64); --recon: all images")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default euler-proj, or euler (the Euclidean baseline) for a DiT trained with --euclidean")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale w >= 0 (1: none)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("T_LO", "T_HI"),
                   help="guide only where T_LO <= t <= T_HI (t = 1 noise, t = 0 data)")
    p.add_argument("--label-sampling", choices=["equal", "random"], default="equal",
                   help="equal: class i mod K for sample i (RAE); random: uniform labels (DiT/ADM)")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default 64, tiny: 32)")
    p.add_argument("--num-workers", type=int, default=None, help="--recon data loader workers (default 8, tiny: 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype (default bf16, tiny: fp32)")
    p.add_argument("--out", default=None, help="npz path (default samples.npz); --recon: prefix of "
                                               "<out>_originals.npz and <out>_reconstructions.npz (default recon)")
    args = p.parse_args(argv)
    tiny = args.preset == "tiny"
    defaults = dict(dit="runs/tiny/dit" if tiny else "runs/dit", batch_size=32 if tiny else 64,
                    precision="fp32" if tiny else "bf16",  # CPU bf16 is emulated: slower than fp32
                    num_workers=0 if tiny else 8)
    if args.recon:
        defaults.update(ae="runs/tiny/ae/stage4" if tiny else "runs/ae/stage4",
                        out="runs/tiny/recon" if tiny else "recon")
    else:
        defaults.update(num_samples=GRID_IMAGES if tiny else 50000,
                        out="runs/tiny/samples.npz" if tiny else "samples.npz")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_args(args)
    return args


def check_args(args):
    """Refuse flag values that cannot work, before any model is loaded."""
    for name in ("num_samples", "batch_size", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise tu.UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.cfg_scale < 0:
        raise tu.UsageError(f"--cfg-scale must be >= 0 (1 is no guidance), got {args.cfg_scale}")
    t_lo, t_hi = args.cfg_interval
    if not 0 <= t_lo <= t_hi <= 1:
        raise tu.UsageError(f"--cfg-interval needs 0 <= T_LO <= T_HI <= 1, got {t_lo} {t_hi}")
    if not args.recon and not args.out.endswith(".npz"):
        raise tu.UsageError(f"--out must be an .npz path for generation, got {args.out}")


def main(argv=None):
    args = parse_args(argv)
    return reconstruct(args) if args.recon else generate(args)


if __name__ == "__main__":
    tu.cli(main)
