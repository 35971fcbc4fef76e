"""The models of DINO-SAE, in the order the paper introduces them:

  DINOv3 ViT          the frozen backbone (teacher, student transformer, discriminator features) and its loaders
  conv stem, encoder  §3.1 hierarchical convolutional patch embedding; §3.2 student z_S and teacher z_T
  DC-AE decoder       §3.3 the pixel decoder
  DINO-SAE            §3.2–3.4 encoder + decoder; Eq. 10 latent noise; the spherical latent of the generator
  DINO discriminator  §3.3 adversarial adaptation (stage 2 onwards)
  LightningDiT, DiT^DH  §3.4 and §4.2 the diffusion transformers on the product of spheres

Plain PyTorch. Parameter and buffer names follow the official checkpoints (DINOv3 `.pth`, DC-AE decoder) so released
weights load strictly. Every block stack (ViT blocks, decoder stages, DiT blocks) can recompute its activations in
the backward pass (`grad_checkpointing = True`) to trade compute for memory at the paper's batch sizes.
"""
import json
import math
import os
import struct
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rfm import project_sphere

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_images(x, multiple=16):
    """Images are [B, 3, H, W] with sides a multiple of the patch size: we never crop silently."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {list(x.shape)}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"image sides must be multiples of {multiple}, got {x.shape[2]}x{x.shape[3]}")


def imagenet_normalize(x):
    """[-1, 1] pixels -> the ImageNet-normalised input DINOv3 was trained on."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


class BatchRandom:
    """Random draws for a batch, one row per sample: rand / randn / randint(low, high, *shape) -> [B, *shape], from
    torch's global generator. The trainers pass train_utils.SampleRNG instead (one generator per sample, so a training
    step draws the same numbers whatever the number of ranks or micro-batches)."""

    def __init__(self, batch, device):
        self.batch, self.device = batch, device

    def rand(self, *shape):
        return torch.rand(self.batch, *shape, device=self.device)

    def randn(self, *shape):
        return torch.randn(self.batch, *shape, device=self.device)

    def randint(self, low, high, *shape):
        return torch.randint(low, high, (self.batch, *shape), device=self.device)

    def chunk(self, n):
        """Split like torch.chunk splits the batch (micro-batches)."""
        return [BatchRandom(len(part), self.device) for part in torch.arange(self.batch).chunk(n)]


class _Recompute:
    """Context of a forward re-run by activation checkpointing inside backward (re-enterable: a graph kept with
    retain_graph may be recomputed more than once)."""
    active = False

    def __enter__(self):
        _Recompute.active = True

    def __exit__(self, *exc):
        _Recompute.active = False


def maybe_checkpoint(enabled, fn, *args):
    """fn(*args); with `enabled` (and autograd recording), its activations are recomputed in backward instead of kept.
    Gradients are unchanged: the re-run sees the same inputs, and BatchNorm does not count it as another batch."""
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), _Recompute()))


#################################################################################
#                         DINOv3 Vision Transformer                             #
#################################################################################
# The frozen backbone of §3.1 (DINOv3 ViT-L/16 as released), also the teacher of Eq. 6 and, at ViT-S/16, the feature
# network of the discriminator. A bit-faithful re-implementation of the official model in eval mode: patch 16,
# 4 storage (register) tokens, LayerScale, axial RoPE on normalised patch coordinates, no absolute position embedding.

VIT_ARCHS = {  # name: (width D, depth, heads); head dim 64, 4 storage tokens, patch 16
    "vits16": (384, 12, 6),
    "vitb16": (768, 12, 12),
    "vitl16": (1024, 24, 16),
}
DINOV3_FILES = {
    "vits16": "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
    "vitb16": "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
    "vitl16": "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
}
DINOV3_SOURCE = ("request the official weights at https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ "
                 "(see github.com/facebookresearch/dinov3) or download model.safetensors from "
                 "huggingface.co/facebook/dinov3-{arch}-pretrain-lvd1689m")


def rope_periods(head_dim, base=100.0):
    """periods[j] = base^(j / (head_dim/4)), rounded to bf16 as the released checkpoints store them (recomputing them
    in fp32 moves outputs by ~3e-4)."""
    n = head_dim // 4
    periods = base ** (2 * torch.arange(n, dtype=torch.float32) / (head_dim // 2))
    return periods.to(torch.bfloat16).float()


class RopePositionEmbedding(nn.Module):
    """Axial RoPE on patch-centre coordinates in [-1, 1]: [16 y-angles, 16 x-angles] tiled twice."""

    def __init__(self, head_dim):
        super().__init__()
        self.register_buffer("periods", rope_periods(head_dim))

    def forward(self, h, w):
        device = self.periods.device
        ys = 2 * (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h - 1
        xs = 2 * (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w - 1
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # [hw, 2], row-major
        angles = (2 * math.pi * coords[:, :, None]) / self.periods.float()  # divide: bit-faithful to the original
        angles = angles.flatten(1).tile(2)  # [hw, head_dim]
        return angles.sin(), angles.cos()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, sin, cos):
    return x * cos + rotate_half(x) * sin


class LayerScale(nn.Module):
    def __init__(self, dim, init=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class MaskedBiasLinear(nn.Linear):
    """qkv projection whose k bias is zeroed by a stored mask (DINOv3 trains without a key bias)."""

    def __init__(self, dim, out_dim):
        super().__init__(dim, out_dim)
        mask = torch.ones(out_dim)
        mask[out_dim // 3: 2 * out_dim // 3] = 0
        self.register_buffer("bias_mask", mask)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias * self.bias_mask)


class ViTAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = MaskedBiasLinear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope, num_prefix):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        sin, cos = rope
        # RoPE rotates patch tokens only; cls and storage tokens have no position.
        q = torch.cat([q[:, :, :num_prefix], apply_rope(q[:, :, num_prefix:], sin, cos).to(q.dtype)], dim=2)
        k = torch.cat([k[:, :, :num_prefix], apply_rope(k[:, :, num_prefix:], sin, cos).to(k.dtype)], dim=2)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class ViTMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class ViTBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = ViTAttention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = ViTMlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x, rope, num_prefix):
        x = x + self.ls1(self.attn(self.norm1(x), rope, num_prefix))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch_size=16):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x)  # [B, D, h, w]


