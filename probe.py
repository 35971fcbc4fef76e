"""Semantic preservation and magnitude invariance of a trained DINO-SAE: does the student (the frozen DINOv3
transformer fed by the trained conv stem) still carry the teacher's semantics (paper Fig. 4 and its linear probe),
and how much of an image does the decoder take from the magnitude of z_S rather than from its direction (§3.4)?

  linear     linear probe top-1/top-5 on frozen teacher vs student features (paper: 89% -> 87% on ImageNet). Feature of
             an image (the standard DINO linear-probe feature): the normed cls token concatenated with the mean of the
             normed patch tokens, [2D]. Teacher: DINOv3 on the patch embedding; student: the same transformer on the
             stem's output. Recipe, identical for both (CLIP's protocol with a fixed L2 instead of a sweep):
             features standardised with the train set's mean and std, multinomial logistic regression (zero-initialised
             linear layer, mean cross-entropy + 1e-4/2·||W||²) fitted full-batch by L-BFGS until converged (at most
             1000 iterations), evaluated on val. Deterministic, with no learning rate or epoch budget to tune: the
             numbers measure linear separability rather than an optimiser's schedule.
  pca        PCA maps (Fig. 4): rows = images, columns image | teacher | student. One PCA per model, fitted on the
             patch tokens of all the shown images together (so colours are comparable across rows); the top-3
             components, each min-max scaled over those tokens, are the RGB channels; each student channel is
             sign-aligned with the teacher's; maps are upsampled with nearest to the image size.
  magnitude  §3.4 reports, as an observation on the trained autoencoder, that its reconstructions are "largely
             invariant to the magnitude of latent features"; §3.2 and §5 credit the magnitude, left free by the cosine
             alignment loss, for fine detail. Both are measured here: PSNR and LPIPS against the originals of decoding
             z_S itself (the reconstruction), its direction alone at the mean token norm, ρ·z_S/‖z_S‖ per token (what
             the generator's latents decode to), and k·z_S for k = 0.5, 0.75, 1.25, 1.5, 2. The k rows against the
             z_S row show how much a global change of magnitude costs; the direction row's gap to the z_S row is what
             the per-token magnitudes carry, and what generation from the spheres gives up. Printed as a table,
             written as JSON (--json) and as a PNG with the originals above one row per setting.

PSNR is per image on uint8 images (peak 255), averaged (fid.psnr); LPIPS (VGG) is on the same uint8 images, as
fid.py computes it. Usage:

    python probe.py linear --ae runs/ae/stage4 --train-data /data/imagenet/train --val-data /data/imagenet/val
    python probe.py pca --ae runs/ae/stage4 --data /data/imagenet/val --out pca_maps.png
    python probe.py magnitude --ae runs/ae/stage4 --data /data/imagenet/val --json magnitude.json --out magnitude.png
    python probe.py linear --preset tiny      # tiny AE of `train_ae.py --preset tiny`, synthetic images and labels
"""
import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import train_utils as tu
from fid import psnr
from losses import build_lpips, vgg16_cache_path
from model import imagenet_normalize
from train_ae import image_size, load_autoencoder


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision(device):
    """bf16 on CUDA; fp32 on CPU, where bf16 is emulated and slower."""
    return "bf16" if device.type == "cuda" else "fp32"


#################################################################################
#                               Linear probe                                    #
#################################################################################

def probe_feature(out):
    """Official DINO output dict -> cls token ⊕ mean of the patch tokens, [B, 2D]."""
    return torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1)], dim=-1).float()


@torch.no_grad()
def extract_features(ae, loader, device, progress=True):
    """Frozen features of every image of `loader` (yielding (x, y, n_skipped)) -> dict(teacher, student [N, 2D] float32,
    labels [N] int64), on CPU."""
    vit, stem = ae.encoder.vit, ae.encoder.stem
    feats = {"teacher": [], "student": [], "labels": []}
    for x, y, _ in tqdm(loader, desc="features", disable=not progress, dynamic_ncols=True):
        if not len(x):  # every image of the batch was unreadable
            continue
        x = imagenet_normalize(x.to(device))
        with tu.autocast(device, precision(device)):
            feats["teacher"].append(probe_feature(vit.forward_features(x)).cpu())
            feats["student"].append(probe_feature(vit.features_from_patches(stem(x))).cpu())
        feats["labels"].append(y)
    return {k: torch.cat(v) for k, v in feats.items()}


