"""Evaluation metrics (paper §4): FID, sFID, IS, precision/recall of samples; rFID, PSNR, SSIM, LPIPS of
reconstructions. Numbers follow the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`) computed with
pytorch-fid's PyTorch port of the TF "inception-2015-12-05" network.

Inception weights: `pt_inception-2015-12-05-6726825d.pth` (FID_WEIGHTS_URL below), looked up in the folder
$DINO_SAE_WEIGHTS, or ./weights when that variable is unset; `--inception PATH` overrides both. `--random-inception`
(and, with --paired, `--random-lpips`) try the script without weights files: plumbing-only numbers.

Usage:
    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz            # FID, sFID, IS, precision, recall
    python fid.py recons.npz /data/imagenet/val --paired --json out.json  # + PSNR, SSIM, LPIPS (rFID = FID here)

SAMPLES is an npz with `arr_0` uint8 [N,H,W,3], N >= 10. REF is an ADM reference batch (its `mu`, `sigma`, `mu_s`,
`sigma_s` are used as given, its `arr_0` images give the precision/recall features), an image npz of the samples'
size, an image folder (ADM center crop to the sample size, files in sorted path order), or a statistics file written
by this script. In paired mode REF holds the originals in the order of the reconstructions. Inputs are checked from
their headers before any network is built.

Statistics computed from REF's images are cached next to it as `<REF minus .npz>_<preprocess>[_<size>px]_fidstats.npz`
and reused only while the Inception weights, the preprocessing and the sha256 of REF's bytes (of a folder: of its
image files in sorted order) are those they were made from; otherwise they are recomputed. `--no-cache` neither
reads nor writes the cache.
"""
import argparse
import hashlib
import json
import os
import sys
import zipfile
from contextlib import contextmanager, suppress

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.special import xlogy
from tqdm import tqdm

import train_utils as tu
from losses import build_lpips

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
# Inception-score splits (the ADM evaluator's 5000-image splits of 50k samples) and the k of the precision/recall radii
IS_SPLITS, PR_K = 10, 3

# ---------------------------------------------------------------------------------------------------------------------
# The FID Inception: torchvision's Inception3 layout and key names with pytorch-fid's changes (TF semantics).