class DinoVisionTransformer(nn.Module):
    """DINOv3 ViT with the official parameter names. Frozen and always in eval mode in this project."""

    grad_checkpointing = False  # recompute block activations in backward (the student's gradient reaches the stem)

    def __init__(self, embed_dim=1024, depth=24, num_heads=16, n_storage_tokens=4, patch_size=16):
        super().__init__()
        self.embed_dim, self.num_heads, self.patch_size = embed_dim, num_heads, patch_size
        self.n_storage_tokens = n_storage_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.rope_embed = RopePositionEmbedding(embed_dim // num_heads)
        self.blocks = nn.ModuleList([ViTBlock(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.init_weights()

    def init_weights(self):
        for p in (self.cls_token, self.storage_tokens):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def train(self, mode=True):
        return super().train(False)

    def tokens(self, patches):
        """[cls + 0·mask, storage, patches] from patch features [B, D, h, w] flattened row-major."""
        B = patches.shape[0]
        cls = (self.cls_token + 0 * self.mask_token).expand(B, -1, -1)
        return torch.cat([cls, self.storage_tokens.expand(B, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)

    def run_blocks(self, patches, taps=()):
        """Transformer on patch features; returns the pre-norm sequence and the outputs of the blocks in `taps`."""
        h, w = patches.shape[-2:]
        x = self.tokens(patches)
        rope = self.rope_embed(h, w)
        outputs = {}
        for i, block in enumerate(self.blocks):
            x = maybe_checkpoint(self.grad_checkpointing, block, x, rope, 1 + self.n_storage_tokens)
            if i in taps:
                outputs[i] = x
        return x, outputs

    def features_from_patches(self, patches):
        x, _ = self.run_blocks(patches)
        x_norm = self.norm(x)
        n = 1 + self.n_storage_tokens
        return {"x_norm_clstoken": x_norm[:, 0], "x_storage_tokens": x_norm[:, 1:n],
                "x_norm_patchtokens": x_norm[:, n:], "x_prenorm": x}

    def forward_features(self, x):
        """x: ImageNet-normalised [B, 3, H, W] with sides multiple of 16 -> the official output dict."""
        check_images(x, self.patch_size)
        return self.features_from_patches(self.patch_embed(x))

    def get_intermediate_layers(self, x, n=1, norm=True, reshape=False):
        """Patch tokens of the last `n` blocks (int) or of the blocks indexed by `n` (sequence)."""
        check_images(x, self.patch_size)
        taps = range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n
        _, outputs = self.run_blocks(self.patch_embed(x), set(taps))
        start = 1 + self.n_storage_tokens
        outs = [self.norm(outputs[i]) if norm else outputs[i] for i in taps]
        outs = [o[:, start:] for o in outs]
        if reshape:
            h, w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
            outs = [o.transpose(1, 2).reshape(o.shape[0], -1, h, w) for o in outs]
        return tuple(outs)

    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]


def dinov3_vit(arch="vitl16"):
    """A randomly initialised DINOv3 ViT of an official size."""
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown DINOv3 arch {arch!r}; choose from {sorted(VIT_ARCHS)}")
    dim, depth, heads = VIT_ARCHS[arch]
    return DinoVisionTransformer(dim, depth, heads)


# ---- checkpoint loading: official .pth and Hugging Face layouts ----

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """Minimal safetensors reader: 8-byte little-endian header length, JSON header, raw little-endian tensors."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = bytearray(f.read())
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        t = torch.frombuffer(data[start:end], dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        state[name] = t.reshape(info["shape"]).clone()
    return state


def hf_to_official(state):
    """Rename a Hugging Face DINOv3ViTModel state dict to the official layout; add the k-bias, mask and periods."""
    state = {k.removeprefix("model."): v for k, v in state.items()}
    top = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "storage_tokens",
           "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
           "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
    per_layer = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj", "mlp.up_proj": "mlp.fc1",
                 "mlp.down_proj": "mlp.fc2", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
    out, qkv = {}, {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key == "embeddings.mask_token":
            out["mask_token"] = value.reshape(1, -1)
        elif key.startswith("layer."):
            _, i, rest = key.split(".", 2)
            if rest.startswith("attention.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(int(i), {})[rest.split(".", 1)[1]] = value
                continue
            for hf, ours in per_layer.items():
                if rest.startswith(hf):
                    out[f"blocks.{i}.{ours}{rest[len(hf):]}"] = value
                    break
            else:
                out[key] = value  # unknown: reported by the strict load
        else:
            out[key] = value
    for i, p in qkv.items():
        dim = p["q_proj.weight"].shape[0]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([p["q_proj.weight"], p["k_proj.weight"], p["v_proj.weight"]])
        k_bias = torch.zeros_like(p["q_proj.bias"])
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([p["q_proj.bias"], k_bias, p["v_proj.bias"]])
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    out["rope_embed.periods"] = rope_periods(64)
    return out


def vit_config_from_state(state):
    dim = state["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    storage = state["storage_tokens"].shape[1] if "storage_tokens" in state else 4  # a missing key is reported later
    return dict(embed_dim=dim, depth=depth, num_heads=dim // 64, n_storage_tokens=storage,
                patch_size=state["patch_embed.proj.weight"].shape[-1])


NOT_DINOV3 = "is not a DINOv3 checkpoint (official .pth or Hugging Face safetensors)"


def read_dinov3_file(path, arch):
    """The state dict stored at `path` (a missing or unreadable file is one clear error, never torch's own advice)."""
    if not os.path.isfile(path):
        name = DINOV3_FILES.get(arch or "vitl16")
        raise FileNotFoundError(f"DINOv3 weights not found at {path}: expected {name} (or its model.safetensors); "
                                + DINOV3_SOURCE.format(arch=arch or "vitl16"))
    try:
        state = read_safetensors(path) if path.endswith(".safetensors") else \
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or random bytes raise any of a dozen types from the unpickler/zip reader
        raise ValueError(f"{path} {NOT_DINOV3}: it cannot be read ({type(error).__name__})") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path} {NOT_DINOV3}: it holds a {type(state).__name__}, not a state dict")
    return state


def load_dinov3(path_or_state_dict, arch=None):
    """Frozen eval-mode DINOv3 ViT from an official `.pth`, or a Hugging Face state dict / `.safetensors` file.

    The layout and the size are read from the keys; `arch` (e.g. 'vitl16'), when given, must match the file.
    Anything that is not such a checkpoint raises ValueError naming the file and what it holds.
    """
    if arch is not None and arch not in VIT_ARCHS:
        raise ValueError(f"unknown DINOv3 arch {arch!r}; choose from {sorted(VIT_ARCHS)}")
    source = path_or_state_dict
    is_path = isinstance(source, (str, os.PathLike))
    where = os.fspath(source) if is_path else "the state dict"
    state = read_dinov3_file(where, arch) if is_path else source
    if any(k.removeprefix("model.").startswith(("embeddings.", "layer.")) for k in state):
        state = hf_to_official(state)
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(f"{where} {NOT_DINOV3}: it has no cls_token / patch_embed.proj.weight")
    state = {k: v for k, v in state.items() if not k.startswith("local_cls_norm.")}  # SAT-493M extra, unused
    config = vit_config_from_state(state)
    if arch is not None:
        want = dict(zip(("embed_dim", "depth", "num_heads"), VIT_ARCHS[arch]))
        if any(config[k] != v for k, v in want.items()):
            raise ValueError(f"{where} holds a ViT of width {config['embed_dim']}, depth {config['depth']}, "
                             f"{config['num_heads']} heads, not {arch} (width {want['embed_dim']}, depth "
                             f"{want['depth']}, {want['num_heads']} heads)")
    with torch.device("meta"):
        vit = DinoVisionTransformer(**config)
    expected = vit.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{where} does not match a DINOv3 ViT: missing keys {sorted(missing)[:5]}, unexpected keys "
                         f"{sorted(unexpected)[:5]}, wrong shapes {wrong[:5]}")
    vit.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return vit.requires_grad_(False).eval()


#################################################################################
#            Hierarchical conv stem and the DINO-SAE encoder (§3.1–3.2)         #
#################################################################################
# The student is the frozen DINOv3 transformer fed by a trainable conv stem instead of the single 16×16 patch
# convolution; the teacher is the untouched DINOv3. Eq. 6 aligns only the directions of the student's tokens z_S with
# the teacher's, so their magnitudes stay free to carry detail: the decoder sees z_S exactly as the student makes it.

class StemResBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, ch), nn.Conv2d(ch, ch, 3, padding=1, bias=False)  # norm2 follows
        self.norm2, self.conv2 = nn.GroupNorm(32, ch), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.gelu(self.norm1(x)))
        return x + self.conv2(F.gelu(self.norm2(h)))


class ConvStem(nn.Module):
    """Hierarchical convolutional patch embedding (§3.1): four stages, each halving the resolution, so fine detail is
    summarised progressively instead of by one linear projection of 16×16 patches. The paper gives only "four-stage
    CNN"; the block design is ours (README, differences from the paper)."""

    def __init__(self, out_dim, widths=(128, 256, 512, 1024)):
        super().__init__()
        stages, ch = [], 3
        for w in widths:
            stages += [nn.Conv2d(ch, w, 3, stride=2, padding=1), StemResBlock(w)]
            ch = w
        self.stages = nn.Sequential(*stages)
        self.norm = nn.GroupNorm(32, ch)
        self.proj = nn.Conv2d(ch, out_dim, 1)

    def forward(self, x):
        return self.proj(F.gelu(self.norm(self.stages(x))))


class DinoSAEEncoder(nn.Module):
    """Student = trainable stem + the frozen DINOv3 transformer; teacher = the untouched DINOv3 (one shared copy)."""

    def __init__(self, vit, stem_widths=(128, 256, 512, 1024)):
        super().__init__()
        self.vit = vit.requires_grad_(False).eval()
        self.stem = ConvStem(vit.embed_dim, stem_widths)

    def student_tokens(self, x):
        """x in [-1, 1] -> z_S [B, N, D], the normed patch tokens; gradients flow through the frozen ViT to the stem."""
        x = imagenet_normalize(x)
        return self.vit.features_from_patches(self.stem(x))["x_norm_patchtokens"]

    @torch.no_grad()
    def teacher_tokens(self, x):
        """x in [-1, 1] -> z_T [B, N, D], the teacher's normed patch tokens (the target of Eq. 6)."""
        return self.vit.forward_features(imagenet_normalize(x))["x_norm_patchtokens"]

    def forward(self, x, with_teacher=False):
        """-> z [B, C, h, w] (z_S laid out as an image: the decoder's input), z_s [B, N, D], and z_t when asked."""
        check_images(x, self.vit.patch_size)
        h, w = x.shape[2] // self.vit.patch_size, x.shape[3] // self.vit.patch_size
        z_s = self.student_tokens(x)
        out = {"z": z_s.transpose(1, 2).unflatten(2, (h, w)), "z_s": z_s}
        if with_teacher:
            out["z_t"] = self.teacher_tokens(x)
        return out

    def encode(self, x):
        return self(x)["z"]


#################################################################################
#                           DC-AE decoder (§3.3)                                #
#################################################################################
# The decoder of DC-AE's f32c32-in-1.0 without its deepest 8×8 stage ("f16-in"), fed by the 1024-channel latent:
# ResBlocks with BatchNorm at 128 and 64 px, EfficientViT blocks (ReLU linear attention + GLU MBConv) at 32 and 16 px,
# pixel-shuffle upsampling with a channel-duplicating shortcut. Key names follow the official DC-AE decoder.

class RMSNorm2d(nn.Module):
    """RMS normalisation over channels with weight and bias, computed in fp32 ("trms2d")."""

    def __init__(self, ch, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ch))
        self.bias = nn.Parameter(torch.zeros(ch))

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().square().mean(dim=1, keepdim=True) + self.eps)
        return (y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)).to(x.dtype)


class AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: every rank's loss depends on the sum, so the gradients are summed as well."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across DDP ranks, on any backend (torch's
    SyncBatchNorm is GPU-only), so N ranks train exactly like one process on the same global batch. A forward re-run
    by activation checkpointing normalises identically but leaves the running statistics alone."""

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            if self.training and _Recompute.active:  # same kernel, throw-away running buffers
                return F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), self.weight, self.bias,
                                    True, self.momentum, self.eps)
            return super().forward(x)
        xf, C = x.float(), x.shape[1]
        count = torch.full((1,), x.numel() / C, device=x.device)
        sums = AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), count]))
        n = sums[-1]
        mean = sums[:C] / n
        var = AllReduceSum.apply((xf - mean.view(1, C, 1, 1)).square().sum((0, 2, 3))) / n  # two passes: no cancellation
        if not _Recompute.active:
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
                self.num_batches_tracked += 1
        y = (xf - mean.view(1, C, 1, 1)) * torch.rsqrt(var.view(1, C, 1, 1) + self.eps)
        return (y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)).to(x.dtype)


def build_norm(name, ch):
    return {"bn2d": lambda: SyncBatchNorm2d(ch, eps=1e-5), "trms2d": lambda: RMSNorm2d(ch)}[name]()


def build_act(name):
    return {"relu": nn.ReLU, "silu": nn.SiLU}[name]()


class ConvLayer(nn.Module):
    """Conv -> optional norm -> optional act, under DC-AE's names (`conv`, `norm`)."""

    def __init__(self, cin, cout, kernel=3, bias=True, norm=None, act=None, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias, groups=groups)
        self.norm = build_norm(norm, cout) if norm else None
        self.act = build_act(act) if act else None

    def forward(self, x):
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.act(x) if self.act is not None else x