def check_probe_inputs(train_feats, train_labels, val_feats, val_labels):
    for name, f, y in (("train", train_feats, train_labels), ("val", val_feats, val_labels)):
        if f.ndim != 2 or y.ndim != 1 or f.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: expected features [N, D] and labels [N], got {list(f.shape)} and "
                             f"{list(y.shape)}")
        if y.numel() and y.min() < 0:
            raise ValueError(f"{name}: labels must be non-negative class indices")
    if train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(f"train features have dim {train_feats.shape[1]}, val features {val_feats.shape[1]}")
    if train_labels.unique().numel() < 2 or val_labels.numel() == 0:
        raise ValueError("the linear probe needs train images of at least 2 classes and at least one val image")


def train_linear_probe(train_feats, train_labels, val_feats, val_labels, l2=1e-4, max_iter=1000, device="cpu",
                       chunk=65536):
    """Fit the linear classifier of the module docstring on the train features -> dict(top1, top5) on val, as
    fractions. Top-5 is top-min(5, classes). The standardised train features sit on `device` (ImageNet, ViT-L:
    1.28M x 2048 fp32 = 10.5 GB); logits are computed `chunk` rows at a time."""
    check_probe_inputs(train_feats, train_labels, val_feats, val_labels)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6
    x, y = ((train_feats - mean) / std).to(device), train_labels.to(device)
    head = nn.Linear(x.shape[1], num_classes).to(device)
    nn.init.zeros_(head.weight)  # strictly convex objective: a fixed start and full batches make it deterministic
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad(set_to_none=True)
        total = 0.5 * l2 * head.weight.square().sum()
        total.backward()
        for xb, yb in zip(x.split(chunk), y.split(chunk)):  # backward per chunk: memory of one chunk's logits
            loss = F.cross_entropy(head(xb), yb, reduction="sum") / len(x)
            loss.backward()
            total = total.detach() + loss.detach()
        return total

    opt.step(closure)
    with torch.no_grad():
        top = torch.cat([head(((f - mean) / std).to(device)).topk(min(5, num_classes), dim=1).indices.cpu()
                         for f in val_feats.split(chunk)])
    hits = top == val_labels[:, None]
    return {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(1).float().mean().item()}


def linear_probe(ae, train_loader, val_loader, device, progress=True):
    """Teacher vs student linear probe -> {"teacher": {top1, top5}, "student": {top1, top5}, ...}."""
    train = extract_features(ae, train_loader, device, progress)
    val = extract_features(ae, val_loader, device, progress)
    result = {}
    for name in ("teacher", "student"):
        result[name] = train_linear_probe(train[name], train["labels"], val[name], val["labels"], device=device)
    return dict(result, num_train=len(train["labels"]), num_val=len(val["labels"]),
                feature_dim=train["teacher"].shape[1])


#################################################################################
#                                 PCA maps                                      #
#################################################################################

def pca_rgb(tokens, h, w):
    """Patch tokens [B, h·w, D] -> top-3 principal components as RGB maps [B, 3, h, w] in [0, 1].

    One PCA over all B·h·w tokens; each component's sign makes its largest loading positive (deterministic colours)
    and its projection is min-max scaled over all tokens."""
    if tokens.ndim != 3 or tokens.shape[1] != h * w or tokens.shape[2] < 3:
        raise ValueError(f"expected tokens [B, {h}*{w}, D>=3], got {list(tokens.shape)}")
    x = tokens.detach().reshape(-1, tokens.shape[2]).double().cpu()
    x = x - x.mean(0)
    _, vecs = torch.linalg.eigh(x.T @ x)  # eigenvalues ascending
    comps = vecs[:, -3:].flip(1)
    comps = comps * comps.gather(0, comps.abs().argmax(0, keepdim=True)).sign()
    proj = x @ comps
    lo, hi = proj.min(0).values, proj.max(0).values
    rgb = (proj - lo) / (hi - lo).clamp_min(1e-12)
    return rgb.float().reshape(tokens.shape[0], h, w, 3).permute(0, 3, 1, 2)


def align_signs(rgb, reference):
    """Flip (c -> 1 - c) each channel of rgb that anti-correlates with the same channel of reference: a component's
    sign is arbitrary, and matching it makes teacher and student maps comparable by eye."""
    a = rgb - rgb.mean((0, 2, 3), keepdim=True)
    b = reference - reference.mean((0, 2, 3), keepdim=True)
    flip = (a * b).sum((0, 2, 3), keepdim=True) < 0
    return torch.where(flip, 1 - rgb, rgb)