class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TF's average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        # The TF graph's last block (Mixed_7c) max-pools here; every other block average-pools.
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, b3dbl, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """Input: preprocessed images [B,3,299,299] in [-1,1]. Output: pool3 [B,2048], sFID spatial [B,2023],
    logits [B,1008]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the bias is stored in the file but unused, as in the ADM evaluator

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))
        # sFID reads TF's "mixed_6/conv" (= Mixed_6d.branch1x1, the first 192 channels of the block's output):
        # 7 channels of the 17x17 map, flattened in TF's (h, w, c) order -> 2023.
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = x.mean((2, 3))
        return pool, spatial, pool @ self.fc.weight.T


def default_inception_path():
    return os.path.join(os.environ.get("DINO_SAE_WEIGHTS", "weights"), FID_WEIGHTS_NAME)


def load_inception(path=None):
    """Frozen eval-mode FID Inception from pytorch-fid's file (with or without BatchNorm `num_batches_tracked`)."""
    path = os.fspath(path or default_inception_path())
    expected = f"the pytorch-fid Inception state dict {FID_WEIGHTS_NAME} (download {FID_WEIGHTS_URL})"
    if not os.path.isfile(path):
        raise tu.MissingFileError(f"--inception: FID Inception weights not found at {path}: download {FID_WEIGHTS_URL}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever a damaged file raises, torch's text advises weights_only=False: wrong here
        raise tu.DataError(f"--inception {path} is unreadable ({type(error).__name__}): expected {expected}") from None
    net = FIDInception()
    mismatch = state_dict_mismatch(state, net)
    if mismatch:
        raise tu.DataError(f"--inception {path} is not {expected}: {mismatch}")
    net.load_state_dict(state, strict=False)
    return net.requires_grad_(False).eval()


def state_dict_mismatch(state, net):
    """What keeps `state` from loading into `net` (BatchNorm `num_batches_tracked` aside), or '' if nothing."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return f"it holds a {type(state).__name__}, not a dict of tensors"
    want = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    have = {k: v.shape for k, v in state.items() if not k.endswith("num_batches_tracked")}
    problems = {"missing": sorted(want.keys() - have.keys()), "unexpected": sorted(have.keys() - want.keys()),
                "of another shape": sorted(k for k in want.keys() & have.keys() if want[k] != have[k])}
    return "; ".join(f"{what} {keys[:5]}" for what, keys in problems.items() if keys)


@torch.no_grad()
def random_inception(seed=0):
    """Seeded random FID Inception in a stable regime (He-normal convs, BatchNorm near identity with random running
    statistics): for tests and CPU demos. Its numbers are not FIDs of the real network."""
    g = torch.Generator().manual_seed(seed)
    net = FIDInception()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.normal_(0, (2 / fan_in) ** 0.5, generator=g)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.normal_(1, 0.1, generator=g)
            m.bias.normal_(0, 0.1, generator=g)
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.8, 1.2, generator=g)
    net.fc.weight.normal_(0, 2048 ** -0.5, generator=g)
    net.fc.bias.zero_()
    return net.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing: uint8 [B,3,H,W] as float 0..255 -> [B,3,299,299] in [-1,1]


def resize_tf1(x, size):
    """TF1 `ResizeBilinear` (align_corners=False, legacy, no half-pixel centres): source coordinate = dst·in/out.

    Replicate-padding the right/bottom edge by one pixel and resizing with align_corners=True to size+1 gives the same
    coordinates (dst·in/out) and the same edge clamping; the extra row/column is cropped off.
    """
    h, w = size if isinstance(size, tuple) else (size, size)
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    return F.interpolate(x, size=(h + 1, w + 1), mode="bilinear", align_corners=True)[..., :h, :w]


def preprocess_adm(x):
    """The TF graph of the ADM evaluator: bilinear TF1 resize of 0..255 floats, then (x - 128) / 128."""
    return (resize_tf1(x, 299) - 128) / 128


def preprocess_pytorch_fid(x):
    """pytorch-fid: [0,1] images, F.interpolate bilinear (align_corners=False) to 299, then 2x - 1."""
    return 2 * F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1


PREPROCESS = {"adm": preprocess_adm, "pytorch-fid": preprocess_pytorch_fid}


def check_images(images, name="images"):
    if (len(images.shape) != 4 or images.shape[0] == 0 or images.shape[-1] != 3
            or str(images.dtype) not in ("uint8", "torch.uint8")):
        raise ValueError(f"{name}: expected uint8 [N,H,W,3] with N > 0, got {images.dtype} {tuple(images.shape)}")


@contextmanager
def exact_fp32():
    """TF32 matmuls/convs off and autocast off, restoring the caller's settings afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def inception_features(net, images, batch_size=50, preprocess="adm", progress=True):
    """uint8 [N,H,W,3] (numpy, tensor or anything sliceable with .shape/.dtype) -> dict of float32 numpy arrays
    `pool` [N,2048], `logits` [N,1008], `spatial` [N,2023]. Runs on the device of `net`."""
    check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {list(PREPROCESS)}, got {preprocess!r}")
    device = next(net.parameters()).device
    outputs = []
    with exact_fp32():
        for i in tqdm(range(0, len(images), batch_size), desc="inception", disable=not progress):
            x = torch.as_tensor(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float()
            outputs.append([t.cpu() for t in net(PREPROCESS[preprocess](x))])
    pool, spatial, logits = (torch.cat(t).numpy() for t in zip(*outputs))
    return {"pool": pool, "logits": logits, "spatial": spatial}


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def feature_stats(feats):
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """‖μ1 − μ2‖² + Tr Σ1 + Tr Σ2 − 2 Tr √(Σ1Σ2) in float64.

    With Σ1 = AAᵀ (A = V√Λ from eigh), Σ1Σ2 has the eigenvalues of the symmetric PSD matrix AᵀΣ2A, so
    Tr √(Σ1Σ2) = Σ √eig(AᵀΣ2A). Same number as scipy.linalg.sqrtm(Σ1Σ2) of pytorch-fid / ADM (2e-15 relative at
    2048-d) but ~7x faster, and exact for the singular covariances of small sample sets, where sqrtm is slower still
    and needs an offset.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    if not (np.allclose(sigma1, sigma1.T) and np.allclose(sigma2, sigma2.T)):
        raise ValueError("frechet_distance: covariance matrices must be symmetric")
    w, v = np.linalg.eigh(sigma1)
    a = v * np.sqrt(w.clip(min=0))
    tr_covmean = np.sqrt(np.linalg.eigvalsh(a.T @ sigma2 @ a).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, splits=IS_SPLITS):
    """exp E_x KL(p(y|x) ‖ p(y)) over `splits` sequential splits, averaged. Written as exp(H(p(y)) − E H(p(y|x))),
    the same number without log(0) for classes a split never predicts."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"inception_score: need [N,classes] logits with N >= splits={splits}, "
                         f"got {tuple(logits.shape)}")
    scores = []
    for p in np.array_split(torch.softmax(logits, 1).numpy(), splits):
        p_y = p.mean(0)
        scores.append(np.exp(-xlogy(p_y, p_y).sum() + xlogy(p, p).sum(1).mean()))
    return float(np.mean(scores))


def knn_radii(feats, k, batch_size=1000):
    """Distance of each point to its k-th nearest neighbour within the set (index 0 of the sorted row is itself)."""
    return torch.cat([torch.cdist(feats[i:i + batch_size], feats).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(feats), batch_size)])