class ChannelDuplicatingUpsample(nn.Module):
    """Parameter-free shortcut: repeat each channel r times, then pixel-shuffle (for r = 4, nearest ×2 upsampling)."""

    def __init__(self, cin, cout, factor):
        super().__init__()
        self.factor, self.repeats = factor, cout * factor ** 2 // cin

    def forward(self, x):
        return F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), self.factor)


class ConvPixelShuffleUpsample(nn.Module):
    def __init__(self, cin, cout, factor=2):
        super().__init__()
        self.factor = factor
        self.conv = ConvLayer(cin, cout * factor ** 2, 3)

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), self.factor)


class Residual(nn.Module):
    """main(x) + shortcut(x), the DC-AE `ResidualBlock` (keys `main.*`)."""

    def __init__(self, main, shortcut=None):
        super().__init__()
        self.main, self.shortcut = main, shortcut

    def forward(self, x):
        return self.main(x) + (x if self.shortcut is None else self.shortcut(x))


class ResBlock(nn.Module):
    def __init__(self, ch, norm, act):
        super().__init__()
        self.conv1 = ConvLayer(ch, ch, 3, bias=True, act=act)
        self.conv2 = ConvLayer(ch, ch, 3, bias=False, norm=norm)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class LiteMLA(nn.Module):
    """ReLU linear attention: out_n = Σ_m v_m (k_m·q_n) / (Σ_m k_m·q_n + eps), linear in the number of tokens."""

    def __init__(self, ch, norm, head_dim=32, eps=1e-15):
        super().__init__()
        self.head_dim, self.eps = head_dim, eps
        self.qkv = ConvLayer(ch, 3 * ch, 1, bias=False)
        self.proj = ConvLayer(ch, ch, 1, bias=False, norm=norm)

    def split_heads(self, x):
        B, _, H, W = x.shape
        qkv = x.reshape(B, -1, 3 * self.head_dim, H * W).float()  # head-major: each head's q, k, v
        q, k, v = qkv.split(self.head_dim, dim=2)
        return F.relu(q), F.relu(k), v

    def linear_attention(self, x):
        q, k, v = self.split_heads(x)
        v = F.pad(v, (0, 0, 0, 1), value=1.0)  # the row of ones yields the normaliser Σ_m k_m·q_n
        out = (v @ k.transpose(-1, -2)) @ q
        return out[:, :, :-1] / (out[:, :, -1:] + self.eps)

    def forward(self, x):
        B, C, H, W = x.shape
        out = self.linear_attention(self.qkv(x)).reshape(B, C, H, W).to(x.dtype)
        return self.proj(out)