@torch.no_grad()
def pca_maps(ae, images, path):
    """Save the Fig. 4 grid for images [B, 3, H, W] in [-1, 1] to `path` -> the grid's images [3B, 3, H, W]."""
    device = next(ae.decoder.parameters()).device
    x = images.to(device)
    p = ae.encoder.vit.patch_size
    h, w = x.shape[2] // p, x.shape[3] // p
    with tu.autocast(device, precision(device)):
        z_t, z_s = ae.encoder.teacher_tokens(x), ae.encoder.student_tokens(x)
    teacher = pca_rgb(z_t, h, w)
    student = align_signs(pca_rgb(z_s, h, w), teacher)
    up = lambda rgb: F.interpolate(rgb, size=x.shape[2:], mode="nearest") * 2 - 1
    grid = torch.stack([images.float().cpu(), up(teacher), up(student)], dim=1).flatten(0, 1)
    tu.save_image_grid(grid, path, nrow=3)
    return grid


#################################################################################
#                           Magnitude invariance (§3.4)                         #
#################################################################################

MAGNITUDE_FACTORS = (0.5, 0.75, 1.25, 1.5, 2.0)


def decode_magnitudes(ae, x, factors=MAGNITUDE_FACTORS):
    """Images x [B, 3, H, W] in [-1, 1] -> {setting: decoded images [B, 3, H, W]}, in the order of the table."""
    z = ae.encoder.encode(x)
    decoded = {"z_S": ae.decoder(z),
               # through the generator's own image -> sphere -> image functions, so this row is what samples become
               "rho*z_S/|z_S|": ae.decode_sphere(ae.encode_sphere(x))}
    for k in factors:
        decoded[f"{k:g}*z_S"] = ae.decoder(k * z)
    return decoded


def as_pixels(images):
    """uint8 [B, H, W, 3] -> [-1, 1] float [B, 3, H, W], the inverse of tu.to_uint8 on the 256 levels."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def magnitude_table(ae, images, lpips_net=None, factors=MAGNITUDE_FACTORS, batch_size=32, progress=True):
    """PSNR and, given an LPIPS net on the autoencoder's device, LPIPS against images [N, 3, H, W] in [-1, 1] of each
    setting of decode_magnitudes, averaged over the images -> a JSON-serialisable dict: settings {name: {psnr,
    lpips (None without lpips_net)}}, rho, radius, num_images."""
    device = next(ae.decoder.parameters()).device
    scores = {}
    for x in tqdm(images.split(batch_size), desc="magnitude", disable=not progress, dynamic_ncols=True):
        x = x.to(device)
        with tu.autocast(device, precision(device)):
            decoded = decode_magnitudes(ae, x, factors)
        original = tu.to_uint8(x)  # metrics on the images as they would be saved
        for name, x_hat in decoded.items():
            row = scores.setdefault(name, {"psnr": [], "lpips": []})
            x_hat = tu.to_uint8(x_hat)
            row["psnr"].append(psnr(x_hat, original))
            if lpips_net is not None:
                row["lpips"].append(lpips_net(as_pixels(x_hat).to(device), as_pixels(original).to(device)).cpu())
    mean = lambda values: torch.cat(values).double().mean().item() if values else None
    settings = {name: {"psnr": mean(row["psnr"]), "lpips": mean(row["lpips"])} for name, row in scores.items()}
    return {"settings": settings, "rho": float(ae.rho), "radius": ae.radius, "num_images": len(images)}


@torch.no_grad()
def magnitude_grid(ae, images, path, factors=MAGNITUDE_FACTORS):
    """Save the originals above one row per setting of decode_magnitudes (one column per image) to `path` -> the
    grid's images [(1 + settings)·B, 3, H, W]."""
    device = next(ae.decoder.parameters()).device
    with tu.autocast(device, precision(device)):
        decoded = decode_magnitudes(ae, images.to(device), factors)
    grid = torch.cat([images.float().cpu(), *(x_hat.float().cpu() for x_hat in decoded.values())])
    tu.save_image_grid(grid, path, nrow=len(images))
    return grid


def format_table(table):
    lines = [f"{'setting':<14} | {'PSNR (dB)':>9} | {'LPIPS':>6}"]
    for name, row in table["settings"].items():
        lpips = "-" if row["lpips"] is None else f"{row['lpips']:.4f}"
        lines.append(f"{name:<14} | {row['psnr']:>9.2f} | {lpips:>6}")
    return "\n".join(lines)


