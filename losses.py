"""Losses of the DINO-SAE autoencoder (paper §3.2-3.3).

  L_align  Eq. 6: 1 - cos(z_S, z_T), averaged over patch tokens (stage 1-2)
  L_rec    L1 + LPIPS(VGG) on [-1, 1] pixels
  L_GAN    hinge loss of the DINO discriminator, generator term weighted by the adaptive weight of VQGAN
"""
import os
import warnings

import lpips
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import VGG16_Weights

import train_utils as tu


def alignment_loss(z_s, z_t):
    """Eq. 6: mean over tokens of 1 - cos(z_S, z_T) for token features [B, N, D].

    The teacher is frozen: the caller computes z_t under torch.no_grad() (or passes z_t.detach()), so the loss only
    pulls the student towards the teacher.
    """
    if z_s.shape != z_t.shape:
        raise ValueError(f"alignment_loss: student {tuple(z_s.shape)} and teacher {tuple(z_t.shape)} shapes differ")
    return (1 - F.cosine_similarity(z_s.float(), z_t.float(), dim=-1)).mean()


# ---------------------------------------------------------------------------------------------------------------------
# LPIPS (the `lpips` package, VGG trunk)

VGG16_URL = VGG16_Weights.IMAGENET1K_V1.url


def vgg16_cache_path():
    """Where torchvision's pretrained VGG16 loader looks for its file (the torch hub cache)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(VGG16_URL))


def vgg16_weights_error(problem):
    path, name = vgg16_cache_path(), os.path.basename(VGG16_URL)
    return tu.DataError(f"LPIPS VGG16 weights {path} (torch hub cache) {problem}: expected torchvision's ImageNet "
                        f"VGG16 state dict {name}; delete the file and download {VGG16_URL}")


def read_vgg16_weights():
    """torchvision's ImageNet VGG16 state dict from the torch hub cache, read here rather than by torchvision, which
    would try to download a missing file (an opaque URL error on offline nodes) and let a damaged one fail with a
    long torch.load message."""
    path = vgg16_cache_path()
    if not os.path.isfile(path):
        raise tu.MissingFileError(f"LPIPS needs torchvision's VGG16 weights {os.path.basename(VGG16_URL)}: put the "
                                  f"file in {os.path.dirname(path)} (download it from {VGG16_URL})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever a damaged file raises, torch's text advises weights_only=False: wrong here
        raise vgg16_weights_error(f"is unreadable ({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise vgg16_weights_error(f"holds a {type(state).__name__}")
    return state


def load_vgg16_features(trunk, state):
    """Copy `vgg16.features` into lpips's VGG trunk, whose slices keep the layer indices (features.i.weight ->
    sliceK.i.weight)."""
    own = trunk.state_dict()
    source = {k: "features." + k.split(".", 1)[1] for k in own}
    bad = [source[k] for k in own
           if not isinstance(state.get(source[k]), torch.Tensor) or state[source[k]].shape != own[k].shape]
    if bad:
        raise vgg16_weights_error(f"lacks {bad[:3]} or has them in another shape")
    trunk.load_state_dict({k: state[source[k]] for k in own})


class LPIPS(nn.Module):
    """Frozen LPIPS(VGG): images in [-1, 1], [B, 3, H, W] each → per-sample distance [B].

    Always in eval mode (its linear heads carry dropout), even when a parent module is put in train mode.
    """

    def __init__(self, pretrained=True):
        super().__init__()
        vgg = read_vgg16_weights() if pretrained else None  # before the seconds spent building the network
        with warnings.catch_warnings():
            # lpips builds torchvision's vgg16 through the deprecated `pretrained=` argument.
            warnings.filterwarnings("ignore", message=".*(pretrained|weights).*", category=UserWarning)
            # The linear heads (lin0..lin4) are loaded from the weights shipped inside the lpips package.
            self.net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        if pretrained:
            load_vgg16_features(self.net.net, vgg)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)

    def forward(self, x, y):
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two [B,3,H,W] images of equal shape, got {tuple(x.shape)}, {tuple(y.shape)}")
        return self.net(x, y).flatten()


def build_lpips(pretrained=True):
    """LPIPS(VGG) with torchvision's ImageNet VGG16 trunk; pretrained=False gives a random trunk (tests)."""
    return LPIPS(pretrained)


# ---------------------------------------------------------------------------------------------------------------------
# Adversarial losses

def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: ½·[mean relu(1 − D(real)) + mean relu(1 + D(fake))]."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def hinge_g_loss(logits_fake):
    """Generator hinge loss: −mean D(fake)."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss, g_loss, last_layer_weight):
    """VQGAN adaptive weight λ = clamp(‖∇_W L_rec‖ / (‖∇_W L_G‖ + 1e-6), 0, 1e4), W = the decoder's last conv weight.

    Balances the adversarial gradient against the reconstruction gradient at the decoder output. Under DDP the two
    gradients are first averaged over ranks, as DDP averages the parameter gradients, so λ is the global batch's λ
    and equal on every rank. The gradients are taken with retain_graph so the caller can still backpropagate
    (L_rec + λ_adv·λ·L_G); λ itself is a constant.
    """
    rec_grad, = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)
    grads = torch.stack([rec_grad.float(), g_grad.float()])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(grads)
        grads /= dist.get_world_size()
    weight = grads[0].norm() / (grads[1].norm() + 1e-6)
    return weight.clamp(0.0, 1e4).detach()