class GLUMBConv(nn.Module):
    def __init__(self, ch, norm, act, expand=4):
        super().__init__()
        hidden = ch * expand
        self.inverted_conv = ConvLayer(ch, 2 * hidden, 1, bias=True, act=act)
        self.depth_conv = ConvLayer(2 * hidden, 2 * hidden, 3, bias=True, groups=2 * hidden)
        self.glu_act = build_act(act)
        self.point_conv = ConvLayer(hidden, ch, 1, bias=False, norm=norm)

    def forward(self, x):
        x, gate = self.depth_conv(self.inverted_conv(x)).chunk(2, dim=1)
        return self.point_conv(x * self.glu_act(gate))


class EfficientViTBlock(nn.Module):
    def __init__(self, ch, norm, act):
        super().__init__()
        self.context_module = Residual(LiteMLA(ch, norm))
        self.local_module = Residual(GLUMBConv(ch, norm, act))

    def forward(self, x):
        return self.local_module(self.context_module(x))


class OpSequential(nn.Module):
    def __init__(self, ops):
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x):
        for op in self.op_list:
            x = op(x)
        return x


def decoder_block(kind, ch, norm, act):
    if kind == "ResBlock":
        return Residual(ResBlock(ch, norm, act))
    return EfficientViTBlock(ch, norm, act)


DCAE_CONFIGS = {
    # Ours: the released f32c32-in decoder without its deepest 8×8 stage, fed by the 1024-channel DINO latent.
    "f16-in": dict(latent_channels=1024, widths=(128, 256, 512, 512, 1024), depths=(0, 5, 10, 2, 2),
                   blocks=("ResBlock",) * 3 + ("EViT_GLU",) * 2, norms=("bn2d",) * 3 + ("trms2d",) * 2,
                   acts=("relu",) * 3 + ("silu",) * 2),
    "f32c32-in": dict(latent_channels=32, widths=(128, 256, 512, 512, 1024, 1024), depths=(0, 5, 10, 2, 2, 2),
                      blocks=("ResBlock",) * 3 + ("EViT_GLU",) * 3, norms=("bn2d",) * 3 + ("trms2d",) * 3,
                      acts=("relu",) * 3 + ("silu",) * 3),
}


class DCAEDecoder(nn.Module):
    """DC-AE decoder: project_in -> stages from deepest to shallowest (×2 each) -> norm, act, ×2 pixel-shuffle conv."""

    grad_checkpointing = False  # recompute each stage's activations in backward

    def __init__(self, latent_channels, widths, depths, blocks, norms, acts, out_channels=3):
        super().__init__()
        self.latent_channels = latent_channels
        self.project_in = Residual(ConvLayer(latent_channels, widths[-1], 3),
                                   ChannelDuplicatingUpsample(latent_channels, widths[-1], 1))
        stages = []
        for s, (width, depth) in enumerate(zip(widths, depths)):
            ops = []
            if s < len(widths) - 1 and depth > 0:
                ops.append(Residual(ConvPixelShuffleUpsample(widths[s + 1], width),
                                    ChannelDuplicatingUpsample(widths[s + 1], width, 2)))
            ops += [decoder_block(blocks[s], width, norms[s], acts[s]) for _ in range(depth)]
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)
        out_width = widths[0] if depths[0] > 0 else widths[1]
        factor = 1 if depths[0] > 0 else 2
        self.project_out = OpSequential([RMSNorm2d(out_width), nn.ReLU(),
                                         ConvPixelShuffleUpsample(out_width, out_channels, factor)])

    @property
    def last_layer_weight(self):
        """W of the adaptive GAN weight λ = ‖∇_W L_rec‖ / ‖∇_W L_G‖ (VQGAN's choice: the decoder's last conv)."""
        return self.project_out.op_list[-1].conv.conv.weight

    def forward(self, z):
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"decoder expects latents [B, {self.latent_channels}, h, w], got {list(z.shape)}")
        x = self.project_in(z)
        for stage in reversed(self.stages):
            if len(stage.op_list):
                x = maybe_checkpoint(self.grad_checkpointing, stage, x)
        return self.project_out(x)


def dcae_decoder(name="f16-in"):
    if name not in DCAE_CONFIGS:
        raise ValueError(f"unknown DC-AE decoder {name!r}; choose from {sorted(DCAE_CONFIGS)}")
    return DCAEDecoder(**DCAE_CONFIGS[name])