#################################################################################
#                                     CLI                                       #
#################################################################################

def image_dataset(folder, preset, num_synthetic, seed):
    """An image folder (ADM center crop to the preset's size) or, without one (tiny preset), synthetic images."""
    if folder:
        return tu.ImageFolderDataset(folder, image_size(preset))
    return tu.SyntheticImages(num_items=num_synthetic, image_size=image_size(preset), seed=seed)


def eval_loader(dataset, args):
    """All images in order, the last partial batch included; unreadable images are dropped (tu.collate_skip)."""
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                       num_workers=args.num_workers, collate_fn=tu.collate_skip)


def spread(n, total):
    """n indices evenly spaced over range(total): every class of a sorted ImageFolder gets a turn."""
    return torch.linspace(0, total - 1, min(n, total)).round().long().unique().tolist()


def spread_images(dataset, n, args):
    """n images evenly spaced over the dataset, the unreadable ones dropped -> [n', 3, H, W]."""
    batches = [x for x, _, _ in eval_loader(torch.utils.data.Subset(dataset, spread(n, len(dataset))), args) if len(x)]
    if not batches:
        raise tu.DataError(f"none of the {min(n, len(dataset))} images picked from the data set could be read")
    return torch.cat(batches)


def load_ae(args, device):
    ae, state = load_autoencoder(args.ae, device, dino_weights=args.dino_weights)
    if state["config"]["image_size"] != image_size(args.preset):
        raise tu.DataError(f"--ae {state['path']} works on {state['config']['image_size']}px images, not the "
                           f"{image_size(args.preset)}px of --preset {args.preset}")
    return ae, state


def build_lpips_for(args, device):
    """-> (LPIPS net or None, what it is: said next to every LPIPS number)."""
    if args.random_lpips:
        torch.manual_seed(args.seed)  # the same random trunk, so the same numbers, on every run
        return build_lpips(pretrained=False).to(device), "random VGG16 trunk (--random-lpips): a plumbing check only"
    if os.path.isfile(vgg16_cache_path()):
        return build_lpips(pretrained=True).to(device), "pretrained VGG16"
    return None, (f"not computed: no VGG16 file at {vgg16_cache_path()} (--random-lpips: a random trunk, for "
                  "plumbing checks only)")


