import functools
import io
import json
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time

import argparse
import bench
import contextlib
import fid
import losses
import numpy as np
import probe
import pytest
import rfm
import sample
import torch
import torch.nn as nn
import torch.nn.functional as F
import train_ae
import train_dit
import train_utils as tu
from PIL import Image

from fid import psnr
from losses import adaptive_weight, alignment_loss, build_lpips, hinge_d_loss, hinge_g_loss
from model import (AxialRoPE, ChannelDuplicatingUpsample, DCAE_CONFIGS, dcae_decoder, DCAEDecoder, DinoDiscriminator,
                   DinoSAEEncoder, dinov3_vit, DinoVisionTransformer, DiT_models, DIT_SIZES, DiTDH,
                   imagenet_normalize, LightningDiT, LiteMLA, load_dinov3, RMSNorm2d, RoPEAttention,
                   sincos_pos_embed_2d, to_image, to_tokens)
from train_ae import build_autoencoder, load_autoencoder, make_tiny_weights, TINY_CONFIG
from train_utils import (all_finite, center_crop_arr, check_batch, CheckpointManager, collate_skip, HorizontalFlip,
                         ImageFolderDataset, Logger, make_loader, NonFiniteGuard, PreemptionHandler,
                         restore_rng_states, ResumableSampler, rng_state, save_image_grid, seed_everything,
                         set_rng_state)


# ---- helpers: a tiny DINOv3 in the official layout, and its Hugging Face re-save ----

def _model_tiny_vit(seed=0, depth=2):
    """Random ViT (width 128, 2 heads of 64) with the traps of the real files: non-zero k bias, LayerScale O(0.3)."""
    torch.manual_seed(seed)
    vit = DinoVisionTransformer(embed_dim=128, depth=depth, num_heads=2)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.2, 0.4)
            elif name.endswith("bias") or name in ("cls_token", "storage_tokens", "mask_token"):
                p.normal_(0, 0.3)
    return vit.eval()


