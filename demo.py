"""The whole DINO-SAE pipeline on its embedded default, in a few minutes on a CPU: `python demo.py`.

Synthetic 64 px images; tiny DINOv3 ViTs with random weights, written in the official checkpoint layout and read back
by the real loader; a small DC-AE decoder; then the real code of every step:

  1. train_ae.py   stages 1-4 (alignment, GAN with the DINO discriminator, decoder refinement, noise augmentation)
  2. train_dit.py  a small LightningDiT by Riemannian flow matching on the spherical latents
  3. sample.py     Euler-with-projection samples (ADM npz + grid) and reconstructions of held-out images
  4. fid.py        gFID / IS / precision / recall and rFID / PSNR / SSIM / LPIPS
  5. probe.py      linear probe teacher vs student, PCA maps, and the magnitude experiment (§3.4)

Everything lands in --out (default runs/demo): PNG grids a person can look at and summary.json. With random weights
the numbers check the plumbing, not quality: the Inception network is a seeded random one, and so is LPIPS's VGG trunk
unless its file is in the torch hub cache (summary.json says which). Real recipes are in README.md.

SIGTERM or Ctrl-C stops the demo (a training stage first finishes its step and writes its checkpoint) with a non-zero
exit status; running it again continues where it stopped.
"""
import argparse
import json
import os
import signal
import sys
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

AE_STEPS = {1: 140, 2: 16, 3: 16, 4: 16}
DIT_STEPS = 400
NUM_SAMPLES = 32


class Stopped(Exception):
    def __init__(self, signum):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def stop_on_signal(signum, frame):
    raise Stopped(signum)


def heading(title):
    print(f"\n=== {title} ===", flush=True)


def train(main, argv):
    """One training stage; a signal ends it after its step's checkpoint, and then the whole demo."""
    result = main(argv)
    if result.stopped:
        raise Stopped(result.stopped)
    return result


def reference_images(path, num, seed):
    """Held-out synthetic images (another seed than training): the reference set of gFID."""
    data = tu.SyntheticImages(num_items=num, image_size=train_ae.image_size("tiny"), seed=seed)
    np.savez(path, arr_0=tu.to_uint8(torch.stack([data[i][0] for i in range(num)])).numpy())
    return path


def read_last_metrics(path):
    with open(path) as f:
        return json.loads(f.readlines()[-1])


def run(args):
    t0 = time.time()
    out = args.out
    ae_dir, dit_dir = os.path.join(out, "ae"), os.path.join(out, "dit")
    random_lpips = not os.path.isfile(vgg16_cache_path())

    for stage in (1, 2, 3, 4):
        heading(f"autoencoder stage {stage}/4")
        train(train_ae.main, ["--stage", str(stage), "--preset", "tiny", "--out", ae_dir,
                              "--max-steps", str(AE_STEPS[stage])] + (["--random-lpips"] if random_lpips else []))

    heading("diffusion transformer (Riemannian flow matching)")
    train(train_dit.main, ["--preset", "tiny", "--ae", os.path.join(ae_dir, "stage4"), "--out", dit_dir,
                           "--max-steps", str(DIT_STEPS), "--sample-every", str(DIT_STEPS)])

    heading("sampling and reconstruction")
    samples = os.path.join(out, "samples.npz")
    sample.main(["--preset", "tiny", "--dit", dit_dir, "--num-samples", str(NUM_SAMPLES), "--steps", "25",
                 "--out", samples])
    recon = os.path.join(out, "recon")
    sample.main(["--recon", "--preset", "tiny", "--ae", os.path.join(ae_dir, "stage4"),
                 "--num-samples", str(NUM_SAMPLES), "--out", recon])

    heading("metrics (seeded random Inception: plumbing check, not real FIDs)")
    net = fid.random_inception(seed=0)
    lpips_net = build_lpips(pretrained=not random_lpips)
    ref = reference_images(os.path.join(out, "reference.npz"), NUM_SAMPLES, seed=args.seed + 1)
    generation = fid.evaluate(samples, ref, net, cache=False)
    reconstruction = fid.evaluate(recon + "_reconstructions.npz", recon + "_originals.npz", net, paired=True,
                                  lpips_net=lpips_net, cache=False)

    heading("semantic preservation: linear probe, PCA maps, magnitude (§3.4)")
    ae, state = train_ae.load_autoencoder(os.path.join(ae_dir, "stage4"))
    size = state["config"]["image_size"]
    train_set = tu.SyntheticImages(num_items=256, image_size=size, seed=args.seed)
    val_set = tu.SyntheticImages(num_items=64, image_size=size, seed=args.seed + 1)
    loader = lambda data: tu.make_loader(data, 32, tu.ResumableSampler(len(data), 0, 1, 0, shuffle=False), 0)
    linear = probe.linear_probe(ae, loader(train_set), loader(val_set), torch.device("cpu"))
    images = torch.stack([val_set[i][0] for i in range(8)])
    pca_path, magnitude_path = os.path.join(out, "pca_maps.png"), os.path.join(out, "magnitude.png")
    probe.pca_maps(ae, images, pca_path)
    magnitude = probe.magnitude_table(ae, images, lpips_net)
    probe.magnitude_grid(ae, images, magnitude_path)
    print(probe.format_table(magnitude))

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
        "magnitude": magnitude,
        "images": {"reconstructions": os.path.join(ae_dir, "stage4", f"recon_{AE_STEPS[4]:07d}.png"),
                   "samples": os.path.join(out, "samples.png"),
                   "dit_training_grid": os.path.join(dit_dir, f"samples_{DIT_STEPS:07d}.png"),
                   "pca_maps": pca_path, "magnitude": magnitude_path, "reconstruction_pairs": recon + ".png"},
        "seconds": round(time.time() - t0, 1),
    }
    path = os.path.join(out, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    heading(f"done in {summary['seconds']:.0f} s")
    print(json.dumps({k: summary[k] for k in ("generation", "reconstruction", "linear_probe")}, indent=2))
    print(f"images: {', '.join(summary['images'].values())}\nsummary: {path}")
    return summary


def main(argv=None):
    parser = tu.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out reference images")
    args = parser.parse_args(argv)
    previous = {s: signal.signal(s, stop_on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return run(args)
    except Stopped as stop:
        print(f"demo.py: {stop}; the stage in progress wrote its checkpoint: run `python demo.py` again to continue",
              file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    tu.cli(main)
