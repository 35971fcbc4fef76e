"""Generation and reconstruction for evaluation (paper App. A and §4, SPEC §4-5).

Generation: the EMA DiT carries noise (t = 1) to latents (t = 0) with Euler + projection (Alg. 2) or Rodrigues
rotations (Alg. 1) on the spheres, or with plain Euler from Gaussian noise for a DiT trained by Euclidean flow matching;
classifier-free guidance acts on all channels inside a t interval; the DINO-SAE decoder turns latents into images.
Labels are class-balanced (sample i has class i mod K: 50 per class for 50k ImageNet samples) and sample i's noise
depends only on (seed, i), so the images do not depend on the number of ranks or the batch size. Output: an npz in the
ADM evaluator's format (`arr_0` uint8 [N,H,W,3] = clamp(127.5x + 128), `arr_1` the labels) and a PNG grid.

    torchrun --nproc_per_node=8 sample.py --dit runs/dit --num-samples 50000 --cfg-scale 1.0 --sampler euler-proj \\
        --steps 50 --out samples.npz
    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz

Reconstruction (rFID, PSNR): the ADM center crops of a folder's images and their DINO-SAE reconstructions, in the same
order, as <out>_originals.npz and <out>_reconstructions.npz.

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
from train_ae import FULL_CONFIG, TINY_CONFIG, load_autoencoder, print0

SAMPLERS = ("euler-proj", "rodrigues", "euler")
GRID_IMAGES = 64


#################################################################################
#                                  Generation                                   #
#################################################################################

def load_dit(path, device):
    """The EMA DiT of a train_dit.py checkpoint file or run folder (frozen, eval mode) -> (model, checkpoint)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"DiT checkpoint {path} does not exist: train one with train_dit.py or pass --dit")
    if os.path.isdir(path):
        state = tu.CheckpointManager(path).load("auto")
    else:
        state = tu.CheckpointManager(os.path.dirname(path) or ".").load(path)
    if state is None or state.get("kind") != "dino-sae-dit":
        raise ValueError(f"{path} holds no DiT checkpoint written by train_dit.py")
    model = DiT_models[state["model_name"]](**state["model_kwargs"])
    model.load_state_dict(state["ema"])
    return model.requires_grad_(False).eval().to(device), state


def class_balanced_labels(num_samples, num_classes):
    """Sample i has class i mod K: every class appears num_samples / K times (±1 when K does not divide it)."""
    return torch.arange(num_samples) % num_classes


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