def _model_to_hf(state):
    """Official keys -> Hugging Face DINOv3ViTModel keys (k bias dropped, no periods, no bias_mask)."""
    hf = {"embeddings.cls_token": state["cls_token"], "embeddings.register_tokens": state["storage_tokens"],
          "embeddings.mask_token": state["mask_token"].reshape(1, 1, -1),
          "embeddings.patch_embeddings.weight": state["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.bias": state["patch_embed.proj.bias"],
          "norm.weight": state["norm.weight"], "norm.bias": state["norm.bias"]}
    names = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.up_proj",
             "mlp.fc2": "mlp.down_proj", "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        for ours, theirs in names.items():
            for suffix in ("", ".weight", ".bias"):
                key = f"blocks.{i}.{ours}{suffix}"
                if key in state and not (ours.endswith("gamma") and suffix):
                    hf[f"layer.{i}.{theirs}{suffix}"] = state[key]
        q, k, v = state[f"blocks.{i}.attn.qkv.weight"].chunk(3)
        qb, _, vb = state[f"blocks.{i}.attn.qkv.bias"].chunk(3)
        hf.update({f"layer.{i}.attention.q_proj.weight": q, f"layer.{i}.attention.k_proj.weight": k,
                   f"layer.{i}.attention.v_proj.weight": v, f"layer.{i}.attention.q_proj.bias": qb,
                   f"layer.{i}.attention.v_proj.bias": vb})
    return hf


def _model_write_safetensors(state, path):
    """A safetensors file as the format defines it: u64 little-endian header length, JSON header (dtype, shape, byte
    offsets), raw little-endian tensor bytes."""
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    header, blobs, offset = {}, [], 0
    for name, t in state.items():
        blob = t.detach().contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def _model_reference_vit(vit, x):
    """SPEC §1.3 written out in float64 with an explicit softmax: an independent definition of the forward."""
    sd = {k: v.double() for k, v in vit.state_dict().items()}
    B, _, H, W = x.shape
    h, w, D, nh = H // 16, W // 16, vit.embed_dim, vit.num_heads
    x = x.double()
    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    tokens = [sd["cls_token"].expand(B, 1, D), sd["storage_tokens"].expand(B, -1, -1)]
    seq = torch.cat(tokens + [patches.flatten(2).transpose(1, 2)], dim=1)
    periods = sd["rope_embed.periods"]
    ang = torch.zeros(h * w, 64, dtype=torch.float64)
    for r in range(h):
        for c in range(w):
            y, xc = 2 * (r + 0.5) / h - 1, 2 * (c + 0.5) / w - 1
            a = torch.cat([2 * math.pi * y / periods, 2 * math.pi * xc / periods])
            ang[r * w + c] = torch.cat([a, a])

    def rope(u):
        rot = torch.cat([-u[..., 32:], u[..., :32]], dim=-1)
        return torch.cat([u[:, :, :5], u[:, :, 5:] * ang.cos() + rot[:, :, 5:] * ang.sin()], dim=2)

    for i in range(len(vit.blocks)):
        p = f"blocks.{i}."
        y = F.layer_norm(seq, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-5)
        bias = sd[p + "attn.qkv.bias"] * torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)]).double()
        q, k, v = (y @ sd[p + "attn.qkv.weight"].T + bias).view(B, -1, 3, nh, 64).permute(2, 0, 3, 1, 4)
        att = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / 8.0, dim=-1) @ v
        seq = seq + sd[p + "ls1.gamma"] * (att.transpose(1, 2).reshape(B, -1, D) @ sd[p + "attn.proj.weight"].T
                                          + sd[p + "attn.proj.bias"])
        y = F.layer_norm(seq, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-5)
        y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        seq = seq + sd[p + "ls2.gamma"] * (y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"])
    return F.layer_norm(seq, (D,), sd["norm.weight"], sd["norm.bias"], 1e-5)


def _model_tiny_decoder(latent_channels=128):
    cfg = dict(DCAE_CONFIGS["f16-in"], latent_channels=latent_channels, widths=(16, 32, 32, 64, 128),
               depths=(0, 1, 1, 1, 1))
    return DCAEDecoder(**cfg)


# ---- parameter counts of the full-size models (meta device) ----

@pytest.mark.parametrize("arch,count", [("vits16", 21_601_152), ("vitb16", 85_669_632), ("vitl16", 303_154_176)])
def test_vit_param_counts(arch, count):
    with torch.device("meta"):
        vit = dinov3_vit(arch)
    assert sum(p.numel() for p in vit.parameters()) == count
    assert len(vit.state_dict()) == (368 if arch == "vitl16" else 188)


@pytest.mark.parametrize("name,count", [("f16-in", 137_830_668), ("f32c32-in", 200_184_076)])
def test_decoder_param_counts(name, count):
    with torch.device("meta"):
        dec = dcae_decoder(name)
    assert sum(p.numel() for p in dec.parameters()) == count


# ---- checkpoint loading ----

def test_official_and_hf_layouts_give_same_outputs(tmp_path):
    vit = _model_tiny_vit()
    state = vit.state_dict()
    assert state["rope_embed.periods"].equal(state["rope_embed.periods"].bfloat16().float())
    assert state["blocks.0.attn.qkv.bias"][128:256].abs().sum() > 0  # k bias stored but masked
    torch.save(state, tmp_path / "official.pth")
    _model_write_safetensors(_model_to_hf(state), tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 32, 48)
    ref = vit.forward_features(x)
    for source in (tmp_path / "official.pth", tmp_path / "model.safetensors", str(tmp_path / "model.safetensors"),
                   {"model." + k: v for k, v in _model_to_hf(state).items()}):
        loaded = load_dinov3(source)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        out = loaded.forward_features(x)
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            assert (out[key] - ref[key]).abs().max() <= 1e-5, (source, key)


def test_loader_errors(tmp_path):
    state = _model_tiny_vit().state_dict()
    bad = dict(state)
    del bad["blocks.1.ls2.gamma"]
    bad["blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_dinov3(bad)
    msg = str(err.value)
    assert "blocks.1.ls2.gamma" in msg and "blocks.0.extra.weight" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="not vitl16"):
        load_dinov3(state, arch="vitl16")
    with pytest.raises(FileNotFoundError) as err:
        load_dinov3(tmp_path / "nope.pth", arch="vitl16")
    assert "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth" in str(err.value) and "http" in str(err.value)


# ---- forward semantics (SPEC §1.3) ----

def test_vit_matches_spec_reference_non_square():
    vit = _model_tiny_vit()
    x = torch.randn(2, 3, 32, 48)
    out = vit.forward_features(x)
    ref = _model_reference_vit(vit, x)
    assert (out["x_norm_patchtokens"].double() - ref[:, 5:]).abs().max() < 1e-4
    assert (out["x_norm_clstoken"].double() - ref[:, 0]).abs().max() < 1e-4


def test_rope_angle_layout_y_then_x():
    vit = _model_tiny_vit()
    h, w = 2, 3
    sin, cos = vit.rope_embed(h, w)
    periods = vit.rope_embed.periods
    angles = torch.atan2(sin, cos)
    for r in range(h):
        for c in range(w):
            y, x = 2 * (r + 0.5) / h - 1, 2 * (c + 0.5) / w - 1
            expect = torch.cat([2 * math.pi * y / periods, 2 * math.pi * x / periods]).repeat(2)
            expect = torch.atan2(expect.sin(), expect.cos())
            assert torch.allclose(angles[r * w + c], expect, atol=1e-5)


def test_rope_rotate_half_pairs_i_with_i_plus_half():
    from model import apply_rope
    sin, cos = torch.full((1, 64), math.sin(0.7)), torch.full((1, 64), math.cos(0.7))
    for i in (0, 5, 31):
        e = torch.zeros(1, 64)
        e[0, i] = 1.0
        out = apply_rope(e, sin, cos)
        assert torch.allclose(out[0, i], torch.tensor(math.cos(0.7)))
        assert torch.allclose(out[0, i + 32], torch.tensor(math.sin(0.7)))
        assert out.abs().gt(1e-7).sum() == 2


def test_prefix_tokens_unrotated():
    """Rotating prefix tokens too changes the output: the reference (which leaves them alone) is what we match."""
    vit = _model_tiny_vit(depth=1)
    x = torch.randn(1, 3, 32, 32)
    out = vit.forward_features(x)["x_prenorm"]
    rope = vit.rope_embed
    sin, cos = rope(2, 2)
    rope.forward = lambda h, w: (sin, cos)
    attn = vit.blocks[0].attn
    y = vit.blocks[0].norm1(vit.tokens(vit.patch_embed(x)))
    pad_sin = torch.cat([torch.full((5, 64), 0.6), sin])
    pad_cos = torch.cat([torch.full((5, 64), 0.8), cos])
    everything_rotated = attn(y, (pad_sin, pad_cos), 0)
    only_patches = attn(y, (sin, cos), 5)
    assert (everything_rotated - only_patches).abs().max() > 1e-3
    expect = vit.tokens(vit.patch_embed(x))
    expect = expect + vit.blocks[0].ls1(only_patches)
    expect = expect + vit.blocks[0].ls2(vit.blocks[0].mlp(vit.blocks[0].norm2(expect)))
    assert torch.allclose(out, expect, atol=1e-6)


def test_patches_row_major():
    vit = _model_tiny_vit()
    patches = torch.arange(2 * 3).float().view(1, 1, 2, 3).expand(1, 128, 2, 3)
    seq = vit.tokens(patches)
    assert seq[0, 5:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    img = torch.zeros(1, 3, 32, 48)
    img[:, :, 16:32, 0:16] = 1.0  # row 1, col 0 -> token 3
    emb = vit.patch_embed(img) - vit.patch_embed(torch.zeros_like(img))
    changed = vit.tokens(emb)[0, 5:].abs().sum(-1).nonzero().flatten().tolist()
    assert changed == [3]


def test_batch_size_invariance_and_intermediate_layers():
    vit = _model_tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    full = vit.forward_features(x)["x_norm_patchtokens"]
    single = torch.cat([vit.forward_features(x[i:i + 1])["x_norm_patchtokens"] for i in range(3)])
    assert torch.allclose(full, single, atol=1e-5)
    last = vit.get_intermediate_layers(x, n=1)[0]
    assert torch.allclose(last, full, atol=1e-6)
    raw = vit.get_intermediate_layers(x, n=[0, 1], norm=False, reshape=True)
    assert raw[1].shape == (3, 128, 2, 2)
    assert torch.allclose(raw[1].flatten(2).transpose(1, 2), vit.forward_features(x)["x_prenorm"][:, 5:], atol=1e-6)


def test_bad_inputs_raise():
    vit = _model_tiny_vit()
    with pytest.raises(ValueError, match="multiples of 16"):
        vit.forward_features(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vit.forward_features(torch.randn(1, 4, 32, 32))
    dec = _model_tiny_decoder()
    with pytest.raises(ValueError, match="latents"):
        dec(torch.randn(1, 64, 2, 2))


def test_vit_stays_in_eval_mode():
    vit = _model_tiny_vit()
    vit.train()
    assert not vit.training and not any(m.training for m in vit.modules())


# ---- encoder ----

def test_student_with_patch_embed_equals_teacher_and_latent_on_sphere():
    vit = _model_tiny_vit()
    enc = DinoSAEEncoder(vit, stem_widths=(32, 32, 64, 64))
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    out = enc(x, with_teacher=True)
    assert out["z"].shape == (2, 128, 2, 3)
    norms = out["z"].norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, math.sqrt(128)), atol=1e-4)
    enc.stem = vit.patch_embed.proj
    out = enc(x, with_teacher=True)
    assert torch.equal(out["z_s"], out["z_t"])
    assert torch.equal(out["z_t"], vit.forward_features(imagenet_normalize(x))["x_norm_patchtokens"])


def test_student_gradients_reach_stem_only():
    vit = _model_tiny_vit()
    enc = DinoSAEEncoder(vit, stem_widths=(32, 32, 64, 64))
    out = enc(torch.rand(1, 3, 32, 32) * 2 - 1, with_teacher=True)
    (1 - F.cosine_similarity(out["z_s"], out["z_t"], dim=-1)).mean().backward()
    assert all(p.grad is not None for p in enc.stem.parameters())
    assert all(p.grad is None for p in enc.vit.parameters())
    assert not out["z_t"].requires_grad


# ---- decoder ----

def test_full_decoder_shape_on_meta():
    with torch.device("meta"):
        dec = dcae_decoder("f16-in")
        out = dec(torch.empty(2, 1024, 16, 16))
    assert out.shape == (2, 3, 256, 256)


def test_tiny_decoder_forward_backward():
    dec = _model_tiny_decoder()
    z = torch.randn(2, 128, 2, 2)
    out = dec(z)
    assert out.shape == (2, 3, 32, 32)
    out.square().mean().backward()
    assert dec.last_layer_weight.grad is not None and dec.last_layer_weight.shape[0] == 12


def test_duplicating_shortcut_r4_is_nearest_upsample():
    x = torch.randn(2, 8, 5, 6)
    up = ChannelDuplicatingUpsample(8, 8, 2)
    assert up.repeats == 4
    assert torch.equal(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_lite_mla_linear_attention_equals_the_quadratic_formula():
    """out_n = Σ_m v_m (k_m·q_n) / (Σ_m k_m·q_n + eps), ReLU on q and k, written out with explicit scores per head."""
    torch.manual_seed(0)
    mla = LiteMLA(64, "trms2d")
    qkv = torch.randn(2, 192, 3, 5)
    lin = mla.linear_attention(qkv)
    for b in range(2):
        for head in range(2):
            q, k, v = qkv[b].reshape(2, 96, 15)[head].split(32)  # head-major channels: q, k, v of one head
            scores = k.relu().T @ q.relu()  # [M, N]: k_m · q_n
            expect = v @ scores / (scores.sum(0) + 1e-15)
            assert torch.allclose(lin[b, head], expect, atol=1e-5, rtol=1e-4)


def test_rms_norm_2d_formula():
    norm = RMSNorm2d(6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 6, 3, 4)
    expect = x / torch.sqrt((x ** 2).mean(1, keepdim=True) + 1e-5) * norm.weight[:, None, None] + norm.bias[:, None, None]
    assert torch.allclose(norm(x), expect, atol=1e-6)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


# ---- discriminator ----

def test_discriminator_logits_grads_and_frozen_feature_net():
    feature_net = _model_tiny_vit(depth=12)
    before = {k: v.clone() for k, v in feature_net.state_dict().items()}
    disc = DinoDiscriminator(feature_net, resolution=32)
    assert not any(k.startswith("feature_net") for k in disc.state_dict())
    assert sum(p.numel() for p in disc.parameters()) == sum(p.numel() for p in disc.heads.parameters())
    x = (torch.rand(3, 3, 48, 48) * 2 - 1).requires_grad_(True)
    logits = disc(x, generator=torch.Generator().manual_seed(0))
    assert logits.shape == (3, 4 * 4)
    opt = torch.optim.SGD(disc.parameters(), lr=0.1)
    logits.mean().backward()
    opt.step()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in feature_net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in feature_net.state_dict().items())
    disc.train()
    assert not feature_net.training


def test_discriminator_heads_use_per_sample_statistics():
    """BatchNormLocal normalises each sample over its tokens: a sample's logits ignore the rest of the batch."""
    disc = DinoDiscriminator(_model_tiny_vit(depth=12), resolution=32).eval()
    feats = torch.randn(3, 128, 10) * 3 + 1
    head = disc.heads[0]
    together = head(feats)
    alone = torch.cat([head(feats[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)


def _dit_tiny(kind, perturb=False, seed=0):
    torch.manual_seed(seed)
    common = dict(input_size=4, in_channels=8, num_classes=10, hidden_size=32, depth=2, num_heads=2)
    if kind == "lightning":
        model = LightningDiT(**common)
    else:
        model = DiTDH(**common, head_hidden_size=48, head_depth=2, head_num_heads=2)
    if perturb:  # leave the adaLN-Zero / zero-output init so that every path carries signal
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _dit_inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, 4, 4, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, t, y


def _dit_rope_reference(x, size, theta=10000.0):
    """Axial RoPE by its definition: token n = (i, j) row-major; pair (2p, 2p+1) of the first half of the head dims
    is the complex number x_2p + i·x_2p+1 multiplied by exp(i·row·θ^(-2p/(hd/2))), the second half likewise with
    the column index."""
    hd = x.shape[-1]
    quarter = hd // 4
    freqs = theta ** (-2 * torch.arange(quarter, dtype=torch.float64) / (hd // 2))
    idx = torch.arange(size * size)
    row, col = (idx // size).double(), (idx % size).double()
    phase = torch.cat([torch.outer(row, freqs), torch.outer(col, freqs)], dim=-1)  # [N, hd/2]
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(phase), phase)).flatten(-2)


def _dit_rms(x, weight):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def _dit_attention_reference(attn, x, size):
    B, N, D = x.shape
    H = attn.num_heads
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).view(B, N, 3, H, D // H)
    q, k, v = (qkv[:, :, i].transpose(1, 2).double() for i in range(3))
    q, k = _dit_rope_reference(q, size), _dit_rope_reference(k, size)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(B, N, D).float()
    return out @ attn.proj.weight.T + attn.proj.bias


def _dit_block_reference(block, x, c, size):
    mods = F.silu(c) @ block.adaLN_modulation[1].weight.T + block.adaLN_modulation[1].bias
    shift1, scale1, gate1, shift2, scale2, gate2 = mods.chunk(6, dim=-1)
    x = x + gate1 * _dit_attention_reference(block.attn, _dit_rms(x, block.norm1.weight) * (1 + scale1) + shift1, size)
    h = _dit_rms(x, block.norm2.weight) * (1 + scale2) + shift2
    a, b = (h @ block.mlp.w12.weight.T + block.mlp.w12.bias).chunk(2, dim=-1)
    return x + gate2 * ((F.silu(a) * b) @ block.mlp.w3.weight.T + block.mlp.w3.bias)


def _dit_final_reference(final, x, c):
    mods = F.silu(c) @ final.adaLN_modulation[1].weight.T + final.adaLN_modulation[1].bias
    shift, scale = mods.chunk(2, dim=-1)
    return (_dit_rms(x, final.norm.weight) * (1 + scale) + shift) @ final.linear.weight.T + final.linear.bias


def _dit_forward_reference(model, x, t, y):
    """SPEC §3 written out: Gaussian Fourier time features, c = t_emb + y_emb (LightningDiT) or SiLU(t_emb + y_emb)
    (DiT^DH), body on embedded x_t, DiT^DH bridge Linear(SiLU(s + t_emb)) and a head conditioned per token on it."""
    size = model.input_size
    angles = 2 * math.pi * t[:, None] * model.t_embedder.freqs
    t_emb = model.t_embedder.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))[:, None]
    y_emb = model.y_embedder.weight[y][:, None]
    tokens = x.permute(0, 2, 3, 1).reshape(x.shape[0], size * size, -1)
    if isinstance(model, LightningDiT):
        c = t_emb + y_emb
        h = tokens @ model.x_embedder.weight.T + model.x_embedder.bias + sincos_pos_embed_2d(_dit_width(model), size)
        for block in model.blocks:
            h = _dit_block_reference(block, h, c, size)
        out = _dit_final_reference(model.final_layer, h, c)
    else:
        c = F.silu(t_emb + y_emb)
        s = tokens @ model.s_embedder.weight.T + model.s_embedder.bias + sincos_pos_embed_2d(_dit_width(model), size)
        for block in model.blocks:
            s = _dit_block_reference(block, s, c, size)
        s = F.silu(s + t_emb) @ model.s_projector.weight.T + model.s_projector.bias
        h = tokens @ model.x_embedder.weight.T + model.x_embedder.bias
        for block in model.head:
            h = _dit_block_reference(block, h, s, size)
        out = _dit_final_reference(model.final_layer, h, s)
    return out.reshape(x.shape[0], size, size, -1).permute(0, 3, 1, 2)


def _dit_width(model):
    return model.y_embedder.weight.shape[1]


def _dit_param_formula(C, d, depth, head=None):
    """Trainable parameters by hand (1001 class rows, 512 Fourier features, SwiGLU hidden int(2/3·4d))."""
    def block(w):
        hid = int(2 / 3 * (4 * w))
        return 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + (w * 2 * hid + 2 * hid) + (hid * w + w) + (w * 6 * w + 6 * w)
    shared = (512 * d + d) + (d * d + d) + 1001 * d + (C * d + d) + depth * block(d)
    if head is None:
        return shared + d + (d * 2 * d + 2 * d) + (d * C + C)
    D, head_depth = head
    return shared + (d * D + D) + (C * D + D) + head_depth * block(D) + D + (D * 2 * D + 2 * D) + (D * C + C)


def test_dit_full_size_param_counts_match_rae():
    counts = {}
    for C in (1024, 768):
        for name in DiT_models:
            with torch.device("meta"):
                model = DiT_models[name](in_channels=C)
            assert all(p.requires_grad for p in model.parameters())
            counts[name, C] = sum(p.numel() for p in model.parameters())
            size = DIT_SIZES[name.split("-")[1][:-2]]
            head = (2048, 2) if name.startswith("DiTDH") else None
            assert counts[name, C] == _dit_param_formula(C, size["hidden_size"], size["depth"], head)
    print({f"{k[0]} C={k[1]}": v for k, v in counts.items()})
    assert counts["LightningDiT-XL/1", 1024] == 677_543_296
    assert counts["DiTDH-XL/1", 1024] == 839_724_372
    assert round(counts["LightningDiT-XL/1", 768] / 1e6, 2) == 676.95  # SPEC §3 table, RAE's code
    assert round(counts["DiTDH-XL/1", 768] / 1e6, 2) == 838.38


def test_dit_default_constructor_arguments():
    with torch.device("meta"):
        model = DiT_models["DiTDH-S/1"]()
    assert (model.input_size, model.in_channels, model.num_classes, model.null_class) == (16, 1024, 1000, 1000)
    assert model.y_embedder.num_embeddings == 1001
    assert [b.attn.num_heads for b in model.head] == [16, 16] and model.head[0].norm1.weight.shape == (2048,)


@pytest.mark.parametrize("kind", ["lightning", "dh"])
def test_dit_output_shape_and_exactly_zero_at_init(kind):
    model = _dit_tiny(kind)
    x, t, y = _dit_inputs()
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("kind", ["lightning", "dh"])
def test_dit_forward_matches_spec_formula(kind):
    model = _dit_tiny(kind, perturb=True)
    x, t, y = _dit_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), _dit_forward_reference(model, x, t, y), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lightning", "dh"])
def test_dit_output_depends_on_t_and_y(kind):
    model = _dit_tiny(kind, perturb=True)
    x, t, y = _dit_inputs()
    with torch.no_grad():
        out = model(x, t, y)
        assert (out - model(x, 1 - t, y)).abs().max() > 1e-3
        assert (out - model(x, t, (y + 1) % 10)).abs().max() > 1e-3
        assert (out - model(x, t, torch.full_like(y, model.null_class))).abs().max() > 1e-3


def test_dit_rope_preserves_norms_and_depends_on_relative_offset():
    size, hd = 5, 16
    rope = AxialRoPE(hd, size)
    x = torch.randn(2, 3, size * size, hd)
    rotated = rope(x)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotated, _dit_rope_reference(x, size).float(), atol=1e-5, rtol=1e-5)
    q, k = torch.randn(hd), torch.randn(hd)
    rq, rk = rope(q.expand(1, 1, size * size, hd))[0, 0], rope(k.expand(1, 1, size * size, hd))[0, 0]
    scores = rq @ rk.T  # scores[n, m] for q at token n, k at token m
    by_offset = {}
    for n in range(size * size):
        for m in range(size * size):
            by_offset.setdefault((n // size - m // size, n % size - m % size), []).append(scores[n, m])
    spreads = [torch.stack(v).max() - torch.stack(v).min() for v in by_offset.values()]
    assert max(spreads) < 1e-4
    assert torch.stack([v[0] for v in by_offset.values()]).std() > 1e-2


def test_dit_rope_first_half_follows_rows_second_half_columns():
    size, hd = 4, 16
    x = torch.randn(1, 1, size * size, hd)
    rotated = AxialRoPE(hd, size)(x)
    row0, col0 = torch.arange(size), torch.arange(size) * size
    torch.testing.assert_close(rotated[..., row0, : hd // 2], x[..., row0, : hd // 2])
    torch.testing.assert_close(rotated[..., col0, hd // 2:], x[..., col0, hd // 2:])
    n = 2 * size + 3  # row 2, column 3; pair 1 of each half has frequency 10000^(-2/8) = 0.1
    for start, pos in ((2, 2), (hd // 2 + 2, 3)):
        a, b = x[0, 0, n, start], x[0, 0, n, start + 1]
        phi = torch.tensor(0.1 * pos)
        expected = torch.stack([a * phi.cos() - b * phi.sin(), a * phi.sin() + b * phi.cos()])
        torch.testing.assert_close(rotated[0, 0, n, start:start + 2], expected)


def test_dit_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn, size = RoPEAttention(32, 2), 4
    x = torch.randn(2, size * size, 32)
    with torch.no_grad():
        out = attn(x, AxialRoPE(16, size))
        torch.testing.assert_close(out, _dit_attention_reference(attn, x, size), atol=1e-5, rtol=1e-5)


def test_dit_tokens_are_row_major_and_invertible():
    x = torch.randn(2, 3, 4, 5)
    tokens = to_tokens(x)
    assert tokens.shape == (2, 20, 3)
    for i in range(4):
        for j in range(5):
            assert torch.equal(tokens[:, i * 5 + j], x[:, :, i, j])
    square = torch.randn(2, 3, 4, 4)
    assert torch.equal(to_image(to_tokens(square), 4), square)


def test_dit_sincos_pos_embed_layout():
    dim, size = 16, 3
    emb = sincos_pos_embed_2d(dim, size)
    omega = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    for i in range(size):
        for j in range(size):
            expected = torch.cat([(j * omega).sin(), (j * omega).cos(), (i * omega).sin(), (i * omega).cos()])
            torch.testing.assert_close(emb[i * size + j], expected.float())


@pytest.mark.parametrize("kind", ["lightning", "dh"])
def test_dit_batch_size_invariance(kind):
    model = _dit_tiny(kind, perturb=True)
    x, t, y = _dit_inputs(batch=4)
    with torch.no_grad():
        full = model(x, t, y)
        single = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(full, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lightning", "dh"])
def test_dit_bf16_autocast_cpu(kind):
    model = _dit_tiny(kind, perturb=True)
    x, t, y = _dit_inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert ((out.float() - ref).norm() / ref.norm()) < 0.05


def test_dit_rejects_bad_inputs():
    model = _dit_tiny("dh")
    x, t, y = _dit_inputs()
    with pytest.raises(ValueError, match=r"x must have shape \[B, 8, 4, 4\]"):
        model(torch.randn(3, 7, 4, 4), t, y)
    with pytest.raises(ValueError, match=r"x must have shape"):
        model(torch.randn(3, 8, 16), t, y)
    with pytest.raises(ValueError, match=r"t must be a float tensor of shape \[3\]"):
        model(x, t[:, None], y)
    with pytest.raises(ValueError, match=r"t must be a float tensor"):
        model(x, 0.5, y)
    with pytest.raises(ValueError, match=r"y must be a long tensor of shape \[3\]"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match=r"head dimension divisible by 4"):
        LightningDiT(input_size=4, in_channels=8, num_classes=10, hidden_size=36, depth=1, num_heads=6)


# ---------------------------------------------------------------------------------------------------------------------
# losses.py

def test_alignment_loss_values_and_gradient():
    z = torch.randn(2, 5, 8)
    assert alignment_loss(z, z).abs().item() < 1e-6
    assert alignment_loss(z, 3.7 * z).abs().item() < 1e-6  # cosine ignores the norm
    assert abs(alignment_loss(z, -z).item() - 2) < 1e-6
    e = torch.eye(8)
    assert abs(alignment_loss(e[None, :4], e[None, 4:]).item() - 1) < 1e-6  # orthogonal tokens
    z_s = torch.randn(2, 5, 8, requires_grad=True)
    z_t = torch.randn(2, 5, 8)
    expected = torch.stack([1 - (z_s[b, n] @ z_t[b, n]) / (z_s[b, n].norm() * z_t[b, n].norm())
                            for b in range(2) for n in range(5)]).mean()
    loss = alignment_loss(z_s, z_t)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert z_s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shapes differ"):
        alignment_loss(z_s, z_t[:, :4])


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2], relu(1 + fake) = [0, 1, 2]
    assert abs(hinge_d_loss(real, fake).item() - 0.5 * (2.5 / 3 + 3 / 3)) < 1e-6
    assert abs(hinge_g_loss(fake).item() - (-(-2.0 + 0.0 + 1.0) / 3)) < 1e-6
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0  # confident D: no loss


def test_adaptive_weight_equals_gradient_norm_ratio():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU())
    last = nn.Conv2d(8, 3, 1)  # linear per pixel: ∇_W of a loss is Σ_pixels ∂L/∂out ⊗ h
    z, target, a = torch.randn(2, 4, 6, 6), torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    h = body(z)
    out = last(h)
    rec = 0.5 * ((out - target) ** 2).sum()
    g = (a * out).sum()
    grad_rec = torch.einsum("bchw,bdhw->cd", out - target, h)
    grad_g = torch.einsum("bchw,bdhw->cd", a, h)
    expected = grad_rec.norm() / (grad_g.norm() + 1e-6)
    lam = adaptive_weight(rec, g, last.weight)
    torch.testing.assert_close(lam, expected.detach(), rtol=1e-5, atol=0)
    assert lam.dtype == torch.float32 and not lam.requires_grad
    (rec + lam * g).backward()  # the graph is retained for the real backward pass

    # A nonlinear "discriminator": compare with two separate backward passes.
    last.zero_grad()
    out = last(body(z))
    rec = (out - target).abs().mean()
    g = -torch.tanh(out.mean(dim=(1, 2, 3))).mean()
    lam = adaptive_weight(rec, g, last.weight)
    rec.backward(retain_graph=True)
    n_rec = last.weight.grad.norm()
    last.zero_grad()
    g.backward()
    n_g = last.weight.grad.norm()
    torch.testing.assert_close(lam, n_rec / (n_g + 1e-6), rtol=1e-5, atol=0)

    out = last(body(z))
    lam = adaptive_weight(out.abs().mean(), 0 * out.sum(), last.weight)  # no adversarial gradient → clamped
    assert lam.item() == 1e4


def test_lpips_random_backbone():
    net = build_lpips(pretrained=False)
    assert not net.training and all(not p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training and not net.net.lin0.training  # dropout of the linear heads stays off
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    d = net(x, x)
    assert d.shape == (3,) and d.abs().max().item() < 1e-6
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    d = net(x, y)
    assert d.shape == (3,) and (d > 0).all()
    d.sum().backward()
    assert y.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="LPIPS expects"):
        net(x, x[:, :, :16])


def test_lpips_missing_vgg_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(FileNotFoundError) as info:
        build_lpips(pretrained=True)
    message = str(info.value)
    assert "vgg16-397923af.pth" in message
    assert os.path.join(str(tmp_path), "hub", "checkpoints") in message
    assert losses.VGG16_URL in message and losses.VGG16_URL.startswith("https://download.pytorch.org/")


# ---------------------------------------------------------------------------------------------------------------------
# train_utils.py: checkpoints

def test_checkpoint_atomic_save_latest_and_pruning(tmp_path):
    manager = CheckpointManager(str(tmp_path / "ckpt"), keep=3)
    for step in range(1, 6):
        manager.save({"step": step, "w": torch.full((4,), float(step)), "args": {"lr": 1e-4}}, step)
    names = sorted(os.listdir(tmp_path / "ckpt"))
    assert names == ["ckpt_0000003.pt", "ckpt_0000004.pt", "ckpt_0000005.pt", "latest"]  # no temp files left
    assert (tmp_path / "ckpt" / "latest").read_text() == "ckpt_0000005.pt"
    state = manager.load("auto")
    assert state["step"] == 5 and torch.equal(state["w"], torch.full((4,), 5.0))
    assert manager.loaded_path.endswith("ckpt_0000005.pt")
    state["w"].add_(1)  # loads are memory-mapped: an optimizer updating a loaded state in place must not touch the file
    assert torch.equal(manager.load("auto")["w"], torch.full((4,), 5.0))
    assert manager.load(str(tmp_path / "ckpt" / "ckpt_0000003.pt"))["step"] == 3
    # Saving an older step (resumed from it) never deletes the checkpoint just written, and `latest` follows it.
    manager.save({"step": 2}, 2)
    assert (tmp_path / "ckpt" / "latest").read_text() == "ckpt_0000002.pt"
    assert manager.load("auto")["step"] == 2


def test_checkpoint_corrupt_newest_falls_back(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep=3)
    manager.save({"step": 1, "w": torch.randn(1000)}, 1)
    path = manager.save({"step": 2, "w": torch.randn(1000)}, 2)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])  # a truncated write
    with pytest.warns(UserWarning, match="ckpt_0000002.pt"):
        state = manager.load("auto")
    assert state["step"] == 1 and manager.loaded_path.endswith("ckpt_0000001.pt")
    generator = np.random.default_rng(0)
    for _ in range(200):  # random garbage makes the unpickler raise many exception types; each must fall through
        with open(manager.loaded_path, "wb") as f:
            f.write(generator.bytes(100))
        with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no readable checkpoint"):
            manager.load("auto")


def test_checkpoint_empty_or_missing_folder_and_bad_state(tmp_path):
    assert CheckpointManager(str(tmp_path)).load("auto") is None
    assert CheckpointManager(str(tmp_path / "missing")).load("auto") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CheckpointManager(str(tmp_path)).load(str(tmp_path / "nope.pt"))
    with pytest.raises(TypeError, match=r"state\['args'\] is a Namespace"):
        CheckpointManager(str(tmp_path)).save({"args": argparse.Namespace(lr=1)}, 1)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------------
# train_utils.py: data

def _infra_write_images(folder, n, size=(20, 14), seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            os.path.join(folder, f"img{i}.png"))


def test_sampler_shares_cover_permutation_and_resume():
    shares = []
    for rank in range(3):
        sampler = ResumableSampler(10, rank, 3, seed=7)
        sampler.set_epoch(4)
        shares.append(list(sampler))
        assert len(sampler) == 4
    assert set(sum(shares, [])) == set(range(10)) and len(sum(shares, [])) == 12  # padded to 12
    g = torch.Generator().manual_seed(7 + 4)
    order = torch.randperm(10, generator=g).tolist()
    assert [shares[r][i] for i in range(4) for r in range(3)][:10] == order
    sampler = ResumableSampler(10, 1, 3, seed=7)
    sampler.set_epoch(5)
    straight = list(sampler)
    assert straight != shares[1]  # a new epoch, a new order
    for k in range(5):
        sampler.set_epoch(5, start=k)
        assert list(sampler) == straight[k:] and len(sampler) == 4 - k
    with pytest.raises(ValueError, match="outside"):
        sampler.set_epoch(5, start=5)
    assert list(ResumableSampler(5, 0, 1, seed=0, shuffle=False)) == [0, 1, 2, 3, 4]


def test_loader_iteration_leaves_global_rng_untouched(tmp_path):
    _infra_write_images(str(tmp_path / "a"), 4)
    dataset = ImageFolderDataset(str(tmp_path), 8)
    sampler = ResumableSampler(len(dataset), 0, 1, seed=0)
    torch.manual_seed(123)
    before, seed = torch.get_rng_state(), torch.initial_seed()
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(make_loader(dataset, 2, sampler, num_workers=0))
        assert len(batches) == 2 and batches[0][0].shape == (2, 3, 8, 8)
    assert torch.equal(torch.get_rng_state(), before) and torch.initial_seed() == seed
    list(torch.utils.data.DataLoader(dataset, batch_size=2))  # a default loader does draw from it
    assert not torch.equal(torch.get_rng_state(), before)


def test_corrupt_image_skipped_with_warning(tmp_path):
    _infra_write_images(str(tmp_path / "cat"), 2)
    _infra_write_images(str(tmp_path / "dog"), 1)
    bad = tmp_path / "dog" / "broken.jpg"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    dataset = ImageFolderDataset(str(tmp_path), 8)
    assert dataset.classes == ["cat", "dog"] and list(dataset.labels) == [0, 0, 1, 1]
    index = [i for i in range(len(dataset)) if dataset.files[i].decode().endswith("broken.jpg")][0]
    with pytest.warns(UserWarning, match="broken.jpg"):
        assert dataset[index] is None
    x, y, skipped = collate_skip([dataset[i] for i in range(len(dataset))])
    assert skipped == 1 and x.shape == (3, 3, 8, 8) and y.tolist() == [0, 0, 1]
    assert x.min() >= -1 and x.max() <= 1
    sampler = ResumableSampler(len(dataset), 0, 1, seed=0)
    assert sum(s for _, _, s in make_loader(dataset, 2, sampler, num_workers=0)) == 1
    with pytest.raises(RuntimeError, match="unreadable"):
        collate_skip([None, None])


def test_dataset_empty_missing_and_flat_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "missing"), 8)
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(str(tmp_path / "empty"), 8)
    _infra_write_images(str(tmp_path / "flat"), 3)
    flat = ImageFolderDataset(str(tmp_path / "flat"), 8)
    assert len(flat) == 3 and flat.classes == [] and all(flat[i][1] == 0 for i in range(3))


def test_center_crop_arr_size_and_scale_invariance():
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (48, 70, 3), dtype=np.uint8))
    out = center_crop_arr(base, 16)
    assert out.size == (16, 16)
    assert center_crop_arr(base.resize((35, 24)), 16).size == (16, 16)
    assert center_crop_arr(Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)), 16).size == (16, 16)
    # A 2× nearest-upsampled image is BOX-halved back to the base, so it crops to the same result.
    big = base.resize((140, 96), resample=Image.NEAREST)
    diff = np.abs(np.asarray(center_crop_arr(big, 16), dtype=int) - np.asarray(out, dtype=int))
    assert diff.max() <= 1