def fraction_inside(x, centres, radii, batch_size=1000):
    """Fraction of points of x inside at least one ball (centre, radius) of the other set's k-NN manifold."""
    inside = [(torch.cdist(x[i:i + batch_size], centres) <= radii).any(1) for i in range(0, len(x), batch_size)]
    return torch.cat(inside).double().mean().item()


@torch.no_grad()
def precision_recall(ref_feats, sample_feats, k=PR_K):
    """Improved precision/recall (Kynkäänniemi et al. 2019, k-NN radii as in the ADM evaluator) -> (precision, recall):
    precision = share of samples inside the reference manifold, recall = share of references inside the samples'."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref, smp = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device) for f in (ref_feats, sample_feats))
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1] or min(len(ref), len(smp)) <= k:
        raise ValueError(f"precision_recall: need two [N,D] feature sets with N > k={k}, "
                         f"got {tuple(ref.shape)} and {tuple(smp.shape)}")
    with exact_fp32():
        precision = fraction_inside(smp, ref, knn_radii(ref, k))
        recall = fraction_inside(ref, smp, knn_radii(smp, k))
    return precision, recall


def paired_uint8(a, b):
    check_images(a, "a")
    check_images(b, "b")
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"paired images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.as_tensor(a).double(), torch.as_tensor(b).double()


def psnr(a, b):
    """Per-image PSNR (peak 255) of two uint8 [N,H,W,3] batches -> float64 [N]; identical images give inf."""
    a, b = paired_uint8(a, b)
    mse = (a - b).square().flatten(1).mean(1)
    return 10 * torch.log10(255 ** 2 / mse)


def gaussian_window(size=11, sigma=1.5):
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - size // 2) ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a, b):
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, σ 1.5, K1 0.01, K2 0.03, L 255, valid region) of two
    uint8 [N,H,W,3] batches, averaged over positions and channels -> float64 [N]."""
    x, y = (t.permute(0, 3, 1, 2) for t in paired_uint8(a, b))
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"ssim: images must be at least 11x11, got {tuple(x.shape[-2:])}")
    g = gaussian_window().to(x.device)
    wy, wx = g.view(1, 1, 11, 1).repeat(3, 1, 1, 1), g.view(1, 1, 1, 11).repeat(3, 1, 1, 1)

    def blur(t):  # separable Gaussian filter, per channel
        return F.conv2d(F.conv2d(t, wy, groups=3), wx, groups=3)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def paired_metrics(recons, originals, lpips_net, batch_size=50, progress=True):
    """Means over images of PSNR, SSIM and LPIPS (lpips_net takes two [-1,1] batches, runs on its own device)."""
    if len(recons) != len(originals):
        raise ValueError(f"paired mode: {len(recons)} reconstructions but {len(originals)} originals")
    device = next(lpips_net.parameters()).device
    values = {"psnr": [], "ssim": [], "lpips": []}
    with exact_fp32():
        for i in tqdm(range(0, len(recons), batch_size), desc="psnr/ssim/lpips", disable=not progress):
            a, b = (torch.as_tensor(t[i:i + batch_size]).to(device) for t in (recons, originals))
            values["psnr"].append(psnr(a, b).cpu())
            values["ssim"].append(ssim(a, b).cpu())
            a, b = (t.permute(0, 3, 1, 2).float() / 127.5 - 1 for t in (a, b))
            values["lpips"].append(lpips_net(a, b).flatten().double().cpu())
    return {k: torch.cat(v).mean().item() for k, v in values.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Images and input checks

def image_files(root):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                  if f.lower().endswith(tu.IMAGE_EXTENSIONS))