#################################################################################
#                  DINO-SAE: the autoencoder and its latents (§3.2–3.4)          #
#################################################################################
# The decoder reads z_S as the student makes it (§3.2: the cosine loss leaves the magnitude free for detail). The
# generator models only directions (§3.4): its latent is x = R·z_S/‖z_S‖ per token, R = √C (unit per-channel scale,
# so Gaussian-noise conventions and the time shift keep their meaning), and a point x of that product of spheres is
# decoded at ρ/R·x, ρ the mean token norm of z_S over the training images (measured by train_ae.py).

def add_latent_noise(z, tau, rng=None):
    """Eq. 10: z + σ·ε with σ ~ U(0, τ) per sample, so the decoder tolerates the generator's imperfect latents."""
    rng = rng or BatchRandom(z.shape[0], z.device)
    sigma = rng.rand(1, 1, 1) * tau
    return z + (sigma * rng.randn(*z.shape[1:])).to(z.dtype)


class DinoSAE(nn.Module):
    """Encoder (stem + frozen DINOv3) and DC-AE decoder; `rho` is the mean token norm of z_S on the training images.
    The encoder may be None when only the decoder is needed (sampling)."""

    def __init__(self, encoder, decoder, rho=None):
        super().__init__()
        if encoder is not None and decoder.latent_channels != encoder.vit.embed_dim:
            raise ValueError(f"decoder latent_channels {decoder.latent_channels} != DINOv3 width {encoder.vit.embed_dim}")
        self.encoder, self.decoder, self.rho = encoder, decoder, rho
        self.radius = math.sqrt(decoder.latent_channels)

    def forward(self, x, with_teacher=False, noise_tau=0.0, rng=None):
        """Images in [-1, 1] -> dict(z, z_s, [z_t], x_hat); in training mode Eq. 10's noise is added to z."""
        stem_trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.encoder.stem.parameters())
        with torch.set_grad_enabled(stem_trains):  # stages 3-4 never build the encoder's graph
            enc = self.encoder(x, with_teacher=with_teacher)
        z = enc["z"]
        if self.training and noise_tau > 0:
            z = add_latent_noise(z, noise_tau, rng)  # Eq. 10
        return dict(enc, x_hat=self.decoder(z))

    def encode_sphere(self, x):
        """Images -> the generator's latent [B, C, h, w]: every token of z_S on the sphere of radius R (Eq. 11)."""
        return project_sphere(self.encoder.encode(x).float(), self.radius)

    def decode_sphere(self, x):
        """A point of the product of spheres (tokens of norm R) -> images. The one place a sphere point is rescaled:
        the decoder sees it at the mean token norm ρ of the z_S it was trained on."""
        if self.rho is None:
            raise ValueError("this autoencoder has no measured mean token norm rho (a checkpoint of train_ae.py has it)")
        return self.decoder(x * (self.rho / self.radius))


#################################################################################
#                       DINO discriminator (§3.3)                               #
#################################################################################
# Adversarial adaptation (stage 2 onwards): a projected discriminator in the StyleGAN-T / RAE design, trainable heads on
# four taps of a frozen DINOv3 ViT-S/16 (the paper says only "DINO-Disc"; README, differences from the paper), hinge
# loss, DiffAugment on real and fake alike.

def diff_augment(x, rng=None):
    """DiffAugment 'color,translation' on [-1, 1] images, applied with probability 1 to real and fake alike:
    brightness + U(-0.5, 0.5), saturation × U(0, 2), contrast × U(0.5, 1.5), then a translation."""
    rng = rng or BatchRandom(x.shape[0], x.device)
    x = x + (rng.rand(1, 1, 1).to(x.dtype) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (rng.rand(1, 1, 1).to(x.dtype) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (rng.rand(1, 1, 1).to(x.dtype) + 0.5) + mean
    return translate(x, rng)


def translate(x, rng, ratio=0.125):
    """Shift each image by an integer offset in [-ratio·side, ratio·side], filling with zeros."""
    B, _, H, W = x.shape
    sy, sx = int(H * ratio + 0.5), int(W * ratio + 0.5)
    dy, dx = rng.randint(-sy, sy + 1, 1, 1), rng.randint(-sx, sx + 1, 1, 1)
    rows = (torch.arange(H, device=x.device).view(1, H, 1) + dy).clamp(-1, H)
    cols = (torch.arange(W, device=x.device).view(1, 1, W) + dx).clamp(-1, W)
    padded = F.pad(x, (1, 1, 1, 1))  # index -1 and H/W land on the zero border
    batch = torch.arange(B, device=x.device).view(B, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows + 1, cols + 1].permute(0, 3, 1, 2)


class BatchNormLocal(nn.Module):
    """Per-sample normalisation over tokens (fp32), so the discriminator's logits never mix samples of a batch."""

    def __init__(self, ch, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ch))
        self.bias = nn.Parameter(torch.zeros(ch))

    def forward(self, x):  # [B, C, L]
        xf = x.float()
        mean, var = xf.mean(dim=2, keepdim=True), xf.var(dim=2, unbiased=False, keepdim=True)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight.view(1, -1, 1) + self.bias.view(1, -1, 1)).to(x.dtype)