def test_horizontal_flip_depends_on_seed_epoch_and_index_only():
    data = [(torch.randn(3, 4, 5), 0) for _ in range(32)]

    def flips(seed, epoch):
        dataset = HorizontalFlip(data, seed)
        dataset.epoch = epoch
        return [torch.equal(dataset[i][0], data[i][0].flip(-1)) for i in range(32)]

    assert flips(3, 0) == flips(3, 0) and any(flips(3, 0)) and not all(flips(3, 0))
    assert flips(3, 0) != flips(3, 1) and flips(3, 0) != flips(4, 0)


def _infra_train(root, ckpt_dir, total_steps, stop_at, init_seed):
    """A miniature trainer; returns the model after total_steps or, with stop_at, after checkpointing there."""
    seed_everything(init_seed)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(3 * 8 * 8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dataset = HorizontalFlip(ImageFolderDataset(root, 8), seed=5)
    sampler = ResumableSampler(len(dataset), 0, 1, seed=11)
    loader = make_loader(dataset, 2, sampler, num_workers=0)
    manager = CheckpointManager(ckpt_dir)
    step, epoch, start = 0, 0, 0
    state = manager.load("auto")
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, epoch, start = state["step"], state["epoch"], state["start"]
        restore_rng_states(state["rng"], 0, 1)
    while step < total_steps:
        sampler.set_epoch(epoch, start=start)
        dataset.epoch = epoch
        for x, y, _ in loader:
            loss = F.cross_entropy(model(x + 0.1 * torch.randn_like(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step, start = step + 1, start + 2
            if step == stop_at:
                manager.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "epoch": epoch,
                              "start": start,
                              "rng": tu.gather_rng_states(1)}, step)
                return model
            if step == total_steps:
                return model
        epoch, start = epoch + 1, 0
    return model


def test_resume_is_bit_identical(tmp_path):
    _infra_write_images(str(tmp_path / "data" / "a"), 3)
    _infra_write_images(str(tmp_path / "data" / "b"), 4, seed=1)  # 7 images, batch 2: 3 steps per epoch
    root = str(tmp_path / "data")
    straight = _infra_train(root, str(tmp_path / "run1"), 8, None, init_seed=0)
    _infra_train(root, str(tmp_path / "run2"), 8, 4, init_seed=0)
    resumed = _infra_train(root, str(tmp_path / "run2"), 8, None, init_seed=99)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------------------------------
# train_utils.py: RNG, preemption, non-finite steps, logging

def test_rng_state_round_trip_through_weights_only_file():
    seed_everything(5)
    random.gauss(0, 1)  # leaves a cached gaussian in python's and numpy's state
    np.random.randn(3)
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    first = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.randn(5))
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    second = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.randn(5))
    assert torch.equal(first[0], second[0]) and first[1:3] == second[1:3] and np.array_equal(first[3], second[3])
    with pytest.warns(UserWarning, match="not restored"):
        restore_rng_states([rng_state()], 0, 2)


def test_preemption_signal_sets_should_stop():
    previous = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    handler = PreemptionHandler()
    try:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.should_stop() and handler.received == signal.SIGUSR1
    finally:
        handler.restore()
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == previous


def test_non_finite_guard_and_all_finite():
    guard = NonFiniteGuard(max_in_a_row=3)
    assert not guard.step_ok(False) and not guard.step_ok(False)
    assert guard.step_ok(True) and guard.in_a_row == 0  # a good step resets the streak
    guard.step_ok(False)
    guard.step_ok(False)
    with pytest.raises(RuntimeError, match="3 consecutive steps"):
        guard.step_ok(False)
    assert guard.skipped_total == 5
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    q = nn.Parameter(torch.ones(2))  # no gradient: ignored
    assert all_finite(torch.tensor(0.5), [p, q])
    assert not all_finite(torch.tensor(math.inf), [p])
    p.grad[1] = math.nan
    assert not all_finite(torch.tensor(0.5), [p])


def test_logger_image_grid_and_batch_check(tmp_path, capsys):
    logger = Logger(str(tmp_path / "out"), enabled=True)
    logger.log(100, {"loss": torch.tensor(0.123456), "lr": 1e-4, "img/s": 123.44})
    logger.log(200, {"loss": 0.5})
    lines = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [e["step"] for e in lines] == [100, 200] and abs(lines[0]["loss"] - 0.123456) < 1e-6
    assert "step 100 | loss 0.1235 | lr 0.0001 | img/s 123.4" in capsys.readouterr().out
    Logger(str(tmp_path / "off"), enabled=False).log(1, {"loss": 1.0})
    assert not (tmp_path / "off").exists()

    images = torch.ones(4, 3, 8, 8) * 5  # out of range: clamped to white
    images[0] = -1
    path = tmp_path / "deep" / "dir" / "grid.png"
    save_image_grid(images, str(path), nrow=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2, 3)
    assert grid[2:10, 2:10].max() == 0 and grid[2:10, 12:20].min() == 255

    assert check_batch(256, 8) == 32
    with pytest.raises(ValueError, match="multiple of the world size"):
        check_batch(100, 8)


def _infra_dist_worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.cuda.is_available = lambda: False  # exercise the gloo path even on a GPU machine
    r, world_size, device = tu.setup_distributed()
    try:
        assert (r, world_size, device.type) == (rank, 2, "cpu") and tu.is_main() == (rank == 0)
        p = nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        assert all_finite(torch.tensor(1.0), [p])
        if rank == 1:
            p.grad[0] = math.nan
        assert not all_finite(torch.tensor(1.0), [p])  # one rank's NaN stops both
        handler = PreemptionHandler()
        try:
            assert not handler.should_stop()
            if rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            assert handler.should_stop()  # agreed: rank 1 got no signal
        finally:
            handler.restore()
        torch.manual_seed(rank)
        states = tu.gather_rng_states(2)
        assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
        tu.barrier()
    finally:
        tu.cleanup_distributed()


def test_two_process_gloo_agreement():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork rather than spawn: the children skip re-importing torch and the test module (seconds each on 2 cores)
    torch.multiprocessing.start_processes(_infra_dist_worker, args=(port,), nprocs=2, start_method="fork")


def _rfm_sphere(shape, radius, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return rfm.sample_noise(shape, radius, generator=g, dtype=dtype)


def _rfm_norms(x):
    return x.norm(dim=1)


def _rfm_velocity_to(point, radius):
    """Exact velocity field of geodesics ending at `point` at t = 0: at time t the geodesic from point through x has
    speed angle(point, x) / t, i.e. u_1 of the path point -> x divided by t."""
    def velocity_fn(x, t):
        _, u = rfm.geodesic_path(point.expand_as(x), x, torch.ones_like(t), radius)
        return u / t.view(-1, *[1] * (x.dim() - 1))
    return velocity_fn


def test_rfm_geodesic_on_sphere_and_endpoints():
    R = 32.0
    x0, x1 = _rfm_sphere((3, 64, 4, 4), R, 0), _rfm_sphere((3, 64, 4, 4), R, 1)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x_t, _ = rfm.geodesic_path(x0, x1, t, R)
    assert torch.allclose(_rfm_norms(x_t), torch.full_like(_rfm_norms(x_t), R), atol=1e-10)
    x_t, _ = rfm.geodesic_path(x0, x1, torch.zeros(3, dtype=torch.float64), R)
    assert torch.equal(x_t, x0)  # t = 0 is data
    x_t, _ = rfm.geodesic_path(x0, x1, torch.ones(3, dtype=torch.float64), R)
    assert torch.allclose(x_t, x1, atol=1e-10)  # t = 1 is noise
    # Eq. 12-13 literally (well-conditioned here).
    omega = torch.acos((x0 * x1).sum(1, keepdim=True) / R ** 2)
    tt = t.view(-1, 1, 1, 1)
    ref = (torch.sin((1 - tt) * omega) * x0 + torch.sin(tt * omega) * x1) / torch.sin(omega)
    assert torch.allclose(rfm.geodesic_path(x0, x1, t, R)[0], ref, atol=1e-10)


def test_rfm_velocity_is_finite_difference_tangent_and_has_norm_R_omega():
    R = 4.0
    x0, x1 = _rfm_sphere((4, 16, 3, 2), R, 2), _rfm_sphere((4, 16, 3, 2), R, 3)
    t = torch.tensor([0.05, 0.3, 0.6, 0.97], dtype=torch.float64)
    h = 1e-6
    x_t, u_t = rfm.geodesic_path(x0, x1, t, R)
    fd = (rfm.geodesic_path(x0, x1, t + h, R)[0] - rfm.geodesic_path(x0, x1, t - h, R)[0]) / (2 * h)
    assert torch.allclose(u_t, fd, atol=1e-7)
    assert (x_t * u_t).sum(1).abs().max() < 1e-10
    omega = torch.acos((x0 * x1).sum(1) / R ** 2)
    assert torch.allclose(_rfm_norms(u_t), R * omega, atol=1e-10)
    # Eq. 15 literally.
    tt, om = t.view(-1, 1, 1, 1), omega.unsqueeze(1)
    ref = om / torch.sin(om) * (torch.cos(tt * om) * x1 - torch.cos((1 - tt) * om) * x0)
    assert torch.allclose(u_t, ref, atol=1e-10)


def test_rfm_float32_edge_cases_finite_and_sensible():
    R = 32.0
    x0 = _rfm_sphere((2, 1024, 2, 2), R, 4, torch.float32)
    t = torch.tensor([0.3, 0.8])
    # Identical: the path stays at x0, the velocity is zero.
    x_t, u_t = rfm.geodesic_path(x0, x0.clone(), t, R)
    assert torch.isfinite(x_t).all() and torch.isfinite(u_t).all()
    assert torch.allclose(x_t, x0, atol=1e-4) and u_t.abs().max() < 1e-3
    # Nearly identical: straight line x0 + t (x1 - x0) to first order, velocity ~ x1 - x0.
    x1 = rfm.project_sphere(x0 + 1e-3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5)), R)
    x_t, u_t = rfm.geodesic_path(x0, x1, t, R)
    tt = t.view(-1, 1, 1, 1)
    assert torch.allclose(x_t, x0 + tt * (x1 - x0), atol=1e-4)
    assert torch.allclose(u_t, x1 - x0, atol=1e-4)
    # Antipodal (exactly and nearly): finite, on the sphere, angle pi, endpoints kept.
    noise = 1e-6 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    for x1 in (-x0, rfm.project_sphere(-x0 + noise, R)):
        x_t, u_t = rfm.geodesic_path(x0, x1, t, R)
        assert torch.isfinite(x_t).all() and torch.isfinite(u_t).all()
        assert torch.allclose(_rfm_norms(x_t), torch.full_like(_rfm_norms(x_t), R), rtol=1e-5)
        assert torch.allclose(_rfm_norms(u_t), torch.full_like(_rfm_norms(u_t), R * math.pi), rtol=1e-4)
        assert (x_t * u_t).sum(1).abs().max() / (R * R * math.pi) < 1e-5
        # angle from x0 grows as t * pi
        cos = (x_t * x0).sum(1) / R ** 2
        assert torch.allclose(cos, torch.cos(math.pi * tt.view(-1, 1, 1)).expand_as(cos), atol=1e-4)
        end, _ = rfm.geodesic_path(x0, x1, torch.ones(2), R)
        assert torch.allclose(end, x1, atol=1e-3)