class ImageFolder:
    """The images under `root` (recursively, sorted paths), read lazily and center-cropped to size x size; sliceable
    like a uint8 [N,size,size,3] array so that large folders never sit in memory at once."""

    def __init__(self, root, size):
        self.paths = image_files(root)
        if not self.paths:
            raise tu.MissingFileError(f"no images ({', '.join(tu.IMAGE_EXTENSIONS)}) under {root}")
        self.shape, self.dtype = (len(self.paths), size, size, 3), np.dtype(np.uint8)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        if not isinstance(index, slice):
            raise TypeError(f"ImageFolder supports slices only, got {type(index).__name__}")
        return np.stack([self.read(path) for path in self.paths[index]])

    def read(self, path):
        try:
            with Image.open(path) as im:
                return np.asarray(tu.center_crop_arr(im.convert("RGB"), self.shape[1]))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # PIL's decode errors
            raise tu.DataError(f"{path}: unreadable image ({type(error).__name__}: {error})") from None


def npz_keys(path):
    """Names of the arrays in an npz file, read from its zip directory without loading any array."""
    if os.path.isdir(path):
        raise tu.DataError(f"{path} is a folder, not an npz file")
    if not os.path.isfile(path):
        raise tu.MissingFileError(f"no such file: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            return [name[:-len(".npy")] for name in archive.namelist() if name.endswith(".npy")]
    except zipfile.BadZipFile:
        raise tu.DataError(f"{path} is not an npz file (an np.savez archive)") from None


def npz_header(path, key):
    """(shape, dtype) of the array `key` of an npz file, read from its .npy header without loading the array."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def npz_image_shape(path):
    """(N, H, W) of the uint8 [N,H,W,3] images `arr_0` of an npz file, checked from its header."""
    keys = npz_keys(path)
    if "arr_0" not in keys:
        raise tu.DataError(f"{path} has no images (key arr_0) and is not a statistics file of fid.py; "
                           f"its keys are {keys}")
    shape, dtype = npz_header(path, "arr_0")
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
        raise tu.DataError(f"{path}: arr_0 should hold uint8 [N,H,W,3] images, it is {dtype} {list(shape)}")
    if shape[0] == 0:
        raise tu.DataError(f"{path} holds no images: arr_0 has shape {list(shape)}")
    return shape[:3]


def load_images(path, size=None):
    """`arr_0` of an npz file, or an image folder center-cropped to `size` (read lazily)."""
    if os.path.isdir(path):
        if size is None:
            raise ValueError(f"{path} is a folder: an image size is needed to crop it")
        return ImageFolder(path, size)
    npz_image_shape(path)
    with np.load(path) as data:
        return data["arr_0"]


def reference_shape(ref, size):
    """(N, H, W) of the reference images (a folder's are cropped to `size`), from headers and file listings."""
    if os.path.isdir(ref):
        return len(ImageFolder(ref, size)), size, size
    if is_stats_file(ref):
        check_stats_file(ref)
        with np.load(ref) as data:
            return (npz_header(ref, "pool")[0][0], *data["image_size"].tolist())
    return npz_image_shape(ref)


def check_inputs(samples, ref, paired=False, allow_size_mismatch=False):
    """Refuse inputs that would fail after the long Inception pass or give a meaningless number, reading only array
    headers and file listings -> the samples' height (the crop size of a folder REF)."""
    n, h, w = npz_image_shape(samples)
    if n < IS_SPLITS:
        raise tu.DataError(f"{samples} holds {n} images: the Inception score needs at least {IS_SPLITS} "
                           "(one per split)")
    if os.path.isdir(ref) and h != w:
        raise tu.DataError(f"{samples} holds {h}x{w} images: a folder REF is center-cropped to the samples' size, "
                           "which must be square")
    if paired and is_stats_file(ref):
        raise tu.DataError(f"--paired needs the original images, but {ref} is a statistics file")
    m, rh, rw = reference_shape(ref, h)
    if paired and (m, rh, rw) != (n, h, w):
        raise tu.DataError(f"--paired: {samples} holds {n} images of {h}x{w} but {ref} holds {m} of {rh}x{rw}; "
                           "image i of REF must be the original of reconstruction i")
    if (rh, rw) != (h, w) and not allow_size_mismatch:
        raise tu.DataError(f"{samples} holds {h}x{w} images but {ref} {rh}x{rw}: a FID between images of different "
                           "sizes is not meaningful (--allow-size-mismatch computes it anyway)")
    if m <= PR_K:
        raise tu.DataError(f"precision/recall need more than k={PR_K} reference images; {ref} holds {m}")
    return h


# ---------------------------------------------------------------------------------------------------------------------
# Reference statistics and their cache

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool", "image_size", "tag")


def note(message):
    print(f"fid.py: {message}", file=sys.stderr, flush=True)


def stats_tag(net, preprocess):
    """Identifies the network weights and preprocessing a statistics file was computed with."""
    h = hashlib.sha1()
    for k, v in sorted(net.state_dict().items()):
        if not k.endswith("num_batches_tracked"):
            h.update(v.detach().float().cpu().numpy().tobytes())
    return f"{preprocess}:{h.hexdigest()[:16]}"


def is_stats_file(path):
    return os.path.isfile(path) and "tag" in npz_keys(path)


def check_stats_file(path):
    missing = [k for k in STATS_KEYS if k not in npz_keys(path)]
    if missing:
        raise tu.DataError(f"{path} is not a complete statistics file of this fid.py (it lacks {missing}): "
                           "pass the reference images instead")


def read_stats(path):
    check_stats_file(path)
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def stats_cache_path(ref, size, preprocess):
    if os.path.isdir(ref):
        return f"{ref.rstrip(os.sep)}_{preprocess}_{size}px_fidstats.npz"
    return f"{os.path.splitext(ref)[0]}_{preprocess}_fidstats.npz"


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.digest()


def content_digest(ref):
    """sha256 over the bytes REF's statistics come from: the npz file, or the image files of a folder in the order
    they are read."""
    digest = hashlib.sha256()
    for path in image_files(ref) if os.path.isdir(ref) else [ref]:
        digest.update(file_sha256(path))
    return digest.hexdigest()


def stale_cache(path, ref, tag, source):
    """Why the statistics cached in `path` do not stand for REF as it is now, or '' when they do."""
    try:
        with np.load(path) as data:
            missing = [k for k in (*STATS_KEYS, "source") if k not in data.files]
            if missing:
                return f"it lacks {missing}"
            if str(data["tag"]) != tag:
                return "it was made with another Inception or preprocessing"
            if str(data["source"]) != source:
                return f"{ref} changed since it was made"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # a damaged cache is simply rebuilt
        return f"it is unreadable ({type(error).__name__})"
    return ""


def write_stats(path, stats):
    """Write through a temporary file, so that a killed run leaves no half-written cache behind; a folder without
    write access costs the cache, not the results."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **stats)
        os.replace(tmp, path)
    except OSError as error:
        note(f"could not write the cache {path} ({type(error).__name__}: {error.strerror}); continuing without it")
        with suppress(FileNotFoundError):
            os.remove(tmp)


def compute_reference_stats(ref, net, size, preprocess, batch_size, progress, tag):
    images = load_images(ref, size)
    feats = inception_features(net, images, batch_size, preprocess, progress)
    stats = dict(zip(("mu", "sigma"), feature_stats(feats["pool"])))
    stats.update(zip(("mu_s", "sigma_s"), feature_stats(feats["spatial"])))
    if not os.path.isdir(ref):
        with np.load(ref) as data:
            stats.update({k: data[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in data.files})
    stats.update(pool=feats["pool"], image_size=np.array(images.shape[1:3]), tag=np.array(tag))
    return stats


def reference_stats(ref, net, size=None, preprocess="adm", batch_size=50, progress=True, cache=True):
    """dict mu, sigma (pool3), mu_s, sigma_s (spatial), pool (features for precision/recall), image_size, tag of a
    reference set.

    ADM reference batches keep their own mu/sigma/mu_s/sigma_s (computed by ADM over the whole training set; only
    their `arr_0` images go through our Inception). With `cache`, statistics computed from images are kept next to
    REF (stats_cache_path) and reused only while REF's bytes, the network and the preprocessing are unchanged.
    """
    tag = stats_tag(net, preprocess)
    if is_stats_file(ref):
        stats = read_stats(ref)
        if str(stats["tag"]) != tag:
            raise tu.DataError(f"{ref} was computed with another Inception or preprocessing "
                               f"({stats['tag']} != {tag})")
        return stats
    if not cache:
        return compute_reference_stats(ref, net, size, preprocess, batch_size, progress, tag)
    path, source = stats_cache_path(ref, size, preprocess), content_digest(ref)
    why = stale_cache(path, ref, tag, source) if os.path.isfile(path) else None
    if why == "":
        note(f"using the cached reference statistics {path} ({ref} is unchanged)")
        return read_stats(path)
    note(f"caching the reference statistics of {ref} in {path}" if why is None else
         f"recomputing the cached reference statistics {path}: {why}")
    stats = compute_reference_stats(ref, net, size, preprocess, batch_size, progress, tag)
    write_stats(path, {**stats, "source": np.array(source)})
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation

PLUMBING_ONLY = "plumbing-only numbers, not comparable to published FIDs"


def evaluate(samples, ref, net, preprocess="adm", batch_size=50, paired=False, lpips_net=None, progress=True,
             allow_size_mismatch=False, cache=True):
    """All metrics of `samples` (npz path) against `ref` (see the module docstring) -> dict of floats.

    Paired mode adds PSNR, SSIM and LPIPS against the images of `ref`; `lpips_net` defaults to losses.build_lpips().
    `allow_size_mismatch` and `cache` are the flags --allow-size-mismatch and not --no-cache.
    """
    size = check_inputs(samples, ref, paired, allow_size_mismatch)
    if paired and lpips_net is None:
        lpips_net = build_lpips(pretrained=True).to(next(net.parameters()).device)
    # The reference first: a statistics file of another Inception fails before the samples' pass.
    ref_stats = reference_stats(ref, net, size, preprocess, batch_size, progress, cache)
    images = load_images(samples)
    feats = inception_features(net, images, batch_size, preprocess, progress)
    precision, recall = precision_recall(ref_stats["pool"], feats["pool"])
    results = {
        "fid": frechet_distance(*feature_stats(feats["pool"]), ref_stats["mu"], ref_stats["sigma"]),
        "sfid": frechet_distance(*feature_stats(feats["spatial"]), ref_stats["mu_s"], ref_stats["sigma_s"]),
        "inception_score": inception_score(feats["logits"]),
        "precision": precision,
        "recall": recall,
        "num_samples": len(images),
    }
    if paired:
        results.update(paired_metrics(images, load_images(ref, size), lpips_net, batch_size, progress))
    return results


def seeded_random_lpips(seed=0):
    """LPIPS with a random VGG trunk drawn from `seed`, leaving the global generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_lpips(pretrained=False)


def random_networks_note(args):
    parts = [name for name, on in (("Inception", args.random_inception), ("LPIPS VGG trunk", args.random_lpips)) if on]
    return f"seeded random {' and '.join(parts)}: {PLUMBING_ONLY}" if parts else None


def main(argv=None):
    args = parse_args(argv)
    check_inputs(args.samples, args.ref, args.paired, args.allow_size_mismatch)  # before any network is built
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = (random_inception(seed=0) if args.random_inception else load_inception(args.inception)).to(device)
    lpips_net = None
    if args.paired:
        lpips_net = (seeded_random_lpips() if args.random_lpips else build_lpips(pretrained=True)).to(device)
    results = evaluate(args.samples, args.ref, net, args.preprocess, args.batch_size, args.paired, lpips_net,
                       allow_size_mismatch=args.allow_size_mismatch, cache=not args.no_cache)
    note_text = random_networks_note(args)
    if note_text:
        results = {"note": note_text, **results}
    for k, v in results.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def parse_args(argv=None):
    p = tu.ArgumentParser(description="FID, sFID, IS, precision/recall (+ PSNR, SSIM, LPIPS with --paired)")
    p.add_argument("samples", help="npz with arr_0 uint8 [N,H,W,3] (samples or reconstructions), N >= 10")
    p.add_argument("ref", help="ADM reference npz, image npz, image folder, or a *_fidstats.npz file")
    p.add_argument("--inception", default=None, help=f"path of {FID_WEIGHTS_NAME} "
                                                     f"(default: $DINO_SAE_WEIGHTS or ./weights)")
    p.add_argument("--random-inception", action="store_true",
                   help=f"a seeded random Inception instead of the weights (no file needed): {PLUMBING_ONLY}")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--paired", action="store_true", help="REF holds the originals of the reconstructions, "
                                                         "in the same order: add PSNR, SSIM, LPIPS")
    p.add_argument("--random-lpips", action="store_true",
                   help=f"with --paired: LPIPS with a seeded random VGG trunk (no VGG16 file needed): {PLUMBING_ONLY}")
    p.add_argument("--allow-size-mismatch", action="store_true",
                   help="compute the metrics although the images of an npz REF have another size than the samples")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the cached statistics of REF (see the module docstring)")
    p.add_argument("--preprocess", choices=list(PREPROCESS), default="adm",
                   help="adm: TF1 bilinear resize, (x-128)/128 (default); pytorch-fid: its conventions")
    p.add_argument("--batch-size", type=tu.positive_int, default=50)
    args = p.parse_args(argv)
    if args.random_inception and args.inception:
        p.error("--inception and --random-inception exclude each other")
    if args.random_lpips and not args.paired:
        p.error("--random-lpips applies to --paired only (LPIPS is a paired metric)")
    if args.allow_size_mismatch and args.paired:
        p.error("--allow-size-mismatch does not apply to --paired: paired metrics compare images pixel by pixel")
    return args


if __name__ == "__main__":
    tu.cli(main)