def to_uint8(images):
    """[-1, 1] images [B,3,H,W] -> uint8 [B,H,W,3] on the CPU, as the ADM evaluator's samples: clamp(127.5x + 128)."""
    return (127.5 * images.float() + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def generate(args):
    rank, world, device = tu.setup_distributed()
    model, state = load_dit(args.dit, device)
    sampler = args.sampler or ("euler" if state["euclidean"] else "euler-proj")
    if (sampler == "euler") != state["euclidean"]:
        trained, use = ("Euclidean", "euler") if state["euclidean"] else ("Riemannian", "euler-proj or rodrigues")
        raise ValueError(f"{args.dit} was trained with {trained} flow matching: use --sampler {use}")
    ae = load_decoding_autoencoder(args.ae or state["ae"], model, device, args.dino_weights)
    radius, alpha = ae.encoder.radius, shift_alpha(model.input_size ** 2, model.in_channels)
    check_shares(args.num_samples, world)
    labels = class_balanced_labels(args.num_samples, model.num_classes)
    mine = list(range(rank, args.num_samples, world))
    print0(f"{args.num_samples} samples of {state['model_name']} (EMA, step {state['progress']['step']}), "
           f"{sampler} {args.steps} steps, CFG {args.cfg_scale} on t in {args.cfg_interval}, {world} rank(s)")
    images = []
    bar = tu.progress_bar(len(mine), desc="sampling")
    for start in range(0, len(mine), args.batch_size):
        indices = mine[start:start + args.batch_size]
        noise = initial_noise(indices, model, radius, state["euclidean"], args.seed, device)
        with torch.no_grad(), tu.autocast(device, args.precision):
            z = sample_latents(model, labels[indices].to(device), noise, radius, alpha, sampler, args.steps,
                               args.cfg_scale, tuple(args.cfg_interval))
            images.append(to_uint8(ae.decoder(z)))
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
        print0(f"wrote {args.out} (arr_0 {arr.shape} uint8) and its grid")
    tu.cleanup_distributed()


def load_decoding_autoencoder(path, model, device, dino_weights):
    if not os.path.exists(path):
        raise FileNotFoundError(f"autoencoder checkpoint {path} does not exist (the DiT checkpoint names the one it "
                                "was trained on): pass --ae")
    ae, config = load_autoencoder(path, device, dino_weights)
    latent = (ae.decoder.latent_channels, config["image_size"] // ae.encoder.vit.patch_size)
    if latent != (model.in_channels, model.input_size):
        raise ValueError(f"autoencoder {path} makes latents of {latent[0]} channels on a {latent[1]}² grid, the DiT "
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
        raise ValueError(f"--num-samples {num} exceeds the {len(dataset)} images of {args.data}")
    check_shares(num, world)
    ae, config = load_autoencoder(args.ae, device, args.dino_weights)
    if config["image_size"] != image_size(args):
        raise ValueError(f"autoencoder {args.ae} works on {config['image_size']}px images, not {image_size(args)}px")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=range(rank, num, world),
                                         num_workers=args.num_workers, collate_fn=collate_readable)
    size = config["image_size"]
    none = torch.empty(0, size, size, 3, dtype=torch.uint8)  # a rank may get unreadable images only
    originals, reconstructions = [none], [none]
    bar = tu.progress_bar(len(loader.sampler), desc="reconstructing")
    for x, n_skipped in loader:
        bar.update(len(x) + n_skipped)
        if len(x) == 0:
            continue
        x = x.to(device, non_blocking=True)
        with torch.no_grad(), tu.autocast(device, args.precision):
            x_hat = ae.decoder(ae.encoder.encode(x))
        originals.append(to_uint8(x))
        reconstructions.append(to_uint8(x_hat))
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
        print0(f"wrote {args.out}_originals.npz and {args.out}_reconstructions.npz: {len(arr)} images "
               f"({num - len(arr)} unreadable images skipped)")
    tu.cleanup_distributed()


def collate_readable(batch):
    """(images [B',3,H,W], n_skipped) without the unreadable images; unlike training's tu.collate_skip, a batch of
    unreadable images only (say, a last batch of one) is simply empty."""
    kept = [item[0] for item in batch if item is not None]
    return (torch.stack(kept) if kept else torch.empty(0)), len(batch) - len(kept)


def image_size(args):
    return TINY_CONFIG["image_size"] if args.preset == "tiny" else FULL_CONFIG["image_size"]


def recon_dataset(args):
    if args.data:
        return tu.ImageFolderDataset(args.data, image_size(args))  # ADM center crop, no flip
    if args.preset != "tiny":
        raise ValueError("--recon needs --data (an image folder, e.g. ImageNet val) unless --preset tiny")
    return tu.SyntheticImages(num_items=args.num_samples or GRID_IMAGES, image_size=image_size(args), seed=args.seed)


#################################################################################
#                                    Output                                     #
#################################################################################

def check_shares(num, world):
    if num < world:
        raise ValueError(f"{num} images cannot be shared by {world} ranks: use at least one image per rank")


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["full", "tiny"], default="full", help="tiny: defaults point at the tiny runs")
    p.add_argument("--recon", action="store_true", help="reconstruct --data with --ae instead of generating")
    p.add_argument("--dit", default=None, help="train_dit.py checkpoint file or run folder (default runs/dit, "
                                               "tiny: runs/tiny/dit)")
    p.add_argument("--ae", default=None, help="train_ae.py checkpoint file or stage folder (generation: default the "
                                              "one the DiT was trained on; --recon: runs/ae/stage4, tiny: "
                                              "runs/tiny/ae/stage4)")
    p.add_argument("--dino-weights", help="DINOv3 ViT-L/16 file, if not where the autoencoder checkpoint says")
    p.add_argument("--data", help="--recon: image folder (ImageNet val); synthetic images when omitted with "
                                  "--preset tiny")
    p.add_argument("--num-samples", type=int, default=None, help="default 50000 (tiny: 64); --recon: all images")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default euler-proj, or euler (the Euclidean baseline) for a DiT trained with --euclidean")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("T_LO", "T_HI"),
                   help="guide only where T_LO <= t <= T_HI (t = 1 noise, t = 0 data)")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default 64, tiny: 32)")
    p.add_argument("--num-workers", type=int, default=8, help="--recon data loader workers")
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
    tu.apply_preset(p, args, defaults)
    if args.num_samples is not None and args.num_samples < 1:
        p.error(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.recon and not args.out.endswith(".npz"):
        p.error(f"--out must be an .npz path for generation, got {args.out}")
    return args


def main(argv=None):
    args = parse_args(argv)
    return reconstruct(args) if args.recon else generate(args)


if __name__ == "__main__":
    main()