def test_rfm_tokens_are_independent():
    R = 8.0
    x0, x1 = _rfm_sphere((2, 64, 3, 3), R, 7, torch.float32), _rfm_sphere((2, 64, 3, 3), R, 8, torch.float32)
    t = torch.tensor([0.4, 0.7])
    x_t, u_t = rfm.geodesic_path(x0, x1, t, R)
    x1b = x1.clone()
    x1b[:, :, 1, 2] = -x0[:, :, 1, 2]  # even an antipodal token must not leak into the others
    x_tb, u_tb = rfm.geodesic_path(x0, x1b, t, R)
    keep = torch.ones(3, 3, dtype=torch.bool)
    keep[1, 2] = False
    assert torch.equal(x_t[:, :, keep], x_tb[:, :, keep]) and torch.equal(u_t[:, :, keep], u_tb[:, :, keep])
    assert not torch.allclose(x_t[:, :, 1, 2], x_tb[:, :, 1, 2])


def test_rfm_euler_proj_second_order_and_rodrigues_exact():
    R = 4.0
    point = _rfm_sphere((1, 16, 5), R, 9)
    x_noise = _rfm_sphere((3, 16, 5), R, 10)
    # (a) the path's own velocity u_t, independent of x: Euler-proj moves by atan(|dt| W) instead of |dt| W per step,
    # a local error O(dt^3) that accumulates to O(1/N^2).
    path_velocity = lambda x, t: rfm.geodesic_path(point.expand_as(x), x_noise, t, R)[1]
    # (b) the field of geodesics into `point`: it re-aims at every step, so only the last step's error survives,
    # (dt W)^3 / 3 = O(1/N^3).
    into_point = _rfm_velocity_to(point, R)
    for velocity_fn, ratio in ((path_velocity, 4.0), (into_point, 8.0)):
        errors = []
        for steps in (8, 16, 32, 64):
            x = rfm.sample_euler_proj(velocity_fn, x_noise, R, alpha=1.0, steps=steps)
            errors.append((x - point).norm(dim=1).max().item())
        for coarse, fine in zip(errors[:-1], errors[1:]):
            assert abs(coarse / fine / ratio - 1) < 0.15, errors
        for alpha in (1.0, 3.0):
            x = rfm.sample_rodrigues(velocity_fn, x_noise, R, alpha=alpha, steps=5)
            assert torch.allclose(x, point.expand_as(x), atol=1e-10)
            assert torch.allclose(_rfm_norms(x), torch.full_like(_rfm_norms(x), R), atol=1e-12)


def test_rfm_zero_velocity_leaves_x_unchanged():
    R = 32.0
    x = _rfm_sphere((2, 1024, 2, 2), R, 11, torch.float32)
    zero = lambda x, t: torch.zeros_like(x)
    assert torch.equal(rfm.sample_rodrigues(zero, x, R, alpha=8.0, steps=10), x)
    assert torch.allclose(rfm.sample_euler_proj(zero, x, R, alpha=8.0, steps=10), x, atol=1e-5)
    # a purely radial velocity is discarded by the projection
    radial = lambda x, t: 3.0 * x
    x = _rfm_sphere((2, 1024, 2, 2), R, 11)
    assert torch.allclose(rfm.sample_rodrigues(radial, x, R, alpha=8.0, steps=10), x, atol=1e-10)
    assert torch.allclose(rfm.sample_euler_proj(radial, x, R, alpha=8.0, steps=10), x, atol=1e-10)


def test_rfm_time_shift_and_grid():
    assert rfm.shift_alpha(16 * 16, 1024) == 8.0
    for alpha in (0.5, 1.0, 8.0):
        assert rfm.time_shift(0.0, alpha) == 0.0 and rfm.time_shift(1.0, alpha) == 1.0
    t = torch.linspace(0, 1, 101)
    s = rfm.time_shift(t, 8.0)
    assert (s[1:] > s[:-1]).all() and (s[1:-1] > t[1:-1]).all()  # monotone, towards noise
    grid = rfm.time_grid(10, 8.0)
    assert grid[0] == 1 and grid[-1] == 0 and len(grid) == 11 and (grid[1:] < grid[:-1]).all()
    assert torch.allclose(grid, rfm.time_shift(torch.linspace(1, 0, 11, dtype=torch.float64), 8.0))
    g = torch.Generator().manual_seed(0)
    ts = rfm.sample_time(20000, 8.0, generator=g)
    assert ts.shape == (20000,) and (ts > 0).all() and (ts < 1).all()
    # the median of logit-normal(0,1) is 1/2, mapped to alpha/(1+alpha)
    assert abs(ts.median().item() - 8 / 9) < 0.01
    with pytest.raises(ValueError):
        rfm.time_grid(0, 1.0)


def test_rfm_guided_velocity():
    R, C, null = 4.0, 16, 5
    g = torch.Generator().manual_seed(12)
    W = torch.randn(C, C, generator=g, dtype=torch.float64)
    bias = torch.randn(null + 1, C, generator=g, dtype=torch.float64)
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return torch.einsum("dc,bchw->bdhw", W, x) + bias[y][:, :, None, None] * (1 + t.view(-1, 1, 1, 1))

    x = _rfm_sphere((3, C, 2, 2), R, 13)
    y = torch.tensor([0, 3, 4])
    t = torch.full((3,), 0.5, dtype=torch.float64)
    v_c, v_u = model(x, t, y), model(x, t, torch.full_like(y, null))
    calls.clear()
    v = rfm.guided_velocity(model, y, 3.0, R, interval=(0.2, 0.6), null_class=null)(x, t)
    assert calls == [6]  # one batched forward of [cond; uncond]
    assert torch.allclose(v, rfm.project_tangent(x, v_u + 3.0 * (v_c - v_u), R))
    assert (v * x).sum(1).abs().max() < 1e-10
    # w = 1 is the conditional velocity; outside the interval the conditional velocity is used
    v1 = rfm.guided_velocity(model, y, 1.0, R, null_class=null)(x, t)
    assert torch.allclose(v1, rfm.project_tangent(x, v_c, R))
    t_out = torch.full((3,), 0.9, dtype=torch.float64)
    v_out = rfm.guided_velocity(model, y, 3.0, R, interval=(0.2, 0.6), null_class=null)(x, t_out)
    assert torch.allclose(v_out, rfm.project_tangent(x, model(x, t_out, y), R))
    # per-sample times straddling the interval
    t_mix = torch.tensor([0.5, 0.9, 0.3], dtype=torch.float64)
    v_mix = rfm.guided_velocity(model, y, 3.0, R, interval=(0.2, 0.6), null_class=null)(x, t_mix)
    c, u = model(x, t_mix, y), model(x, t_mix, torch.full_like(y, null))
    inside = torch.tensor([True, False, True]).view(-1, 1, 1, 1)
    assert torch.allclose(v_mix, rfm.project_tangent(x, torch.where(inside, u + 3.0 * (c - u), c), R))


def test_rfm_loss_zero_for_exact_target_and_ignores_radial_part():
    R = 4.0
    x_data = _rfm_sphere((8, 16, 2, 2), R, 14)

    def exact(x_t, t, y):
        _, u = rfm.geodesic_path(x_data, x_t, torch.ones_like(t), R)
        return u / t.view(-1, 1, 1, 1)

    radial = lambda x_t, t, y: exact(x_t, t, y) + 5.0 * x_t * (1 + t.view(-1, 1, 1, 1))
    for model in (exact, radial):
        loss = rfm.rfm_loss(model, x_data, None, R, alpha=8.0, generator=torch.Generator().manual_seed(0))
        assert loss.ndim == 0 and loss.item() < 1e-16
    wrong = lambda x_t, t, y: torch.zeros_like(x_t)
    assert rfm.rfm_loss(wrong, x_data, None, R, alpha=8.0).item() > 1.0
    # Euclidean baseline: x_t = (1-t) x_data + t eps, target eps - x_data = (x_t - x_data) / t
    lin = lambda x_t, t, y: (x_t - x_data) / t.view(-1, 1, 1, 1)
    loss = rfm.rfm_loss(lin, x_data, None, R, alpha=1.0, euclidean=True, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-16
    assert rfm.rfm_loss(radial, x_data, None, R, alpha=1.0, euclidean=True).item() > 1.0


def _rfm_mixture_velocity(points, weights, radius):
    """Exact marginal velocity of the geodesic interpolant from a point mixture (t = 0) to uniform noise (t = 1).

    Given component k, x_t sits at angle phi = t * angle(p_k, x_1) from p_k, in a uniformly random direction. Under
    the uniform prior on S^n the angle a = angle(p_k, x_1) has density ~ sin(a)^(n-1), so x_t has surface density
    ~ (1/t) sin(phi/t)^(n-1) / sin(phi)^(n-1) for phi < t*pi (zero beyond). The posterior over k given x_t follows,
    and the marginal velocity is the posterior-weighted conditional velocity -log_{x_t}(p_k) / t.
    """
    n = points.shape[1] - 1

    def velocity_fn(x, t):
        tt = t.view(-1, *[1] * (x.dim() - 1))
        logs = torch.stack([rfm.log_map(x, p.view(1, -1, *[1] * (x.dim() - 2)).expand_as(x), radius)
                            for p in points])  # [K, B, C, ...]
        phi = logs.norm(dim=2, keepdim=True) / radius
        ratio = torch.sinc(phi / tt / math.pi) / torch.sinc(phi / math.pi) / tt  # sin(phi/t) / sin(phi)
        logw = torch.log(weights).view(-1, *[1] * (x.dim())) + (n - 1) * torch.log(ratio.clamp_min(1e-300))
        logw = torch.where(phi < tt * math.pi, logw, torch.full_like(logw, -math.inf))
        post = torch.softmax(logw, dim=0)
        return -(post * logs).sum(0) / tt

    return velocity_fn


def test_rfm_mixture_marginal_velocity_reproduces_weights():
    R, C = 4.0, 16
    points = rfm.project_sphere(torch.randn(3, C, generator=torch.Generator().manual_seed(15), dtype=torch.float64), R)
    weights = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    velocity_fn = _rfm_mixture_velocity(points, weights, R)
    x_noise = _rfm_sphere((100, C, 100), R, 16)  # 10,000 independent tokens
    x = rfm.sample_euler_proj(velocity_fn, x_noise, R, alpha=1.0, steps=40)
    dist = torch.stack([(x - p.view(1, -1, 1)).norm(dim=1) for p in points])
    assert dist.min(0).values.max() < 0.05 * R  # every token lands on a mixture point
    freq = torch.bincount(dist.argmin(0).flatten(), minlength=3).double() / dist[0].numel()
    assert (freq - weights).abs().max() < 0.02, freq


def test_rfm_shape_errors():
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError):
        rfm.geodesic_path(x, torch.randn(2, 8, 3, 4), torch.rand(2), 1.0)
    with pytest.raises(ValueError):
        rfm.geodesic_path(x, x, torch.rand(2, 1), 1.0)
    with pytest.raises(ValueError):
        rfm.sample_noise((8,), 1.0)


def test_rfm_toy_study_smoke():
    curves, off_sphere = rfm.toy_study(seeds=(0,), steps=3, eval_every=2, batch=64, num_eval=100, sample_steps=4)
    assert set(curves) == {"rfm", "fm"}
    for method in curves:
        assert sorted(curves[method]) == [2, 3]
        assert all(math.isfinite(v) for vals in curves[method].values() for v in vals)
    assert len(off_sphere) == 1 and off_sphere[0] > 0


@functools.lru_cache(maxsize=None)
def _fid_net():
    return fid.random_inception(seed=0)


def _fid_images(n=10, size=64, seed=0):
    """Smooth random colour fields plus noise: image-like uint8 [n,size,size,3] with varied statistics."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    noisy = smooth + 20 * torch.randn(n, 3, size, size, generator=g)
    return noisy.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@functools.lru_cache(maxsize=None)
def _fid_features():
    return fid.inception_features(_fid_net(), _fid_images(), batch_size=5, progress=False)


def _fid_tf1_resize_loop(img, out_h, out_w):
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) written out pixel by pixel."""
    in_h, in_w = img.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = i * in_h / out_h
        y0, dy = int(math.floor(y)), y - math.floor(y)
        y1 = min(y0 + 1, in_h - 1)
        for j in range(out_w):
            x = j * in_w / out_w
            x0, dx = int(math.floor(x)), x - math.floor(x)
            x1 = min(x0 + 1, in_w - 1)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


def _fid_random_cov(d, n, rng):
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / math.sqrt(d)
    return np.cov(a, rowvar=False)


def test_fid_state_dict_keys_match_torchvision_inception3():
    from torchvision.models.inception import Inception3
    tv = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    ours = {k: tuple(v.shape) for k, v in fid.FIDInception().state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in tv.state_dict().items()}
    modules = list(fid.FIDInception().modules())
    assert all(m.bias is None for m in modules if isinstance(m, torch.nn.Conv2d))
    assert all(m.eps == 1e-3 for m in modules if isinstance(m, torch.nn.BatchNorm2d))