def sn_conv1d(cin, cout, kernel):
    conv = nn.Conv1d(cin, cout, kernel, padding=kernel // 2, padding_mode="circular")
    return nn.utils.parametrizations.spectral_norm(conv)


class DiscBlock(nn.Module):
    def __init__(self, ch, kernel):
        super().__init__()
        self.conv, self.norm = sn_conv1d(ch, ch, kernel), BatchNormLocal(ch)

    def forward(self, x):
        return F.leaky_relu(self.norm(self.conv(x)), 0.2)


class DiscHead(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.block1, self.block2 = DiscBlock(ch, 1), DiscBlock(ch, 9)
        self.cls = sn_conv1d(ch, 1, 1)

    def forward(self, x):
        x = self.block1(x)
        x = (self.block2(x) + x) / math.sqrt(2)
        return self.cls(x)


class DinoDiscriminator(nn.Module):
    """Projected discriminator: trainable heads on 4 taps of a frozen DINOv3 ViT-S/16 (StyleGAN-T / RAE design).

    The feature net is held outside the module's parameters and state dict, so it is neither trained, nor saved, nor
    synchronised by DDP; it follows the module across devices.
    """

    def __init__(self, feature_net, taps=(2, 5, 8, 11), resolution=224):
        super().__init__()
        if max(taps) >= len(feature_net.blocks):
            raise ValueError(f"discriminator taps {taps} need a ViT with more than {max(taps)} blocks")
        self.__dict__["feature_net"] = feature_net.requires_grad_(False).eval()
        self.taps, self.resolution = tuple(taps), resolution
        self.heads = nn.ModuleList([DiscHead(feature_net.embed_dim) for _ in taps])

    def _apply(self, fn, *args, **kwargs):
        self.feature_net._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x, rng=None):
        """x in [-1, 1] -> logits [B, heads · tokens]; `rng` draws the augmentation (model.BatchRandom interface)."""
        check_images(x, 1)
        x = diff_augment(x.float(), rng)  # real (fp32) and fake (bf16 under autocast) augmented alike
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        feats = self.feature_net.get_intermediate_layers(imagenet_normalize(x), n=self.taps, norm=False)
        return torch.cat([head(f.transpose(1, 2)).flatten(1) for head, f in zip(self.heads, feats)], dim=1)


#################################################################################
#           Diffusion transformers on the spherical latent (§3.4, §4.2)         #
#################################################################################
# LightningDiT and DiT^DH as in RAE's code: pre-norm blocks with RMSNorm, adaLN-Zero, 2D axial RoPE on q and k,
# SwiGLU MLP; patch size 1, so every latent position is one token (row-major). DiT^DH (RAE's "DDT") adds a wide,
# shallow head conditioned token by token on the body's output. Time: t in [0, 1], t = 0 data, t = 1 noise.

def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def sincos_pos_embed_2d(dim, size):
    """Fixed [size*size, dim] sin-cos embedding (MAE/DiT layout: first half encodes the column, second the row)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    angles = torch.outer(torch.arange(size, dtype=torch.float64), omega)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)                      # [size, dim/2]
    col, row = emb[None, :].expand(size, size, -1), emb[:, None].expand(size, size, -1)
    return torch.cat([col, row], dim=-1).reshape(size * size, dim).float()


class AxialRoPE(nn.Module):
    """2D rotary embedding (θ = 10000) for a size×size grid of row-major tokens, as in EVA / LightningDiT / RAE:
    the first half of each head's dims rotates with the row index, the second half with the column index, with
    frequencies θ^(-2k/(head_dim/2)); dims (2k, 2k+1) form a rotated pair."""

    def __init__(self, head_dim, size, theta=10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
        half = head_dim // 2
        freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float32) / half)
        angles = torch.outer(torch.arange(size, dtype=torch.float32), freqs).repeat_interleave(2, dim=-1)
        row, col = angles[:, None].expand(size, size, half), angles[None, :].expand(size, size, half)
        angles = torch.cat([row, col], dim=-1).reshape(size * size, head_dim)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x):
        """x [B, heads, N, head_dim] → rotated x (float32: the angles are kept in full precision)."""
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        return x * self.cos + rotated * self.sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class RoPEAttention(nn.Module):
    """Multi-head self-attention, fused qkv with bias, no qk-norm, RoPE on q and k."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = rope(q).to(v.dtype), rope(k).to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class DiTBlock(nn.Module):
    """adaLN-Zero block; c is [B, 1, dim] (one condition per image) or [B, N, dim] (per token, DiT^DH head)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = RoPEAttention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(2 / 3 * (4 * dim)))  # SwiGLU keeps the parameters of a ratio-4 MLP
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim, out_channels):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] → MLP([sin 2πWt, cos 2πWt]) with 256 fixed random frequencies W ~ N(0, 1).
    RAE's Gaussian Fourier embedding (its parameter counts pin it); W is a saved buffer, not trained."""

    def __init__(self, dim, num_freqs=256):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_freqs))
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        angles = 2 * math.pi * t.float()[:, None] * self.freqs
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


def to_tokens(x):
    """[B, C, h, w] → [B, h*w, C], row-major (token i*w + j is position (i, j))."""
    return x.flatten(2).transpose(1, 2)


def to_image(tokens, size):
    return tokens.transpose(1, 2).unflatten(2, (size, size))


def _describe(v):
    return f"{v.dtype} tensor of shape {tuple(v.shape)}" if torch.is_tensor(v) else type(v).__name__