def write_json(result, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")


def run_linear(args, device):
    train = image_dataset(args.train_data, args.preset, args.num_images, seed=args.seed)
    val = image_dataset(args.val_data, args.preset, max(args.num_images // 4, 8), seed=args.seed + 1)
    if args.train_data and (train.classes != val.classes or len(train.classes) < 2):
        raise tu.DataError(f"{args.train_data} and {args.val_data} must have the same class subfolders, at least 2 "
                           f"(found {len(train.classes)} and {len(val.classes)}): labels are the sorted subfolder "
                           "names")
    ae, _ = load_ae(args, device)
    result = linear_probe(ae, eval_loader(train, args), eval_loader(val, args), device)
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(result, args.json)


def run_pca(args, device):
    dataset = image_dataset(args.data, args.preset, args.num_images, args.seed)
    ae, _ = load_ae(args, device)
    images = spread_images(dataset, args.num_images, args)
    pca_maps(ae, images, args.out)
    print(f"saved PCA maps of {len(images)} images (image | teacher | student) to {args.out}")


def run_magnitude(args, device):
    dataset = image_dataset(args.data, args.preset, args.num_images, args.seed)
    ae, state = load_ae(args, device)
    if ae.rho is None:
        raise tu.DataError(f"--ae {state['path']} has no mean token norm rho: it predates train_ae.py measuring it; "
                           "train or resume the stage once more to write it")
    lpips_net, lpips_kind = build_lpips_for(args, device)
    images = spread_images(dataset, args.num_images, args)
    table = dict(magnitude_table(ae, images, lpips_net, args.factors, args.batch_size), lpips_net=lpips_kind)
    print(format_table(table))
    print(f"{table['num_images']} images; rho = {table['rho']:.4f}, R = {table['radius']:.4f}; LPIPS: {lpips_kind}")
    shown = images[spread(args.show, len(images))]
    magnitude_grid(ae, shown, args.out, args.factors)
    print(f"saved {args.out}: {len(shown)} images; rows: originals, {', '.join(table['settings'])}")
    if args.json:
        write_json(table, args.json)


def parse_args(argv=None):
    p = tu.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ae", help="train_ae.py checkpoint file or stage folder (default runs/ae/stage4, "
                                     "runs/tiny/ae/stage4 with --preset tiny)")
    common.add_argument("--preset", choices=["full", "tiny"], default="full",
                        help="tiny: the tiny AE and, without image folders, synthetic images with their class labels")
    common.add_argument("--dino-weights", help="DINOv3 file, when it is no longer where the checkpoint's config says")
    common.add_argument("--batch-size", type=int, default=64, help="images per forward pass (tiny: 32)")
    common.add_argument("--num-workers", type=int, default=8, help="data loader workers (tiny: 0)")
    common.add_argument("--seed", type=int, default=0)
    linear = sub.add_parser("linear", parents=[common], help="linear probe, teacher vs student (JSON)")
    linear.add_argument("--train-data", help="ImageFolder with class subfolders (ImageNet train)")
    linear.add_argument("--val-data", help="ImageFolder with the same class subfolders (ImageNet val)")
    linear.add_argument("--num-images", type=int, default=512, help="synthetic train images (val: a quarter)")
    linear.add_argument("--json", help="also write the result to this file")
    pca = sub.add_parser("pca", parents=[common], help="PCA maps, image | teacher | student (PNG)")
    pca.add_argument("--data", help="image folder")
    pca.add_argument("--out", default="pca_maps.png")
    pca.add_argument("--num-images", type=int, default=8)
    magnitude = sub.add_parser("magnitude", parents=[common],
                               help="PSNR, LPIPS of decoding z_S, its direction at norm rho, and k·z_S (table, PNG)")
    magnitude.add_argument("--data", help="image folder (e.g. ImageNet val)")
    magnitude.add_argument("--factors", type=float, nargs="+", default=list(MAGNITUDE_FACTORS), metavar="K",
                           help="the k of the k·z_S rows")
    magnitude.add_argument("--num-images", type=int, default=256, help="images the table averages over")
    magnitude.add_argument("--show", type=int, default=8, help="images (columns) in the PNG")
    magnitude.add_argument("--out", default="magnitude.png")
    magnitude.add_argument("--random-lpips", action="store_true",
                           help="LPIPS with a random VGG trunk: plumbing checks only (default: the pretrained VGG16 "
                                "when its file is in the torch hub cache, else no LPIPS)")
    magnitude.add_argument("--json", help="also write the table to this file")
    args = p.parse_args(argv)
    if args.preset == "tiny":
        tu.apply_preset(sub.choices[args.command], args, "tiny preset", dict(batch_size=32, num_workers=0))
    args.ae = args.ae or ("runs/tiny/ae/stage4" if args.preset == "tiny" else "runs/ae/stage4")
    check_args(args)
    return args


def check_args(args):
    """Refuse flags that cannot work and inputs that are not there, before any model is loaded."""
    magnitude = args.command == "magnitude"
    for name in ["batch_size", "num_images"] + (["show"] if magnitude else []):
        value = getattr(args, name)
        if value < 1:
            raise tu.UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.num_workers < 0:
        raise tu.UsageError(f"--num-workers must be at least 0, got {args.num_workers}")
    if magnitude and (min(args.factors) <= 0 or len(set(args.factors)) < len(args.factors)):
        given = " ".join(f"{k:g}" for k in args.factors)
        raise tu.UsageError(f"--factors must be distinct and positive, got {given}")
    folders = [args.train_data, args.val_data] if args.command == "linear" else [args.data]
    if any(folders) and not all(folders):
        raise tu.UsageError("give both --train-data and --val-data (or neither, with --preset tiny)")
    if args.preset == "full" and not all(folders):
        raise tu.UsageError("an image folder is required (--data, or --train-data and --val-data) unless --preset "
                            "tiny")
    if not os.path.exists(args.ae):
        raise tu.MissingFileError(f"no autoencoder checkpoint at {args.ae}: train one with train_ae.py (stages 1-4; "
                                  "--preset tiny writes runs/tiny/ae/stage4) or pass --ae")


def main(argv=None):
    args = parse_args(argv)
    device = default_device()
    {"linear": run_linear, "pca": run_pca, "magnitude": run_magnitude}[args.command](args, device)


if __name__ == "__main__":
    tu.cli(main)
