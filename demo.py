"""The whole DINO-SAE pipeline on its embedded default, in minutes on a CPU: `python demo.py`.

Synthetic 64 px images; tiny DINOv3 ViTs with random weights, written in the official checkpoint layout and read back
by the real loader; a small DC-AE decoder; then the real code of every step:

  1. train_ae.py   stages 1-4 (alignment, GAN with the DINO discriminator, decoder refinement, noise augmentation)
  2. train_dit.py  a small LightningDiT by Riemannian flow matching on the spherical latents
  3. sample.py     Euler-with-projection samples (ADM npz + grid) and reconstructions of held-out images
  4. fid.py        gFID / IS / precision / recall and rFID / PSNR / SSIM / LPIPS
  5. probe.py      linear probe teacher vs student, PCA maps, magnitude invariance

Everything lands in --out (default runs/demo): PNG grids a person can look at and summary.json. With random weights
the numbers check the plumbing, not quality: the Inception network is a seeded random one, and so is LPIPS's VGG trunk
unless its file is in the torch hub cache (summary.json says which). Real recipes are in README.md.
"""
import argparse
import json
import os
import time

import numpy as np
import torch

import fid
import probe
import sample
import train_ae
import train_dit
import train_utils as tu
from losses import build_lpips, vgg16_cache_path

AE_STEPS = {1: 200, 2: 60, 3: 60, 4: 60}


def step(title):
    print(f"\n=== {title} ===", flush=True)


def run_autoencoder(out, random_lpips, steps):
    for stage in (1, 2, 3, 4):
        step(f"autoencoder stage {stage}/4")
        args = ["--stage", str(stage), "--preset", "tiny", "--out", out, "--max-steps", str(steps[stage])]
        train_ae.main(args + (["--random-lpips"] if random_lpips else []))


def reference_images(path, num, seed):
    """Held-out synthetic images (another seed than training) as the reference set of gFID and the probe's val set."""
    data = tu.SyntheticImages(num_items=num, image_size=train_ae.TINY_CONFIG["image_size"], seed=seed)
    images = torch.stack([data[i][0] for i in range(num)])
    np.savez(path, arr_0=sample.to_uint8(images).numpy())
    return path


def read_last_metrics(path):
    with open(path) as f:
        return json.loads(f.readlines()[-1])


def main(args):
    t0 = time.time()
    out = args.out
    ae_dir, dit_dir = os.path.join(out, "ae"), os.path.join(out, "dit")
    random_lpips = not os.path.isfile(vgg16_cache_path())
    torch.manual_seed(args.seed)

    run_autoencoder(ae_dir, random_lpips, AE_STEPS)

    step("diffusion transformer (Riemannian flow matching)")
    train_dit.main(["--preset", "tiny", "--ae", os.path.join(ae_dir, "stage4"), "--out", dit_dir,
                    "--max-steps", str(args.dit_steps), "--sample-every", str(args.dit_steps)])

    step("sampling and reconstruction")
    samples = os.path.join(out, "samples.npz")
    sample.main(["--preset", "tiny", "--dit", dit_dir, "--num-samples", str(args.num_samples), "--steps", "25",
                 "--out", samples])
    recon = os.path.join(out, "recon")
    sample.main(["--recon", "--preset", "tiny", "--ae", os.path.join(ae_dir, "stage4"),
                 "--num-samples", str(args.num_samples), "--out", recon])

    step("metrics (seeded random Inception: plumbing check, not real FIDs)")
    net = fid.random_inception(seed=0)
    lpips_net = build_lpips(pretrained=not random_lpips)
    ref = reference_images(os.path.join(out, "reference.npz"), args.num_samples, seed=args.seed + 1)
    generation = fid.evaluate(samples, ref, net)
    reconstruction = fid.evaluate(recon + "_reconstructions.npz", recon + "_originals.npz", net, paired=True,
                                  lpips_net=lpips_net)

    step("semantic preservation: linear probe, PCA maps, magnitude")
    ae, config = train_ae.load_autoencoder(os.path.join(ae_dir, "stage4"))
    size = config["image_size"]
    train_set = tu.SyntheticImages(num_items=256, image_size=size, seed=args.seed)
    val_set = tu.SyntheticImages(num_items=64, image_size=size, seed=args.seed + 1)
    loader = lambda data: tu.make_loader(data, 32, tu.ResumableSampler(len(data), 0, 1, 0, shuffle=False), 0)
    linear = probe.linear_probe(ae, loader(train_set), loader(val_set), torch.device("cpu"))
    images = torch.stack([val_set[i][0] for i in range(8)])
    pca_path = os.path.join(out, "pca_maps.png")
    probe.pca_maps(ae, images, pca_path)
    magnitude = probe.magnitude_psnr(ae, images, [0.5, 1.0, 2.0])

    summary = {
        "note": "tiny random-weight models on synthetic images: numbers check the pipeline, not the paper's quality",
        "inception": "seeded random (fid.random_inception)",
        "lpips_vgg": "random trunk" if random_lpips else "pretrained",
        "autoencoder": {f"stage{s}": read_last_metrics(os.path.join(ae_dir, f"stage{s}", "metrics.jsonl"))
                        for s in (1, 2, 3, 4)},
        "dit": read_last_metrics(os.path.join(dit_dir, "metrics.jsonl")),
        "generation": generation,
        "reconstruction": reconstruction,
        "linear_probe": linear,
        "magnitude_psnr": {str(k): v for k, v in magnitude.items()},
        "images": {"reconstructions": os.path.join(ae_dir, "stage4", f"recon_{AE_STEPS[4]:07d}.png"),
                   "samples": os.path.join(out, "samples.png"),
                   "dit_training_grid": os.path.join(dit_dir, f"samples_{args.dit_steps:07d}.png"),
                   "pca_maps": pca_path, "reconstruction_pairs": recon + ".png"},
        "seconds": round(time.time() - t0, 1),
    }
    path = os.path.join(out, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    step(f"done in {summary['seconds']:.0f} s")
    print(json.dumps({k: summary[k] for k in ("generation", "reconstruction", "linear_probe")}, indent=2))
    print(f"images: {', '.join(summary['images'].values())}\nsummary: {path}")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--dit-steps", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