class _LatentDiT(nn.Module):
    """What both models share: the input contract, the class table with its null row, and RAE's initialisation."""

    def _setup_io(self, input_size, in_channels, num_classes, dim):
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.null_class = num_classes  # label of the unconditional branch (CFG); the trainer does the dropout
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = nn.Embedding(num_classes + 1, dim)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, input_size), persistent=False)

    def _check_inputs(self, x, t, y):
        s, C = self.input_size, self.in_channels
        if x.dim() != 4 or tuple(x.shape[1:]) != (C, s, s):
            raise ValueError(f"x must have shape [B, {C}, {s}, {s}], got {tuple(x.shape)}")
        B = x.shape[0]
        if not torch.is_tensor(t) or tuple(t.shape) != (B,) or not t.is_floating_point():
            raise ValueError(f"t must be a float tensor of shape [{B}] with values in [0, 1], got {_describe(t)}")
        if not torch.is_tensor(y) or tuple(y.shape) != (B,) or y.dtype != torch.long:
            raise ValueError(f"y must be a long tensor of shape [{B}] (class ids, null = {self.null_class}), "
                             f"got {_describe(y)}")

    def _init_weights(self, xavier_everywhere, input_embedders, blocks):
        if xavier_everywhere:  # LightningDiT (as DiT); RAE's DDT leaves PyTorch's default Linear init in the blocks
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        for embedder in input_embedders:
            nn.init.xavier_uniform_(embedder.weight)
            nn.init.zeros_(embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        final = self.final_layer
        for layer in [*(b.adaLN_modulation[-1] for b in blocks), final.adaLN_modulation[-1], final.linear]:
            nn.init.zeros_(layer.weight)  # adaLN-Zero: every block starts as the identity, the output as 0
            nn.init.zeros_(layer.bias)


class LightningDiT(_LatentDiT):
    grad_checkpointing = False  # recompute each block's activations in backward

    def __init__(self, input_size=16, in_channels=1024, num_classes=1000, hidden_size=1152, depth=28, num_heads=16):
        super().__init__()
        self._setup_io(input_size, in_channels, num_classes, hidden_size)
        self.x_embedder = nn.Linear(in_channels, hidden_size)  # patch size 1: a 1×1 conv is a Linear on tokens
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads) for _ in range(depth))
        self.rope = AxialRoPE(hidden_size // num_heads, input_size)
        self.final_layer = FinalLayer(hidden_size, in_channels)
        self._init_weights(True, [self.x_embedder], self.blocks)

    def forward(self, x, t, y):
        """x [B, C, h, w] (x_t), t [B] in [0, 1], y [B] class ids → velocity [B, C, h, w]."""
        self._check_inputs(x, t, y)
        c = (self.t_embedder(t) + self.y_embedder(y))[:, None]
        h = self.x_embedder(to_tokens(x)) + self.pos_embed
        for block in self.blocks:
            h = maybe_checkpoint(self.grad_checkpointing, block, h, c, self.rope)
        return to_image(self.final_layer(h, c), self.input_size)


class DiTDH(_LatentDiT):
    """DiT^DH: a LightningDiT body (width hidden_size) plus a wide head (head_depth blocks of width head_hidden_size)
    that re-embeds x_t and takes its adaLN shift/scale/gate per token from the body's output."""

    grad_checkpointing = False  # recompute each block's activations in backward

    def __init__(self, input_size=16, in_channels=1024, num_classes=1000, hidden_size=1152, depth=28, num_heads=16,
                 head_hidden_size=2048, head_depth=2, head_num_heads=16):
        super().__init__()
        self._setup_io(input_size, in_channels, num_classes, hidden_size)
        self.s_embedder = nn.Linear(in_channels, hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads) for _ in range(depth))
        self.rope = AxialRoPE(hidden_size // num_heads, input_size)
        self.s_projector = nn.Linear(hidden_size, head_hidden_size)
        self.x_embedder = nn.Linear(in_channels, head_hidden_size)
        self.head = nn.ModuleList(DiTBlock(head_hidden_size, head_num_heads) for _ in range(head_depth))
        self.head_rope = AxialRoPE(head_hidden_size // head_num_heads, input_size)
        self.final_layer = FinalLayer(head_hidden_size, in_channels)
        self._init_weights(False, [self.s_embedder, self.x_embedder], [*self.blocks, *self.head])

    def forward(self, x, t, y):
        """x [B, C, h, w] (x_t), t [B] in [0, 1], y [B] class ids → velocity [B, C, h, w]."""
        self._check_inputs(x, t, y)
        t_emb = self.t_embedder(t)[:, None]
        c = F.silu(t_emb + self.y_embedder(y)[:, None])  # RAE applies SiLU here and again inside each adaLN
        tokens = to_tokens(x)
        s = self.s_embedder(tokens) + self.pos_embed
        for block in self.blocks:
            s = maybe_checkpoint(self.grad_checkpointing, block, s, c, self.rope)
        s = self.s_projector(F.silu(s + t_emb))  # bridge: per-token condition for the head
        h = self.x_embedder(tokens)  # no absolute position embedding in the head: RoPE only
        for block in self.head:
            h = maybe_checkpoint(self.grad_checkpointing, block, h, s, self.head_rope)
        return to_image(self.final_layer(h, s), self.input_size)


DIT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
# constructors taking input_size=16, in_channels=1024, num_classes=1000; the DiT^DH head is 2 × 2048 (16 heads)
DiT_models = {
    **{f"LightningDiT-{name}/1": partial(LightningDiT, **size) for name, size in DIT_SIZES.items()},
    **{f"DiTDH-{name}/1": partial(DiTDH, **size) for name, size in DIT_SIZES.items()},
}