def test_fid_blocks_match_torchvision_except_pooling():
    """Same weights in torchvision's blocks: identical outputs except where pytorch-fid changed the pool branch
    (padding excluded from averages, max pool in Mixed_7c), which only touches the border pixels of average pools."""
    from torchvision.models import inception as tv
    torch.manual_seed(0)
    cases = [(fid.InceptionA(192, 32), tv.InceptionA(192, 32), 192, 32, "avg"),
             (fid.InceptionB(288), tv.InceptionB(288), 288, 0, None),
             (fid.InceptionC(768, 128), tv.InceptionC(768, 128), 768, 192, "avg"),
             (fid.InceptionD(768), tv.InceptionD(768), 768, 0, None),
             (fid.InceptionE(1280, max_pool=False), tv.InceptionE(1280), 1280, 192, "avg"),
             (fid.InceptionE(2048, max_pool=True), tv.InceptionE(2048), 2048, 192, "max")]
    for ours, ref, cin, pool_ch, pool in cases:
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        ref.load_state_dict(ours.state_dict())
        ours.eval(), ref.eval()
        x = torch.randn(1, cin, 9, 9)
        with torch.no_grad():
            a, b = ours(x), ref(x)
        assert a.shape == b.shape
        keep = a.shape[1] - pool_ch
        torch.testing.assert_close(a[:, :keep], b[:, :keep], rtol=1e-5, atol=1e-5)
        if pool == "avg":
            torch.testing.assert_close(a[:, keep:, 1:-1, 1:-1], b[:, keep:, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(a[:, keep:], b[:, keep:], atol=1e-5)
        elif pool == "max":
            assert not torch.allclose(a[:, keep:, 1:-1, 1:-1], b[:, keep:, 1:-1, 1:-1], atol=1e-5)


def test_fid_load_inception_with_and_without_num_batches_tracked(tmp_path):
    state = _fid_net().state_dict()
    assert any(k.endswith("num_batches_tracked") for k in state)
    stripped = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for name, sd in (("with.pth", state), ("without.pth", stripped)):
        torch.save(sd, tmp_path / name)
        net = fid.load_inception(tmp_path / name)
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        for k, v in stripped.items():
            assert torch.equal(net.state_dict()[k], v), k
    torch.save({**stripped, "AuxLogits.fc.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="AuxLogits"):
        fid.load_inception(tmp_path / "bad.pth")


def test_fid_missing_inception_names_file_and_url(tmp_path):
    path = tmp_path / "nowhere" / fid.FID_WEIGHTS_NAME
    with pytest.raises(FileNotFoundError) as err:
        fid.load_inception(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + fid.FID_WEIGHTS_NAME in msg


def test_fid_default_inception_path_uses_env(monkeypatch):
    monkeypatch.setenv("DINO_SAE_WEIGHTS", "/some/dir")
    assert fid.default_inception_path() == os.path.join("/some/dir", fid.FID_WEIGHTS_NAME)
    monkeypatch.delenv("DINO_SAE_WEIGHTS")
    assert fid.default_inception_path() == os.path.join("weights", fid.FID_WEIGHTS_NAME)


def test_fid_features_shapes_stable_and_batch_size_invariant():
    feats = _fid_features()
    assert feats["pool"].shape == (10, 2048) and feats["logits"].shape == (10, 1008)
    assert feats["spatial"].shape == (10, 2023)
    for v in feats.values():
        assert v.dtype == np.float32 and np.isfinite(v).all()
    # Stable regime: activations neither vanish nor explode, and differ between images.
    assert 0.05 < feats["pool"].mean() < 5 and feats["pool"].std(0).mean() > 1e-3
    assert (feats["pool"] >= 0).all() and (feats["spatial"] >= 0).all()  # post-ReLU features
    np.testing.assert_allclose(feats["logits"], feats["pool"] @ _fid_net().fc.weight.numpy().T, rtol=1e-4, atol=1e-4)
    images = _fid_images()[:3]
    again = fid.inception_features(_fid_net(), torch.from_numpy(images), batch_size=2, progress=False)
    for k in feats:
        np.testing.assert_allclose(again[k], feats[k][:3], rtol=1e-4, atol=1e-5)


def test_fid_features_reject_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        fid.inception_features(_fid_net(), np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        fid.inception_features(_fid_net(), np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="preprocess"):
        fid.inception_features(_fid_net(), np.zeros((2, 32, 32, 3), np.uint8), preprocess="tf2")


def test_fid_tf1_resize_matches_legacy_formula():
    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in [((5, 7), (9, 13)), ((9, 6), (4, 5)), ((6, 6), (6, 6)), ((3, 4), (11, 11))]:
        img = rng.uniform(0, 255, (h, w))
        ours = fid.resize_tf1(torch.tensor(img).view(1, 1, h, w), (oh, ow))[0, 0].numpy()
        np.testing.assert_allclose(ours, _fid_tf1_resize_loop(img, oh, ow), rtol=1e-10, atol=1e-9)


def test_fid_preprocessing_conventions():
    x = torch.tensor(_fid_images(2, 32)).permute(0, 3, 1, 2).float()
    adm = fid.preprocess_adm(x)
    assert adm.shape == (2, 3, 299, 299)
    torch.testing.assert_close(adm, (fid.resize_tf1(x, 299) - 128) / 128)
    assert adm[..., 0, 0].allclose((x[..., 0, 0] - 128) / 128)  # legacy resize samples the top-left pixel exactly
    pt = fid.preprocess_pytorch_fid(x)
    assert pt.shape == (2, 3, 299, 299) and pt.min() >= -1 and pt.max() <= 1
    assert not torch.allclose(pt, adm, atol=1e-3)
    full = torch.tensor(_fid_images(1, 299)).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(fid.preprocess_adm(full), (full - 128) / 128)  # 299 inputs pass through unchanged


def test_fid_of_identical_sets_is_zero_and_of_equal_covariances_is_mean_distance():
    rng = np.random.default_rng(0)
    sigma = _fid_random_cov(64, 500, rng)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    assert abs(fid.frechet_distance(mu1, sigma, mu1, sigma)) < 1e-9 * np.trace(sigma)
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(mu1, sigma, mu1[:3], sigma)


def test_fid_agrees_with_sqrtm_and_eigenvalue_formulations():
    from scipy import linalg
    rng = np.random.default_rng(1)
    s1, s2 = _fid_random_cov(48, 300, rng), _fid_random_cov(48, 200, rng)
    mu1, mu2 = rng.standard_normal(48), rng.standard_normal(48)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    base = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
    by_eigvals = base - 2 * np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(min=0)).sum()
    by_sqrtm = base - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real
    assert ours == pytest.approx(by_eigvals, rel=1e-6, abs=1e-6)
    assert ours == pytest.approx(by_sqrtm, rel=1e-6, abs=1e-6)
    assert ours == pytest.approx(fid.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_fid_inception_score_of_confident_uniform_predictions_is_k():
    for k in (1, 4, 25):
        labels = np.tile(np.arange(k), 40)  # every sequential split holds every class equally often
        logits = 80.0 * np.eye(1008)[labels]
        assert fid.inception_score(logits, splits=10) == pytest.approx(k, rel=1e-9)
    assert fid.inception_score(np.zeros((20, 1008))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="splits"):
        fid.inception_score(np.zeros((5, 1008)), splits=10)


def test_fid_precision_recall_limits():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((60, 32)).astype(np.float32)
    assert fid.precision_recall(a, a, k=3) == (1.0, 1.0)
    assert fid.precision_recall(a, a + 100, k=3) == (0.0, 0.0)
    # Samples from half of the reference support: precise (all inside) but low recall.
    ref = rng.uniform(0, 1, (400, 2)).astype(np.float32)
    smp = rng.uniform(0, 1, (400, 2)).astype(np.float32) * np.float32([0.5, 1]) + np.float32([0.25, 0])
    precision, recall = fid.precision_recall(ref, smp, k=3)
    assert precision > 0.95 and 0.4 < recall < 0.75
    with pytest.raises(ValueError, match="k=3"):
        fid.precision_recall(a[:3], a, k=3)


def test_fid_psnr_ssim_identical_and_closed_forms():
    x = _fid_images(3, 32)
    p, s = fid.psnr(x, x), fid.ssim(x, x)
    assert torch.isinf(p).all() and not torch.isnan(p).any() and math.isinf(p.mean().item())
    torch.testing.assert_close(s, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    y = x.astype(np.int16) + np.where(np.arange(32) % 2 == 0, 3, -3)[None, None, :, None]
    y = y.clip(0, 255).astype(np.uint8)
    mse = ((x.astype(np.float64) - y) ** 2).reshape(3, -1).mean(1)
    torch.testing.assert_close(fid.psnr(x, y), torch.tensor(10 * np.log10(255 ** 2 / mse)))
    # Flat images a and b: no variance, so SSIM = (2ab + C1) / (a² + b² + C1).
    a, b = np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 140, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert fid.ssim(a, b).item() == pytest.approx((2 * 100 * 140 + c1) / (100 ** 2 + 140 ** 2 + c1), rel=1e-12)
    assert fid.ssim(x, y).lt(1).all()
    with pytest.raises(ValueError, match="shape"):
        fid.psnr(x, x[:2])


def test_fid_center_crop_and_image_folder(tmp_path):
    from PIL import Image
    ramp = np.tile(np.linspace(0, 255, 300)[None, :, None], (200, 1, 3)).astype(np.uint8)
    crop = np.asarray(center_crop_arr(Image.fromarray(ramp), 64))
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    assert abs(int(crop[:, 32].mean()) - 128) <= 3  # the centre column of the ramp stays in the centre
    images = _fid_images(3, 40)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{2 - i}.png")
    folder = fid.load_images(str(tmp_path), 40)
    assert len(folder) == 3 and folder.shape == (3, 40, 40, 3)
    np.testing.assert_array_equal(folder[0:3], images[::-1])  # sorted paths; same-size images are not resampled
    with pytest.raises(ValueError, match="size"):
        fid.load_images(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        fid.load_images(str(tmp_path / "missing.npz"))


def test_fid_paired_metrics_against_image_folder(tmp_path):
    import lpips
    from PIL import Image
    images = _fid_images()
    (tmp_path / "val" / "cls").mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "val" / "cls" / f"{i:03d}.png")
    originals = fid.load_images(str(tmp_path / "val"), 64)
    lpips_net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    same = fid.paired_metrics(images, originals, lpips_net, batch_size=4, progress=False)
    assert math.isinf(same["psnr"]) and same["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert same["lpips"] == pytest.approx(0, abs=1e-6)
    shifted = (images.astype(np.int16) + 10).clip(0, 255).astype(np.uint8)
    other = fid.paired_metrics(shifted, originals, lpips_net, batch_size=4, progress=False)
    assert other["psnr"] == pytest.approx(fid.psnr(shifted, images).mean().item())
    assert other["ssim"] == pytest.approx(fid.ssim(shifted, images).mean().item())
    assert 0 < other["ssim"] < 1
    a, b = (torch.from_numpy(t).permute(0, 3, 1, 2).float() / 127.5 - 1 for t in (shifted, images))
    with torch.no_grad():
        direct = lpips_net(a, b).mean().item()  # LPIPS on [-1, 1] images; random heads can make it negative
    assert other["lpips"] == pytest.approx(direct, rel=1e-4, abs=1e-7) and abs(direct) > 1e-5
    # Paired mode needs the original images, and says so before the Inception pass.
    np.savez(tmp_path / "recons.npz", arr_0=images)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048))
    with pytest.raises(ValueError, match="arr_0"):
        fid.evaluate(str(tmp_path / "recons.npz"), str(tmp_path / "stats.npz"), _fid_net(), paired=True,
                     lpips_net=lpips_net, progress=False)
    with pytest.raises(ValueError, match="square"):
        np.savez(tmp_path / "wide.npz", arr_0=np.zeros((2, 16, 24, 3), np.uint8))
        fid.evaluate(str(tmp_path / "wide.npz"), str(tmp_path / "val"), _fid_net(), progress=False)


def test_fid_cli_end_to_end(tmp_path):
    net, feats = _fid_net(), _fid_features()
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    np.savez(tmp_path / "samples.npz", arr_0=_fid_images())
    # An ADM-style reference batch: statistics given (here those of the samples) plus a few images whose features
    # feed precision/recall; the CLI computes those features and caches them next to it.
    mu, sigma = fid.feature_stats(feats["pool"])
    mu_s, sigma_s = fid.feature_stats(feats["spatial"])
    np.savez(tmp_path / "ref.npz", arr_0=_fid_images()[:4], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    out = tmp_path / "metrics.json"
    here = os.path.dirname(os.path.abspath(fid.__file__))
    proc = subprocess.run([sys.executable, os.path.join(here, "fid.py"), str(tmp_path / "samples.npz"),
                           str(tmp_path / "ref.npz"), "--inception", str(tmp_path / "inception.pth"),
                           "--json", str(out), "--batch-size", "5"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results) == {"fid", "sfid", "inception_score", "precision", "recall", "num_samples"}
    assert "fid:" in proc.stdout and results["num_samples"] == 10
    assert abs(results["fid"]) < 1e-4 and abs(results["sfid"]) < 1e-3
    assert results["inception_score"] == pytest.approx(fid.inception_score(feats["logits"]), rel=1e-4)
    assert (results["precision"], results["recall"]) == fid.precision_recall(feats["pool"][:4], feats["pool"])
    # The statistics were cached next to REF; both the cache and REF itself now resolve to them without a pass.
    cached = fid.reference_stats(str(tmp_path / "ref_adm_fidstats.npz"), net)
    np.testing.assert_allclose(cached["pool"], feats["pool"][:4], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(cached["sigma"], sigma)
    np.testing.assert_array_equal(fid.reference_stats(str(tmp_path / "ref.npz"), net)["pool"], cached["pool"])
    with pytest.raises(ValueError, match="another Inception"):
        fid.reference_stats(str(tmp_path / "ref_adm_fidstats.npz"), fid.random_inception(seed=1))
    missing = subprocess.run([sys.executable, os.path.join(here, "fid.py"), str(tmp_path / "samples.npz"),
                              str(tmp_path / "ref.npz"), "--inception", str(tmp_path / "no.pth")],
                             capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode != 0 and fid.FID_WEIGHTS_URL in missing.stderr.strip().splitlines()[-1]


def _probe_tiny_checkpoint(tmp_path):
    """A random tiny DINO-SAE saved in train_ae.py's checkpoint format -> its stage folder."""
    torch.manual_seed(0)
    config = dict(TINY_CONFIG, **make_tiny_weights(str(tmp_path / "weights")))
    ae = build_autoencoder(config)
    folder = str(tmp_path / "stage4")
    state = dict(kind="dino-sae-ae", stage=4, config=config, stem=ae.encoder.stem.state_dict(),
                 decoder=ae.decoder.state_dict())
    tu.CheckpointManager(folder).save(state, 0)
    return folder


def _probe_images(n, seed=0):
    data = tu.SyntheticImages(num_items=n, image_size=TINY_CONFIG["image_size"], seed=seed)
    return torch.stack([data[i][0] for i in range(n)])


def test_linear_probe_separable_features_reach_top1_one():
    g = torch.Generator().manual_seed(0)

    def sample(n):
        y = torch.randint(0, 4, (n,), generator=g)
        f = torch.randn(n, 16, generator=g) * 0.3
        f[:, :4] += 3 * torch.nn.functional.one_hot(y, 4)
        return f, y

    (ft, yt), (fv, yv) = sample(200), sample(100)
    result = probe.train_linear_probe(ft, yt, fv, yv)
    assert result["top1"] == 1.0
    assert result["top5"] >= result["top1"]


def test_linear_probe_random_labels_near_chance():
    g = torch.Generator().manual_seed(1)
    ft, yt = torch.randn(400, 32, generator=g), torch.randint(0, 4, (400,), generator=g)
    fv, yv = torch.randn(2000, 32, generator=g), torch.randint(0, 4, (2000,), generator=g)
    result = probe.train_linear_probe(ft, yt, fv, yv)
    assert result["top1"] < 0.5
    assert result["top5"] >= result["top1"]
    assert result["top5"] == 1.0  # 4 classes: top-min(5, 4) always hits


def test_linear_probe_rejects_bad_inputs():
    f, y = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(ValueError, match="dim"):
        probe.train_linear_probe(f, y, torch.randn(10, 5), y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        probe.train_linear_probe(f, torch.zeros(10, dtype=torch.long), f, y)


def test_pca_rgb_matches_svd_projection():
    g = torch.Generator().manual_seed(0)
    B, h, w, D = 2, 3, 4, 8
    tokens = torch.randn(B, h * w, D, generator=g) * torch.linspace(3, 0.2, D)  # distinct variances
    tokens = tokens @ torch.linalg.qr(torch.randn(D, D, generator=g))[0] + 5  # rotated and shifted
    rgb = probe.pca_rgb(tokens, h, w)
    assert rgb.shape == (B, 3, h, w)
    assert rgb.min() >= 0 and rgb.max() <= 1
    x = tokens.reshape(-1, D).double()
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    for c in range(3):
        proj = x @ vh[c]
        got = rgb[:, c].reshape(-1).double()  # row-major tokens, like the patch sequence
        corr = np.corrcoef(proj.numpy(), got.numpy())[0, 1]
        assert abs(corr) > 0.99
    with pytest.raises(ValueError, match="tokens"):
        probe.pca_rgb(tokens, h, w + 1)


def test_pca_maps_writes_grid_png(tmp_path):
    from PIL import Image
    ae, _ = load_autoencoder(_probe_tiny_checkpoint(tmp_path))
    images = _probe_images(2)
    path = str(tmp_path / "maps" / "pca.png")
    grid = probe.pca_maps(ae, images, path)
    size = TINY_CONFIG["image_size"]
    with Image.open(path) as im:
        assert im.size == (3 * (size + 2) + 2, 2 * (size + 2) + 2)  # save_image's 2-pixel padding
    assert grid.shape == (6, 3, size, size)
    assert torch.equal(grid[0::3], images)
    patch = ae.encoder.vit.patch_size
    maps = grid[1::3]
    assert maps.min() >= -1 and maps.max() <= 1
    assert torch.equal(maps, maps[:, :, ::patch, ::patch].repeat_interleave(patch, 2).repeat_interleave(patch, 3))


def test_magnitude_psnr_factor_one_is_reconstruction_psnr(tmp_path):
    ae, _ = load_autoencoder(_probe_tiny_checkpoint(tmp_path))
    images = _probe_images(4)
    result = probe.magnitude_psnr(ae, images, [0.5, 1, 2], batch_size=2, progress=False)
    assert list(result) == [0.5, 1.0, 2.0]
    with torch.no_grad():
        x_hat = ae(images)["x_hat"]
    expected = psnr(probe.to_uint8(x_hat), probe.to_uint8(images)).mean().item()
    assert result[1.0] == pytest.approx(expected, abs=1e-6)
    assert result[0.5] != result[1.0]  # the decoder does see the magnitude


def test_to_uint8_inverts_dataset_scaling():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    x = u.float() / 127.5 - 1  # ImageFolderDataset's scaling
    assert torch.equal(probe.to_uint8(x), u.permute(0, 2, 3, 1))


def test_linear_cli_tiny_end_to_end(tmp_path, capsys):
    folder = _probe_tiny_checkpoint(tmp_path)
    out = str(tmp_path / "linear.json")
    probe.main(["linear", "--preset", "tiny", "--ae", folder, "--num-images", "32", "--json", out])
    with open(out) as f:
        result = json.load(f)
    assert result == json.loads(capsys.readouterr().out)
    assert (result["num_train"], result["num_val"]) == (32, 8)
    assert result["feature_dim"] == 2 * 128
    for name in ("teacher", "student"):
        assert 0 <= result[name]["top1"] <= result[name]["top5"] <= 1


def test_cli_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no autoencoder checkpoint"):
        probe.main(["magnitude", "--preset", "tiny", "--ae", str(tmp_path / "missing")])
    folder = _probe_tiny_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="image folder is required"):
        probe.main(["pca", "--ae", folder])
    with pytest.raises(ValueError, match="both --train-data and --val-data"):
        probe.main(["linear", "--preset", "tiny", "--ae", folder, "--train-data", str(tmp_path)])
    assert os.path.isdir(folder)


_GEN_CACHE = {}


def _gen_autoencoder(tmp_path):
    """A tiny stage-4 DINO-SAE checkpoint with random weights, written by train_ae's own checkpoint code (made once)."""
    if "ae" not in _GEN_CACHE:
        out = str(tmp_path / "ae")
        args = train_ae.parse_args(["--stage", "4", "--preset", "tiny", "--out", out])
        config = train_ae.build_config(args)
        torch.manual_seed(0)
        ae = train_ae.build_autoencoder(config)
        opt = torch.optim.AdamW(ae.decoder.parameters())
        progress = dict(step=0, epoch=0, step_in_epoch=0, skipped_images=0, nonfinite=0)
        state = train_ae.checkpoint_state(args, config, ae, None, opt, None, progress, tu.gather_rng_states(1))
        _GEN_CACHE["ae"] = tu.CheckpointManager(os.path.join(out, "stage4")).save(state, 0)
    return _GEN_CACHE["ae"]


def _gen_train(tmp_path, out, *extra):
    argv = ["--preset", "tiny", "--ae", _gen_autoencoder(tmp_path), "--out", str(out), "--num-images", "12",
            "--global-batch", "4", "--log-every", "1", "--sample-every", "1000", "--ckpt-every", "1000", *extra]
    return train_dit.main(argv)


def _gen_dit(tmp_path):
    """A tiny LightningDiT run folder (2 steps), made once."""
    if "dit" not in _GEN_CACHE:
        _gen_train(tmp_path, tmp_path / "dit", "--max-steps", "2")
        _GEN_CACHE["dit"] = str(tmp_path / "dit")
    return _GEN_CACHE["dit"]


def _gen_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _gen_png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])  # width, height


def test_tiny_dit_loss_falls(tmp_path):
    out = tmp_path / "learn"
    _gen_train(tmp_path, out, "--num-images", "8", "--global-batch", "8", "--max-steps", "30")
    losses = [m["loss"] for m in _gen_metrics(str(out))]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:3])  # ~0.8: what is left is the variance of the target
    assert _gen_png_size(out / "samples_0000030.png") == (8 * 66 + 2, 2 * 66 + 2)  # 16 EMA samples, 8 per row
    state = torch.load(out / "ckpt_0000030.pt", weights_only=True)
    assert state["kind"] == "dino-sae-dit" and state["model_kwargs"]["in_channels"] == 128
    assert state["ae_config"]["image_size"] == 64 and state["progress"]["step"] == 30


def _gen_weights(model, ema):
    return {**{f"model.{k}": v for k, v in model.state_dict().items()},
            **{f"ema.{k}": v for k, v in ema.state_dict().items()}}


def test_dit_resume_bit_identical_and_sigterm_checkpoint(tmp_path, monkeypatch):
    # DiT^DH: lr warm-up (1 epoch = 3 steps in the tiny preset) and grad clipping are part of the resumed state.
    common = ("--model", "DiTDH-XL/1", "--max-steps", "6")
    straight = _gen_weights(*_gen_train(tmp_path, tmp_path / "straight", *common))

    halves = tmp_path / "halves"
    _gen_train(tmp_path, halves, "--model", "DiTDH-XL/1", "--max-steps", "4", "--ckpt-every", "2")  # mid-epoch
    newest = halves / "ckpt_0000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a crash while writing, say
    with pytest.warns(UserWarning, match="ckpt_0000004.pt is unreadable"):
        resumed = _gen_weights(*_gen_train(tmp_path, halves, *common))  # falls back to step 2, runs 3..6

    real_loss, calls = train_dit.rfm_loss, []

    def loss_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step finishes, then checkpoint and return
        return real_loss(*a, **k)

    monkeypatch.setattr(train_dit, "rfm_loss", loss_then_signal)
    _gen_train(tmp_path, tmp_path / "preempted", *common)
    monkeypatch.setattr(train_dit, "rfm_loss", real_loss)
    assert len(calls) == 2 and sorted(f for f in os.listdir(tmp_path / "preempted") if f.startswith("ckpt")) == \
        ["ckpt_0000002.pt"]
    after_signal = _gen_weights(*_gen_train(tmp_path, tmp_path / "preempted", *common))

    assert straight.keys() == resumed.keys() == after_signal.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
        assert torch.equal(straight[k], after_signal[k]), k
    last = _gen_metrics(str(halves))[-1]
    assert last["step"] == 6 and last["lr"] == pytest.approx(1e-3)  # warm-up over


def test_dit_non_finite_steps_skipped_then_fatal(tmp_path, monkeypatch):
    real_loss, calls = train_dit.rfm_loss, []

    def nan_on_second_call(*a, **k):
        calls.append(1)
        loss = real_loss(*a, **k)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(train_dit, "rfm_loss", nan_on_second_call)
    model, ema = _gen_train(tmp_path, tmp_path / "one_nan", "--max-steps", "3")
    assert _gen_metrics(str(tmp_path / "one_nan"))[-1]["nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in [*model.parameters(), *ema.parameters()])

    monkeypatch.setattr(train_dit, "rfm_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        _gen_train(tmp_path, tmp_path / "all_nan", "--max-steps", "5", "--max-nonfinite", "2")


def test_dit_wrong_checkpoints_and_inputs_fail_clearly(tmp_path):
    ae_path, dit = _gen_autoencoder(tmp_path), _gen_dit(tmp_path)
    with pytest.raises(ValueError, match="'dino-sae-ae' checkpoint, not a DiT checkpoint"):
        _gen_train(tmp_path, tmp_path / "x", "--max-steps", "1", "--resume", ae_path)
    with pytest.raises(ValueError, match="holds LightningDiT-XL/1 .* this run builds DiTDH-XL/1"):
        _gen_train(tmp_path, tmp_path / "x", "--max-steps", "1", "--model", "DiTDH-XL/1",
                   "--resume", os.path.join(dit, "ckpt_0000002.pt"))
    with pytest.raises(ValueError, match="Riemannian flow matching; pass the same --euclidean"):
        _gen_train(tmp_path, tmp_path / "x", "--max-steps", "1", "--euclidean", "--resume", "auto", "--out", dit)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _gen_train(tmp_path, tmp_path / "x", "--data", str(tmp_path / "no_such_folder"))
    with pytest.raises(FileNotFoundError, match="autoencoder checkpoint .* does not exist"):
        train_dit.main(["--preset", "tiny", "--ae", str(tmp_path / "no_ae"), "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="holds no DiT checkpoint"):
        sample.main(["--preset", "tiny", "--dit", ae_path, "--out", str(tmp_path / "s.npz")])
    with pytest.raises(ValueError, match="trained with Riemannian flow matching: use --sampler euler-proj"):
        sample.main(["--preset", "tiny", "--dit", dit, "--sampler", "euler", "--out", str(tmp_path / "s.npz")])


def test_sample_writes_class_balanced_adm_npz_and_grid(tmp_path):
    dit = _gen_dit(tmp_path)
    assert sample.to_uint8(torch.tensor([-1.0, 1.0, 0.0, -3.0, 3.0, 0.5]).view(1, 1, 1, 6)).flatten().tolist() == \
        [0, 255, 128, 0, 255, 191]  # clamp(127.5x + 128), truncated as the ADM/DiT samplers do
    out = str(tmp_path / "samples.npz")
    sample.main(["--preset", "tiny", "--dit", dit, "--num-samples", "16", "--steps", "4", "--batch-size", "16",
                 "--cfg-scale", "1.5", "--cfg-interval", "0.2", "1.0", "--out", out])
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (16, 64, 64, 3) and images.std() > 0
    assert np.bincount(labels).tolist() == [2] * 8
    assert _gen_png_size(str(tmp_path / "samples.png")) == (8 * 66 + 2, 2 * 66 + 2)
    assert not [f for f in os.listdir(tmp_path) if "shard" in f]

    # each sample's noise depends on (seed, index) only: a different batching gives the same images
    sample.main(["--preset", "tiny", "--dit", dit, "--num-samples", "16", "--steps", "4", "--batch-size", "5",
                 "--cfg-scale", "1.5", "--cfg-interval", "0.2", "1.0", "--out", str(tmp_path / "again.npz")])
    with np.load(tmp_path / "again.npz") as f:
        assert np.abs(f["arr_0"].astype(int) - images).max() <= 1


def test_sample_rodrigues_matches_euler_proj_closely(tmp_path):
    # both integrate the same ODE on the spheres: with enough steps their images agree up to small differences
    dit = _gen_dit(tmp_path)
    arrays = []
    for name in ("euler-proj", "rodrigues"):
        out = str(tmp_path / f"{name}.npz")
        sample.main(["--preset", "tiny", "--dit", dit, "--num-samples", "8", "--steps", "20", "--sampler", name,
                     "--out", out])
        with np.load(out) as f:
            arrays.append(f["arr_0"].astype(float))
    assert np.abs(arrays[0] - arrays[1]).mean() < 2.0


def test_recon_writes_paired_npz_of_center_crops(tmp_path):
    ae_path = _gen_autoencoder(tmp_path)
    data = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate([(60, 90), (140, 64), (64, 64)]):  # save_image_grid pads 2 px on each side
        tu.save_image_grid(torch.rand(1, 3, h, w, generator=g) * 2 - 1, str(data / "c0" / f"{i}.png"), 1)
    (data / "c0" / "broken.png").write_bytes(b"not a png")  # sorted last: with batches of 3 it is a batch alone
    out = str(tmp_path / "recon")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        sample.main(["--recon", "--preset", "tiny", "--ae", ae_path, "--data", str(data), "--batch-size", "3",
                     "--out", out])
    with np.load(out + "_originals.npz") as f:
        originals = f["arr_0"]
    with np.load(out + "_reconstructions.npz") as f:
        reconstructions = f["arr_0"]
    assert originals.dtype == reconstructions.dtype == np.uint8
    assert originals.shape == reconstructions.shape == (3, 64, 64, 3)

    dataset = tu.ImageFolderDataset(str(data), 64)
    ae, _ = train_ae.load_autoencoder(ae_path)
    x = torch.stack([dataset[i][0] for i in range(4) if dataset[i] is not None])
    assert np.array_equal(originals, sample.to_uint8(x).numpy())  # the ADM center crops, exactly
    with torch.no_grad():
        expected = sample.to_uint8(ae.decoder(ae.encoder.encode(x))).numpy().astype(int)
    assert np.abs(expected - reconstructions).max() <= 1


REPO = os.path.dirname(os.path.abspath(__file__))
_AE_RUNNER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import train_ae
nan_step = int(os.environ.get("NAN_STEP", "0"))
if nan_step:  # poison one rank's loss at one step: every rank must skip that step together
    original, calls = train_ae.generator_loss, [0]
    def poisoned(*args, **kwargs):
        loss, metrics, x_hat = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == nan_step and os.environ.get("RANK") == "0":
            loss = loss * float("nan")
        return loss, metrics, x_hat
    train_ae.generator_loss = poisoned
if os.environ.get("GRAD_DUMP"):  # the gradients the optimizer sees at its first step (all-reduced under DDP)
    original_step = torch.optim.AdamW.step
    def step(self, *args, **kwargs):
        if not os.path.exists(os.environ["GRAD_DUMP"] + os.environ.get("RANK", "0")):
            grads = [p.grad.clone() for group in self.param_groups for p in group["params"]]
            torch.save(grads, os.environ["GRAD_DUMP"] + os.environ.get("RANK", "0"))
        return original_step(self, *args, **kwargs)
    torch.optim.AdamW.step = step
ae, disc = train_ae.main(sys.argv[1:])
state = {{k: v for k, v in ae.state_dict().items() if not k.startswith("encoder.vit.")}}
torch.save(state, os.path.join(os.environ["DUMP"], "rank" + os.environ.get("RANK", "0") + ".pt"))
"""


def _ae_args(out, stage, *extra):
    return ["--stage", str(stage), "--preset", "tiny", "--random-lpips", "--out", str(out), "--num-images", "8",
            "--global-batch", "4", "--log-every", "1", *extra]


def _ae_metrics(out, stage):
    with open(os.path.join(out, f"stage{stage}", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _ae_latest(out, stage):
    d = os.path.join(out, f"stage{stage}")
    with open(os.path.join(d, "latest")) as f:
        return torch.load(os.path.join(d, f.read().strip()), weights_only=True)


def _ae_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("RANK", None)
    return env


def _ae_run(script_args, tmp_path, nproc=1, **env):
    runner = tmp_path / "runner.py"
    runner.write_text(_AE_RUNNER.format(repo=REPO))
    dump = tmp_path / f"dump_{nproc}_{len(os.listdir(tmp_path))}"
    dump.mkdir()
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                 if nproc > 1 else [])
    proc = subprocess.run(launch + [str(runner)] + script_args, cwd=REPO, env=_ae_env(DUMP=str(dump), **env),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(dump / f"rank{r}.pt") for r in range(nproc)], proc


def _ae_same(a, b, atol=0.0):
    return all(torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0) for k in a)


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_ae_each_stage_overfits_a_fixed_batch(tmp_path, stage):
    args = _ae_args(tmp_path, stage, "--num-images", "4", "--max-steps", "12", "--lr", "1e-3", "--from-scratch")
    train_ae.main(args)
    rec = [m["l1"] + m["lpips"] for m in _ae_metrics(tmp_path, stage)]
    assert np.mean(rec[-3:]) < 0.75 * rec[0], rec
    if stage in (1, 2):
        cos = [m["cos"] for m in _ae_metrics(tmp_path, stage)]
        assert cos[-1] < 0.8 * cos[0], cos


def test_ae_stages_chain_and_train_exactly_their_parts(tmp_path):
    vit_file = tmp_path / "weights" / "tiny_dinov3_dino.pth"
    previous = None
    for stage in (1, 2, 3, 4):
        ae, disc = train_ae.main(_ae_args(tmp_path, stage, "--max-steps", "2"))
        frozen = load_dinov3(str(vit_file)).state_dict()
        assert all(torch.equal(v, frozen[k]) for k, v in ae.encoder.vit.state_dict().items())
        ckpt = _ae_latest(tmp_path, stage)
        assert ckpt["stage"] == stage and ckpt["progress"]["step"] == 2
        if previous is not None:
            assert not _ae_same(ckpt["decoder"], previous["decoder"])
            assert _ae_same(ckpt["stem"], previous["stem"]) == (stage >= 3)
            if stage >= 3:
                assert not _ae_same(ckpt["disc"], previous["disc"])
        if disc is not None:
            disc_vit = load_dinov3(str(tmp_path / "weights" / "tiny_dinov3_disc.pth")).state_dict()
            assert all(torch.equal(v, disc_vit[k]) for k, v in disc.feature_net.state_dict().items())
        previous = ckpt


def test_ae_stage_refuses_to_start_without_previous_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage-2 checkpoint"):
        train_ae.main(_ae_args(tmp_path, 3, "--max-steps", "1"))
    train_ae.main(_ae_args(tmp_path, 1, "--max-steps", "1"))
    with pytest.raises(ValueError, match="stage-1 checkpoint; stage 3 needs stage 2"):
        train_ae.main(_ae_args(tmp_path, 3, "--max-steps", "1", "--init", str(tmp_path / "stage1")))


def test_ae_stage4_noise_per_sample_and_off_in_eval():
    assert train_ae.STAGES[4]["noise_tau"] == 0.8
    torch.manual_seed(0)
    z = torch.zeros(2000, 16, 8, 8)
    sigma = train_ae.add_latent_noise(z, 0.8).flatten(1).std(dim=1)
    assert sigma.max() < 0.8 * 1.1 and sigma.min() < 0.05 and sigma.max() > 0.75
    assert abs(sigma.mean().item() - 0.4) < 0.03
    ae, _ = train_ae.load_autoencoder(str(_ae_tiny_checkpoint()))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ae(x, noise_tau=0.8)["x_hat"], ae(x)["x_hat"])
        ae.train()
        assert not torch.equal(ae(x, noise_tau=0.8)["x_hat"], ae(x)["x_hat"])


_AE_TINY = {}


def _ae_tiny_checkpoint():
    """One tiny stage-1 checkpoint shared by the tests that only need a trained-looking autoencoder."""
    if "path" not in _AE_TINY:
        import tempfile
        out = tempfile.mkdtemp()
        train_ae.main(_ae_args(out, 1, "--max-steps", "1"))
        _AE_TINY["path"] = os.path.join(out, "stage1")
    return _AE_TINY["path"]


def test_ae_exact_resume_bit_identical(tmp_path):
    """Stage 2 (GAN, DiffAugment randomness, flips, 2 epochs): 4 steps straight == 2 + resume + 2."""
    common = ["--from-scratch", "--precision", "fp32"]
    train_ae.main(_ae_args(tmp_path / "a", 2, "--max-steps", "4", *common))
    train_ae.main(_ae_args(tmp_path / "b", 2, "--max-steps", "2", *common))
    train_ae.main(_ae_args(tmp_path / "b", 2, "--max-steps", "4", *common))
    a, b = _ae_latest(tmp_path / "a", 2), _ae_latest(tmp_path / "b", 2)
    assert b["progress"] == a["progress"]
    for part in ("stem", "decoder", "disc"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part
    assert all(torch.equal(v, b["opt"]["state"][0]["exp_avg"]) for v in [a["opt"]["state"][0]["exp_avg"]])


def test_ae_truncated_latest_checkpoint_falls_back(tmp_path):
    train_ae.main(_ae_args(tmp_path, 1, "--max-steps", "4", "--ckpt-every", "2"))
    newest = tmp_path / "stage1" / "ckpt_0000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="ckpt_0000004.pt is unreadable"):
        train_ae.main(_ae_args(tmp_path, 1, "--max-steps", "6", "--ckpt-every", "2"))
    steps = [m["step"] for m in _ae_metrics(tmp_path, 1)]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6]  # resumed from step 2
    assert _ae_latest(tmp_path, 1)["progress"]["step"] == 6


def test_ae_sigterm_checkpoints_and_resumes(tmp_path):
    args = _ae_args(tmp_path, 1, "--max-steps", "1000")
    proc = subprocess.Popen([sys.executable, "train_ae.py"] + args, cwd=REPO, env=_ae_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "stage1" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    step = _ae_latest(tmp_path, 1)["progress"]["step"]
    assert 1 <= step < 1000
    train_ae.main(_ae_args(tmp_path, 1, "--max-steps", str(step + 2)))
    assert _ae_latest(tmp_path, 1)["progress"]["step"] == step + 2


def test_ae_corrupt_image_is_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(7):
        (data / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(data / f"class{i % 2}" / f"{i}.png")
    (data / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(100))
    with pytest.warns(UserWarning, match="broken.jpg"):
        train_ae.main(_ae_args(tmp_path / "run", 1, "--data", str(data), "--max-steps", "2"))
    assert _ae_metrics(tmp_path / "run", 1)[-1]["skipped_images"] == 1


def test_ae_missing_or_empty_data_fails_before_models(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(FileNotFoundError):
            train_ae.main(_ae_args(tmp_path / "run", 1, "--data", str(folder)))
    assert not (tmp_path / "run" / "weights").exists()


def test_ae_two_gloo_ranks_equal_one_process(tmp_path):
    """DDP over 2 gloo ranks (torchrun) computes the gradient of one process on the same global batch (the decoder's
    BatchNorms use global statistics) and keeps both ranks identical. Parameters are compared through the first
    step's gradients: AdamW's first update is sign-like, so fp noise on near-zero gradients (e.g. conv biases in front
    of GroupNorm) moves single elements by up to 2·lr."""
    args = lambda out: _ae_args(out, 1, "--max-steps", "3", "--lr", "1e-3")
    (r0, r1), _ = _ae_run(args(tmp_path / "ddp"), tmp_path, nproc=2, GRAD_DUMP=str(tmp_path / "grads_ddp"))
    _ae_run(args(tmp_path / "single"), tmp_path, nproc=1, GRAD_DUMP=str(tmp_path / "grads_single"))
    assert _ae_same(r0, r1)
    g0, g1 = torch.load(tmp_path / "grads_ddp0"), torch.load(tmp_path / "grads_ddp1")
    single = torch.load(tmp_path / "grads_single0")
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    for i, (a, b) in enumerate(zip(g0, single)):
        # Forward passes agree to 2e-7 and the decoder's input gradient to 5e-7; that fp32 noise grows to ~1e-3 in
        # some tensors: the sphere projection z = R·z_S/‖z_S‖ removes the radial part of dL/dz, which dominates at
        # init, and L1 / ReLU kinks flip. A real desync (per-rank BatchNorm statistics, different data or LPIPS
        # weights per rank) gives errors of 1e-1 and more.
        assert (a - b).norm() <= 5e-3 * b.norm() + 1e-9, (i, (a - b).norm() / b.norm())
    # stage 3 resumes from stage 2 under torchrun as well
    train_ae.main(_ae_args(tmp_path / "ddp", 2, "--max-steps", "1"))
    _ae_run(_ae_args(tmp_path / "ddp", 3, "--max-steps", "1"), tmp_path, nproc=2)
    assert _ae_latest(tmp_path / "ddp", 3)["progress"]["step"] == 1


def test_ae_nan_step_skipped_identically_on_two_ranks(tmp_path):
    (r0, r1), _ = _ae_run(_ae_args(tmp_path / "run", 1, "--max-steps", "3"), tmp_path, nproc=2, NAN_STEP="2")
    assert _ae_same(r0, r1)
    metrics = _ae_metrics(tmp_path / "run", 1)
    assert [m["nonfinite_steps"] for m in metrics] == [0, 1, 1]


_BENCH_FIELDS = {"batch", "images_per_s", "seconds_per_iter", "gflop_per_image", "gflops_achieved", "fraction_of_peak",
                 "peak_memory_mb", "memory_kind", "iters", "compute_dtype"}


def _bench_one_thread(fn):
    """Tiny models on a loaded 2-core machine: one thread avoids OpenMP oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _bench_fixed_timer(monkeypatch, seconds):
    """Every timed call runs its function and reports `seconds`: speeds become hand-computable numbers."""
    monkeypatch.setattr(bench, "timed", lambda fn, device: (fn(), seconds)[1])


def _bench_dit_forward_flops(d, depth, C, N, hidden):
    """Closed form of one LightningDiT forward per sample (matmuls and attention; 2 FLOPs per multiply-add)."""
    per_token = C * d + depth * (3 * d * d + d * d + 2 * hidden * d + hidden * d) + d * C  # embed, blocks, final
    per_image = 512 * d + d * d + depth * 6 * d * d + 2 * d * d  # timestep MLP, adaLN of blocks and final layer
    attention = depth * 4 * N * N * d  # q·k and attention·v
    return 2 * N * per_token + 2 * per_image + attention


def test_bench_matmul_peak_is_2n3_inner_over_the_best_time(monkeypatch):
    _bench_fixed_timer(monkeypatch, 0.25)
    assert bench.matmul_peak_gflops(torch.device("cpu"), torch.float32, 64, repeats=2, inner=3) == \
        pytest.approx(2 * 64 ** 3 * 3 / 0.25 / 1e9)


def test_bench_run_benchmark_speed_from_a_known_time(monkeypatch):
    _bench_fixed_timer(monkeypatch, 0.5)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)

    def build(batch, device, autocast):
        def step():
            lin.zero_grad()
            with autocast():
                lin(x[:batch]).sum().backward()
        return step, [lin]

    r = bench.run_benchmark(build, 4, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False), iters=3,
                            warmup=1)
    # forward 2·B·in·out, backward the weight gradient only (x needs none): 2·B·in·out again
    assert r["gflop_per_image"] * 1e9 == pytest.approx(4 * 64 * 32)
    assert r["seconds_per_iter"] == 0.5 and r["images_per_s"] == pytest.approx(8.0)
    assert r["gflops_achieved"] == pytest.approx(4 * 4 * 64 * 32 / 0.5 / 1e9)
    assert r["iters"] == 3 and r["batch"] == 4


@pytest.mark.slow
def test_bench_tiny_report_numbers_from_a_known_time(tmp_path, capsys, monkeypatch):
    _bench_fixed_timer(monkeypatch, 0.5)
    path = tmp_path / "bench.json"
    report = _bench_one_thread(lambda: bench.main(["--preset", "tiny", "--device", "cpu", "--iters", "1", "--batch", "2",
                                                    "--json", str(path)]))
    assert json.loads(capsys.readouterr().out) == json.loads(path.read_text()) == json.loads(json.dumps(report))
    assert report["device"].startswith("cpu") and report["dtype"] == "fp32" and report["torch"] == torch.__version__
    peak = 2 * 512 ** 3 / 0.5 / 1e9  # tiny preset: 512² matmuls, one per timed call on CPU
    assert report["matmul_peak_gflops_by_dtype"] == pytest.approx({"fp32": peak, "bf16": peak})
    assert set(report["benchmarks"]) == set(bench.BENCHMARKS)
    for name, r in report["benchmarks"].items():
        assert set(r) == _BENCH_FIELDS, name
        assert r["batch"] == 2 and r["iters"] == 1 and r["memory_kind"] == "cpu_peak_rss_growth"
        assert r["seconds_per_iter"] == 0.5 and r["images_per_s"] == 4.0
        assert r["fraction_of_peak"] == pytest.approx(r["gflop_per_image"] * 4.0 / peak), name
    # one guided step = one forward of the [cond; uncond] batch: two tiny LightningDiT forwards per image
    tiny = dict(d=128, depth=2, C=128, N=16, hidden=int(2 / 3 * 4 * 128))
    assert report["benchmarks"]["sampling_step"]["gflop_per_image"] * 1e9 == 2 * _bench_dit_forward_flops(**tiny)


def test_bench_flops_of_full_decoder_and_dit_match_closed_forms():
    """Counted on the meta device: the decoder's 688 GFLOP per 256² image, and LightningDiT-XL/1's closed form."""
    with torch.device("meta"):
        dec = dcae_decoder("f16-in")
        z = torch.randn(2, 1024, 16, 16)
        assert bench.count_flops(lambda: dec(z)) / 2 / 1e9 == pytest.approx(688.0, abs=0.5)
        dit = DiT_models["LightningDiT-XL/1"]()
        t, y = torch.rand(2), torch.randint(1000, (2,))
        flops = bench.count_flops(lambda: dit(z, t, y)) / 2
    assert flops == _bench_dit_forward_flops(d=1152, depth=28, C=1024, N=256, hidden=3072)


def test_bench_flops_of_a_dit_on_the_cpu_count_attention():
    """On real CPU tensors attention runs the CPU flash kernel, which torch's counter does not know by itself."""
    model = bench.dit("tiny", "LightningDiT-XL/1")
    z, t, y = torch.randn(3, 128, 4, 4), torch.rand(3), torch.zeros(3, dtype=torch.long)
    tiny = dict(d=128, depth=2, C=128, N=16, hidden=int(2 / 3 * 4 * 128))
    assert bench.count_flops(lambda: model(z, t, y)) == 3 * _bench_dit_forward_flops(**tiny)


def test_bench_cpu_peak_memory_sees_a_freed_allocation():
    with bench.PeakMemory(torch.device("cpu")) as memory:
        x = torch.ones(32 * 2 ** 20 // 4)  # 32 MiB, every page touched
        del x
    assert memory.kind == "cpu_peak_rss_growth" and 30 <= memory.mb < 1024


# ---- memory model ----

def test_bench_live_bytes_counts_a_storage_once_until_its_last_view_dies():
    with bench.LiveBytes() as live:
        a = torch.empty(1000)        # 4000 bytes
        b = a * 2                    # 8000
        v = b[10:]                   # a view: no new storage
        del a                        # 4000
        c = torch.cat([b, b])        # 4000 + 8000 = 12000, the peak
        del b                        # v keeps b's storage alive
        assert live.live == 12000
        del v                        # 8000: c alone
    assert (live.live, live.peak) == (8000, 12000)
    del c
    assert live.live == 0


def _bench_exp_backward(live):
    w = torch.ones(1000, requires_grad=True)
    loss = (w * 3).exp().sum()
    assert (live.live, live.peak) == (8004, 12000)  # w, exp's saved output, the loss; w·3 lived until exp returned
    loss.backward()
    # backward peak: w, saved exp output, loss, the seed gradient (4 bytes) and exp's input gradient;
    # after: w, w.grad, loss
    assert (live.live, live.peak) == (8004, 12008)


def test_bench_live_bytes_hand_count_of_a_backward():
    with bench.LiveBytes() as live:
        _bench_exp_backward(live)


def test_bench_live_bytes_hand_count_holds_on_fake_tensors():
    with torch._subclasses.fake_tensor.FakeTensorMode(), bench.LiveBytes() as live:
        _bench_exp_backward(live)
        assert bench.is_fake(torch.ones(1)) and bool(torch.ones(1).sum() > 0)  # host reads answer 1 on fake tensors


def test_bench_fit_line_recovers_fixed_and_per_image():
    gib = 2 ** 30
    fixed, per_image, residual = bench.fit_line([1, 2, 4], [3 * gib + 0.5 * gib * b for b in (1, 2, 4)])
    assert fixed == pytest.approx(3 * gib) and per_image == pytest.approx(0.5 * gib) and residual < 1
    # a bend (a batch-independent transient above the line at batch 1) shows as a residual
    assert bench.fit_line([1, 2, 4], [10, 10, 14])[2] > 0.5


def test_bench_max_micro_batch_and_plan_by_hand():
    reserve = dict(context_and_workspaces_gib=1.0, fragmentation=0.1, nccl_gib=1.0)
    gib = 2 ** 30
    # usable 80·0.9 − 1 = 71 GiB; (71 − 10) / 1.5 = 40.7
    assert bench.max_micro_batch(10 * gib, 1.5 * gib, 80, reserve) == 40
    # DDP: − 1 GiB NCCL − 2 GiB buckets -> (68 − 10) / 1.5 = 38.7
    assert bench.max_micro_batch(10 * gib, 1.5 * gib, 80, reserve, ddp_bucket_bytes=2 * gib) == 38
    assert bench.max_micro_batch(80 * gib, 1.5 * gib, 80, reserve) == 0

    def entry(plain, ckpt):
        return dict(global_batch=256, without_checkpointing=dict(max_micro_batch=dict(ddp={"80": plain})),
                    with_checkpointing=dict(max_micro_batch=dict(ddp={"80": ckpt})))
    # 32 per GPU: 20 fit -> accumulate 2 × 16, no recomputation
    assert bench.plan(entry(20, 40), 8, 80) == dict(micro_batch=16, grad_accum=2, grad_checkpoint=False)
    # only 5 fit -> micro-batches of 4 would be too small: checkpointing with the whole 32
    assert bench.plan(entry(5, 40), 8, 80) == dict(micro_batch=32, grad_accum=1, grad_checkpoint=True)
    assert bench.plan(entry(0, 0), 8, 80) is None


def _bench_tiny_dit_memory(depth):
    spec = bench.dit_training_step("LightningDiT-XL/1", depth=depth)
    return bench.measure_training_memory(spec, "tiny", [1, 2, 3])


@pytest.mark.slow
def test_bench_checkpointing_keeps_only_each_blocks_input():
    """With checkpointing a DiT block keeps only its input (N tokens × width, fp32) per image until backward; without,
    all its activations. Fixed memory (weights, gradients, AdamW, EMA, autocast's weight copies) does not change."""
    shallow, deep = _bench_tiny_dit_memory(2), _bench_tiny_dit_memory(4)
    block_input = 16 * 128 * 4  # tiny preset: 4×4 latent tokens, width 128, fp32 residual stream
    per_image = {k: deep[k]["per_image_bytes"] - shallow[k]["per_image_bytes"]
                 for k in ("with_checkpointing", "without_checkpointing")}
    assert per_image["with_checkpointing"] == pytest.approx(2 * block_input)
    assert per_image["without_checkpointing"] > 4 * 2 * block_input
    for m in (shallow, deep):
        assert m["with_checkpointing"]["fixed_bytes"] == pytest.approx(m["without_checkpointing"]["fixed_bytes"])
        assert m["with_checkpointing"]["fit_max_residual_bytes"] < 1


def test_bench_fixed_memory_counted_exactly():
    """Weights, gradients, AdamW moments (+ one fp32 step per tensor, fused), EMA: by hand from a real tiny DiT."""
    real = bench.dit_models("tiny", "LightningDiT-XL/1")
    P = sum(p.numel() for p in real["model"].parameters())
    n_tensors = len(list(real["model"].parameters()))
    model_buffers = sum(b.numel() * b.element_size() for b in real["model"].buffers())
    frozen = sum(t.numel() * t.element_size() for t in [*real["ae"].parameters(), *real["ae"].buffers()])
    spec = bench.TRAINING_STEPS["lightningdit_xl"]
    models = bench.meta_models(spec, "tiny")
    with torch._subclasses.fake_tensor.FakeTensorMode():
        bench.fake_storage(models.values())
        optimizers = spec.optimizers(models)
        bench.prime_optimizers(optimizers)
        counted = bench.counted_fixed_bytes(models, optimizers)
    assert counted == dict(trainable_weights=4 * P, gradients=4 * P, adamw_states=8 * P + 4 * n_tensors,
                           ema=4 * P + model_buffers, frozen_weights_and_buffers=frozen + model_buffers)


@pytest.mark.slow
def test_bench_primed_optimizers_give_the_peak_of_a_steady_state_step():
    spec = bench.TRAINING_STEPS["ae_stage2"]
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)

    def peak(prime):
        models = bench.meta_models(spec, "tiny")
        with torch._subclasses.fake_tensor.FakeTensorMode(), bench.LiveBytes() as live, bench.CudaAutocastFp32():
            bench.fake_storage(models.values())
            optimizers = spec.optimizers(models)
            step = spec.step(models, optimizers, spec.data("tiny", 2, "cpu"), autocast)
            if prime:
                bench.prime_optimizers(optimizers)
            else:
                step()
                step()
            live.reset_peak()
            step()
            return live.peak
    assert peak(prime=True) == peak(prime=False)


@contextlib.contextmanager
def _bench_fake_cuda_autocast():
    """CUDA's bf16 autocast on fake CUDA tensors: no GPU needed (its forward kernels are meta functions)."""
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.autocast_decrement_nesting()
        torch.set_autocast_enabled("cuda", False)
        torch.clear_autocast_cache()


class _BenchOpDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops a forward runs with their first output's dtype (batch norm's saved statistics, per channel, aside);
    same-dtype copies (device moves of constants) and metadata queries are left out."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = next((t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)), None)
        same_copy = func is torch.ops.aten._to_copy.default and first is not None and first.dtype == args[0].dtype
        if func.namespace == "aten" and func is not torch.ops.aten.lift_fresh.default and not same_copy:
            self.ops.append((str(func), first.dtype if first is not None else None))
        return out


def _bench_forward_dtypes(device, autocast):
    """Op dtypes of the forwards whose activations the memory model counts: autoencoder (stem, student and teacher
    ViT, decoder), LPIPS, the discriminator's ViT features, both DiTs; tiny sizes, same code paths."""
    models = bench.meta_models(bench.TRAINING_STEPS["ae_stage2"], "tiny")
    for name in ("lightningdit_xl", "ditdh_xl"):
        models[name] = bench.meta_models(bench.TRAINING_STEPS[name], "tiny")["model"]
    with torch._subclasses.fake_tensor.FakeTensorMode():
        with torch.device(device):
            bench.fake_storage(models.values())  # fake storage on `device`
        x = torch.rand(2, 3, 128, 128, device=device) * 2 - 1  # 64² would give the decoder 16-token attention maps,
        # below the head width: CPU's matmul then copies an operand that CUDA's views
        z, t, y = torch.randn(2, 128, 4, 4, device=device), torch.rand(2, device=device), torch.zeros(2, dtype=torch.long,
                                                                                                       device=device)
        with autocast(), _BenchOpDtypes() as log:
            x_hat = models["ae"](x, with_teacher=True)["x_hat"]
            models["lpips"](x_hat.float(), x)
            models["disc"].feature_net.get_intermediate_layers(x, n=(2, 5))
            models["lightningdit_xl"](z, t, y)
            models["ditdh_xl"](z, t, y)
    return log.ops


def _bench_without_cpu_only_copies(ops):
    """Two copies CPU makes and CUDA does not, both small: CPU autocast's promote policy casts cat's bf16 inputs to
    fp32 in separate ops (copies that die when cat returns; CUDA's cat promotes in its kernel), and CPU's batched
    matmul in the decoder's linear attention copies an operand CUDA's takes a view of (1 MB per 256² image)."""
    names = [op[0] for op in ops] + [None, None]
    out = []
    for i, op in enumerate(ops):
        if op == ("aten._to_copy.default", torch.float32) and names[i + 1] == "aten.cat.default":
            continue
        if names[i:i + 3] == ["aten.clone.default", "aten._unsafe_view.default", "aten.bmm.default"]:
            out.append(("aten.view.default", op[1]))
        elif not (names[i - 1:i + 2] == ["aten.clone.default", "aten._unsafe_view.default", "aten.bmm.default"]):
            out.append(op)
    return out


@pytest.mark.slow
def test_bench_cuda_autocast_policy_matches_fake_cuda(monkeypatch):
    """CPU autocast + CudaAutocastFp32 gives every op the dtype CUDA's autocast gives it. Attention is stubbed out in
    both runs: without a GPU to query, fake CUDA falls back to the math kernel, which a GPU does not use."""
    with torch._subclasses.fake_tensor.FakeTensorMode():
        try:
            torch.empty(1, device="cuda")
        except Exception:
            pytest.skip("this torch build cannot make fake CUDA tensors")
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: q * 1)
    cpu = _bench_forward_dtypes("cpu", _bench_cpu_autocast)
    cuda = _bench_forward_dtypes("cuda", _bench_fake_cuda_autocast)
    assert len(cuda) > 500 and _bench_without_cpu_only_copies(cpu) == cuda


@contextlib.contextmanager
def _bench_cpu_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16), bench.CudaAutocastFp32():
        yield


@pytest.mark.slow
def test_bench_memory_report_of_a_tiny_step(tmp_path, capsys):
    path = tmp_path / "mem.json"
    report = _bench_one_thread(lambda: bench.main(["--memory", "--preset", "tiny", "--only-step", "lightningdit_xl",
                                                    "--mem-batches", "1", "3", "--json", str(path)]))
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    entry = report["steps"]["lightningdit_xl"]
    for mode in ("without_checkpointing", "with_checkpointing"):
        m = entry[mode]
        peaks = m["peak_gib"]
        assert m["activation_gib_per_image"] == pytest.approx((peaks["3"] - peaks["1"]) / 2)
        assert m["fixed_gib"] > entry["fixed_counted_total_gib"] > 0  # + batch-independent transients
        assert m["max_micro_batch"]["one_gpu"]["80"] >= m["max_micro_batch"]["ddp"]["80"] > 0
    out = capsys.readouterr().out
    assert "| lightningdit_xl |" in out and "torchrun --nproc_per_node=8 train_dit.py --model LightningDiT-XL/1" in out
    assert report["commands"]["8x80GB"][0].startswith("torchrun --nproc_per_node=8 train_dit.py")


# ---- GPU check ----

def test_bench_largest_fitting_tries_checkpointing_then_halves():
    tried = []

    def try_config(batch, checkpointing):
        tried.append((batch, checkpointing))
        if batch > 16 or (batch > 8 and not checkpointing):
            raise torch.OutOfMemoryError("injected")
        return dict(batch=batch)

    result, attempts = bench.largest_fitting(try_config, 32)
    assert tried == [(32, False), (32, True), (16, False), (16, True)]
    assert result == dict(batch=16, checkpointing=True)
    assert [a["outcome"] for a in attempts] == ["out of memory"] * 3 + ["ok"]
    tried.clear()
    assert bench.largest_fitting(try_config, 8, checkpointing=True)[0] == dict(batch=8, checkpointing=True)
    assert tried == [(8, True)]  # a compiled run starts from its eager run's checkpointing

    def never(batch, checkpointing):
        raise torch.OutOfMemoryError("injected")
    result, attempts = bench.largest_fitting(never, 4)
    assert result is None and [(a["batch"], a["checkpointing"]) for a in attempts] == \
        [(4, False), (4, True), (2, False), (2, True), (1, False), (1, True)]


def test_bench_check_item_halves_on_injected_out_of_memory(monkeypatch):
    measure = bench.measure_speed

    def fails_above_2(step, hot_modules, batch, *args, **kwargs):
        if batch > 2:
            raise torch.OutOfMemoryError("injected")
        return measure(step, hot_modules, batch, *args, **kwargs)
    monkeypatch.setattr(bench, "measure_speed", fails_above_2)
    r = _bench_one_thread(lambda: bench.check_item("lightningdit_xl", "tiny", torch.device("cpu"), "fp32", batch=8,
                                                   checkpointing=False, compile=False, iters=1, warmup=0))
    assert (r["batch"], r["checkpointing"]) == (2, False)
    assert [(a["batch"], a["checkpointing"], a["outcome"]) for a in r["attempts"]] == \
        [(8, False, "out of memory"), (8, True, "out of memory"), (4, False, "out of memory"),
         (4, True, "out of memory"), (2, False, "ok")]
    assert r["fraction_of_peak"] == pytest.approx(r["gflops_achieved"] / r["matmul_peak_gflops"]) and r["images_per_s"] > 0


def test_bench_gpu_check_keeps_to_its_budget():
    now = [0.0]
    calls = []

    def run_item(args, name, compile, batch, checkpointing, timeout):
        calls.append((name, compile, batch, checkpointing))
        now[0] += min(90, timeout)
        if timeout < 90:
            return {"status": f"stopped at the budget after {timeout:.0f} s"}
        return dict(batch=batch // 2, checkpointing=True, images_per_s=1.0, fraction_of_peak=0.5, peak_memory_gib=1.0)

    args = bench.parse_args(["--gpu-check", "--preset", "tiny", "--device", "cpu", "--budget-s", "300"])
    results = bench.gpu_check(args, run_item=run_item, clock=lambda: now[0])
    status = {k: r.get("status", "ran") for k, r in results.items()}
    # 90 s each: three eager runs, the fourth starts with 30 s left and is stopped, then nothing starts
    assert list(status.values()) == ["ran"] * 3 + ["stopped at the budget after 30 s"] + \
        ["not started: budget spent"] * 6
    assert [c[2] for c in calls] == [32, 32, 32, 128]  # the paper's per-GPU batches: 256/8 and 1024/8

    now[0], calls[:] = 0.0, []
    args = bench.parse_args(["--gpu-check", "--preset", "tiny", "--device", "cpu", "--budget-s", "1000"])
    results = bench.gpu_check(args, run_item=run_item, clock=lambda: now[0])
    assert all("images_per_s" in r for r in results.values()) and results["ae_stage1/eager"]["wall_s"] == 90
    # compiled runs start from what the eager runs found
    assert calls[5:] == [(name, True, bench.TRAINING_STEPS[name].global_batch // 16, True)
                         for name in bench.TRAINING_STEPS]


def test_bench_gpu_check_stops_a_process_at_the_budget():
    args = bench.parse_args(["--gpu-check", "--preset", "tiny", "--device", "cpu", "--iters", "1", "--warmup", "0"])
    t0 = time.monotonic()
    result = bench.run_item_subprocess(args, "ae_stage1", False, 2, False, timeout=1.0)  # importing torch takes longer
    assert result == {"status": "stopped at the budget after 1 s"} and time.monotonic() - t0 < 10


@pytest.mark.slow
def test_bench_gpu_check_tiny_end_to_end(tmp_path, capsys):
    """The real thing on the CPU: one process per step, JSON back, predictions from a memory JSON beside them."""
    memory = tmp_path / "mem.json"
    memory.write_text(json.dumps({"steps": {"ae_stage2": {
        "without_checkpointing": {"fixed_gib": 1.0, "activation_gib_per_image": 0.25},
        "with_checkpointing": {"fixed_gib": 1.0, "activation_gib_per_image": 0.125}}}}))
    path = tmp_path / "gpu.json"
    report = bench.main(["--gpu-check", "--preset", "tiny", "--device", "cpu", "--variants", "eager", "--batch", "2",
                         "--only-step", "ae_stage2", "--only-step", "ditdh_xl", "--memory-json", str(memory),
                         "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    assert set(report["steps"]) == {"ae_stage2/eager", "ditdh_xl/eager"}
    for r in report["steps"].values():
        assert r["batch"] == 2 and r["checkpointing"] is False and r["attempts"][-1]["outcome"] == "ok"
        assert r["images_per_s"] > 0 and r["fraction_of_peak"] > 0 and r["peak_memory_gib"] > 0
    assert report["steps"]["ae_stage2/eager"]["predicted_peak_gib"] == 1.5
    assert "predicted_peak_gib" not in report["steps"]["ditdh_xl/eager"]


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--only", "nonsense"], ["--compile", "--warmup", "0"],
                                  ["--dtype", "fp16"], ["--memory", "--gpu-check"], ["--memory", "--mem-batches", "2"],
                                  ["--only-step", "decoder_fwd_bwd"], ["--variants", "jit"]])
def test_bench_bad_flags_fail(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_ae_quantize_bf16_fakes_land_on_the_8bit_grid():
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1
    q = train_ae.quantize(levels.bfloat16())  # the decoder's output dtype under bf16 autocast
    assert q.dtype == torch.float32 and torch.allclose(q, levels, atol=1e-6, rtol=0)
