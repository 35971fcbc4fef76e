import argparse
import contextlib
import copy
import functools
import importlib
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

import bench
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
from model import (AxialRoPE, BatchRandom, ChannelDuplicatingUpsample, DCAE_CONFIGS, dcae_decoder, DCAEDecoder,
                   diff_augment, DinoDiscriminator, DinoSAE, DinoSAEEncoder, dinov3_vit, DinoVisionTransformer,
                   DiT_models, DIT_SIZES, DiTDH,
                   imagenet_normalize, LightningDiT, LiteMLA, load_dinov3, RMSNorm2d, RoPEAttention,
                   sincos_pos_embed_2d, to_image, to_tokens)
from train_ae import build_autoencoder, load_autoencoder, make_tiny_weights, TINY_CONFIG
from train_utils import (center_crop_arr, CheckpointManager, collate_skip, HorizontalFlip, ImageFolderDataset, Logger,
                         make_loader, NonFiniteGuard, PreemptionHandler, ResumableSampler,
                         SampleRNG, save_image_grid, seed_everything)


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


def _model_hf_skeleton(dim, depth, registers=4):
    """The module tree of Hugging Face's DINOv3ViTModel (transformers' modeling_dinov3_vit.py: attribute names, which
    Linear has a bias; key_bias False as in the released configs): its state_dict keys are the layout's keys as
    torch writes them for a saved model, independent of any renaming table."""
    def module(**children):
        m = nn.Module()
        for name, child in children.items():
            setattr(m, name, child)
        return m

    def param(*shape):
        return nn.Parameter(torch.zeros(*shape))

    embeddings = module(cls_token=param(1, 1, dim), mask_token=param(1, 1, dim), register_tokens=param(1, registers, dim),
                        patch_embeddings=nn.Conv2d(3, dim, 16, 16))
    layers = nn.ModuleList(module(
        norm1=nn.LayerNorm(dim), norm2=nn.LayerNorm(dim),
        attention=module(q_proj=nn.Linear(dim, dim), k_proj=nn.Linear(dim, dim, bias=False),
                         v_proj=nn.Linear(dim, dim), o_proj=nn.Linear(dim, dim)),
        layer_scale1=module(lambda1=param(dim)), layer_scale2=module(lambda1=param(dim)),
        mlp=module(up_proj=nn.Linear(dim, 4 * dim), down_proj=nn.Linear(4 * dim, dim))) for _ in range(depth))
    return module(embeddings=embeddings, layer=layers, norm=nn.LayerNorm(dim))


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
    """The DINOv3 forward written out in float64 with an explicit softmax: an independent definition of it."""
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
    hf = _model_to_hf(state)
    skeleton = _model_hf_skeleton(vit.embed_dim, len(vit.blocks)).state_dict()
    assert {k: v.shape for k, v in hf.items()} == {k: v.shape for k, v in skeleton.items()}
    _model_write_safetensors(hf, tmp_path / "model.safetensors")
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
    torch.save(state, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    garbage = {"random.pth": np.random.default_rng(0).bytes(5000), "truncated.pth": data[:len(data) // 2],
               "random.safetensors": np.random.default_rng(1).bytes(5000), "list.pth": None}
    for name, content in garbage.items():
        if content is None:
            torch.save([torch.zeros(3)], tmp_path / name)
        else:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError) as err:
            load_dinov3(tmp_path / name)
        msg = str(err.value)
        assert "is not a DINOv3 checkpoint (official .pth or Hugging Face safetensors)" in msg, name
        assert str(tmp_path / name) in msg and "weights_only" not in msg and "\n" not in msg, msg


# ---- forward semantics of the official DINOv3 ViT ----

def test_vit_matches_a_written_out_reference_non_square():
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

def test_student_with_patch_embed_equals_teacher_and_latent_is_raw_z_s():
    vit = _model_tiny_vit()
    enc = DinoSAEEncoder(vit, stem_widths=(32, 32, 64, 64))
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    out = enc(x, with_teacher=True)
    assert out["z"].shape == (2, 128, 2, 3)
    for i in range(2):  # z is z_S laid out as an image (token r·w + c at row r, column c), not normalised
        for r in range(2):
            for c in range(3):
                assert torch.equal(out["z"][:, :, r, c], out["z_s"][:, r * 3 + c])
    norms = out["z"].norm(dim=1)
    assert norms.std() > 0.01 * norms.mean()  # the final norm's affine part makes token norms differ
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

def test_dino_sae_sphere_latent_and_decode_sphere_scales_by_rho():
    """encode_sphere = R·z_S/‖z_S‖ per token (R = √C); decode_sphere feeds the decoder ρ/R·x: tokens of norm ρ."""
    enc = DinoSAEEncoder(_model_tiny_vit(), stem_widths=(32, 32, 64, 64))
    ae = DinoSAE(enc, _model_tiny_decoder(), rho=7.5).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = enc(x)["z"]
        sphere = ae.encode_sphere(x)
    assert ae.radius == math.sqrt(128)
    expect = math.sqrt(128) * z / z.norm(dim=1, keepdim=True)
    assert torch.allclose(sphere, expect, atol=1e-6, rtol=0)
    seen = []
    hook = ae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        images = ae.decode_sphere(sphere)
        plain = ae.decoder(sphere * (7.5 / math.sqrt(128)))
    hook.remove()
    assert torch.equal(seen[0], sphere * (7.5 / math.sqrt(128))) and torch.equal(images, plain)
    token_norms = seen[0].norm(dim=1)
    assert torch.allclose(token_norms, torch.full_like(token_norms, 7.5), atol=1e-5)
    with pytest.raises(ValueError, match="rho"):
        DinoSAE(enc, _model_tiny_decoder()).decode_sphere(sphere)


def test_activation_checkpointing_keeps_gradients_and_batchnorm_statistics():
    """--grad-checkpoint recomputes activations in backward: the same gradients, and the decoder's BatchNorm running
    statistics updated once per forward, not twice."""
    torch.manual_seed(0)
    ae = DinoSAE(DinoSAEEncoder(_model_tiny_vit(), stem_widths=(32, 32, 64, 64)), _model_tiny_decoder()).train()
    dit = _dit_tiny("dh", perturb=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z, t, y = torch.randn(3, 8, 4, 4), torch.rand(3), torch.tensor([0, 1, 2])
    start = copy_state(ae)

    def run(on):
        ae.load_state_dict(start)
        ae.zero_grad(set_to_none=True)
        dit.zero_grad(set_to_none=True)
        ae.encoder.vit.grad_checkpointing = ae.decoder.grad_checkpointing = dit.grad_checkpointing = on
        ae(x)["x_hat"].square().mean().backward()
        dit(z, t, y).square().mean().backward()
        grads = [p.grad.clone() for p in [*ae.parameters(), *dit.parameters()] if p.grad is not None]
        return grads, copy_state(ae)

    (plain, stats_plain), (recomputed, stats_recomputed) = run(False), run(True)
    assert len(plain) == len(recomputed) > 0
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed))
    assert all(torch.equal(stats_plain[k], stats_recomputed[k]) for k in stats_plain)
    assert stats_plain["decoder.stages.1.op_list.1.main.conv2.norm.num_batches_tracked"] == 1


def copy_state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


class _FixedRandom:
    """model.BatchRandom's interface, returning given values in order, the same for every sample."""

    def __init__(self, batch, values):
        self.batch, self.values = batch, list(values)

    def _next(self, shape):
        return torch.full((self.batch, *shape), float(self.values.pop(0)))

    def rand(self, *shape):
        return self._next(shape)

    def randint(self, low, high, *shape):
        return self._next(shape).long()


def test_diff_augment_colour_and_translation_by_hand():
    """brightness + (u1 - 0.5), saturation × 2·u2 about the channel mean, contrast × (u3 + 0.5) about the image mean,
    then out[i, j] = in[i + dy, j + dx] (zero outside), from DiffAugment's definitions written out with loops."""
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    out = diff_augment(x, _FixedRandom(2, [0.8, 0.75, 0.25, 1, -2]))
    y = x + 0.3
    y = (y - y.mean(1, keepdim=True)) * 1.5 + y.mean(1, keepdim=True)
    y = (y - y.mean((1, 2, 3), keepdim=True)) * 0.75 + y.mean((1, 2, 3), keepdim=True)
    expect = torch.zeros_like(y)
    for i in range(8):
        for j in range(8):
            if 0 <= i + 1 < 8 and 0 <= j - 2 < 8:
                expect[:, :, i, j] = y[:, :, i + 1, j - 2]
    assert torch.allclose(out, expect, atol=1e-6)
    shifts = BatchRandom(4000, "cpu").randint(-1, 2, 1, 1)  # sy = round(8 / 8) = 1: offsets -1, 0, 1
    assert set(shifts.unique().tolist()) == {-1, 0, 1}


def test_discriminator_logits_grads_and_frozen_feature_net():
    feature_net = _model_tiny_vit(depth=12)
    before = {k: v.clone() for k, v in feature_net.state_dict().items()}
    disc = DinoDiscriminator(feature_net, resolution=32)
    assert not any(k.startswith("feature_net") for k in disc.state_dict())
    assert sum(p.numel() for p in disc.parameters()) == sum(p.numel() for p in disc.heads.parameters())
    x = (torch.rand(3, 3, 48, 48) * 2 - 1).requires_grad_(True)
    logits = disc(x)
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
    """RAE's design written out: Gaussian Fourier time features, c = t_emb + y_emb (LightningDiT) or SiLU(t_emb + y_emb)
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
    assert round(counts["LightningDiT-XL/1", 768] / 1e6, 2) == 676.95  # RAE's printed count
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
def test_dit_forward_matches_a_written_out_reference(kind):
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


@pytest.mark.slow
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


def _lpips_forbid_download_and_network(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    def built(*args, **kwargs):
        raise AssertionError("the network was built before its weights file was read")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(losses.lpips, "LPIPS", built)


def test_lpips_missing_vgg_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _lpips_forbid_download_and_network(monkeypatch)
    with pytest.raises(tu.MissingFileError) as info:
        build_lpips(pretrained=True)
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and "\n" not in message
    assert os.path.join(str(tmp_path), "hub", "checkpoints") in message
    assert losses.VGG16_URL in message and losses.VGG16_URL.startswith("https://download.pytorch.org/")


def test_lpips_unreadable_vgg_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _lpips_forbid_download_and_network(monkeypatch)
    path = losses.vgg16_cache_path()
    os.makedirs(os.path.dirname(path))
    torch.save({"features.0.weight": torch.zeros(1000)}, path)
    truncated = open(path, "rb").read()[:300]
    for data, detail in [(os.urandom(4096), "unreadable"), (b"", "unreadable"), (truncated, "unreadable"), (None, "list")]:
        if data is None:
            torch.save([1, 2], path)
        else:
            with open(path, "wb") as f:
                f.write(data)
        with pytest.raises(tu.DataError) as info:
            build_lpips(pretrained=True)
        message = str(info.value)
        assert message.startswith(f"LPIPS VGG16 weights {path} (torch hub cache)") and detail in message, message
        assert "vgg16-397923af.pth" in message and losses.VGG16_URL in message, message
        assert "\n" not in message and "weights_only" not in message, message


@pytest.mark.slow
def test_lpips_pretrained_trunk_is_torchvision_vgg16_features(tmp_path, monkeypatch):
    from torchvision.models import vgg
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    features = vgg.make_layers(vgg.cfgs["D"]).eval()  # torchvision's vgg16().features
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    os.makedirs(os.path.dirname(losses.vgg16_cache_path()))
    torch.save({**state, "classifier.6.bias": torch.zeros(1000)}, losses.vgg16_cache_path())  # LPIPS ignores the head
    trunk = build_lpips(pretrained=True).net.net
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        taps = trunk(x)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        for tap, end in zip(taps, (4, 9, 16, 23, 30)):
            torch.testing.assert_close(tap, features[:end](x), rtol=0, atol=0)
    with pytest.raises(tu.DataError, match=r"lacks \['features.28.weight'\] or has them in another shape"):
        losses.load_vgg16_features(trunk, {**state, "features.28.weight": torch.zeros(3)})


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
        with pytest.warns(UserWarning), pytest.raises(tu.DataError, match="no readable checkpoint"):
            manager.load("auto")
    with pytest.raises(tu.DataError, match="unreadable"):
        manager.load(manager.loaded_path)


def test_checkpoint_saved_after_resuming_an_older_one_removes_the_abandoned_later_ones(tmp_path):
    """Resumed from step 2 of a run that reached 6: the first save (step 4) deletes the old 6, so that a fallback past
    an unreadable newest file can never jump to the abandoned history."""
    manager = CheckpointManager(str(tmp_path), keep=5)
    for step in (2, 4, 6):
        manager.save({"step": step, "history": "old"}, step)
    manager.save({"step": 4, "history": "new"}, 4)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000002.pt", "ckpt_0000004.pt", "latest"]
    (tmp_path / "ckpt_0000004.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="ckpt_0000004.pt"):
        assert manager.load("auto") == {"step": 2, "history": "old"}


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
    x, y, skipped = collate_skip([None, None])  # the trainers refuse such a batch, the evaluation scripts skip it
    assert x.shape[0] == 0 and y.shape[0] == 0 and skipped == 2


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
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
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
    while step < total_steps:
        sampler.set_epoch(epoch, start=start)
        dataset.epoch = epoch
        for x, y, _ in loader:
            noise = SampleRNG.for_step(7, step, len(x), 0, 1, "cpu").randn(*x.shape[1:])
            loss = F.cross_entropy(model(x + 0.1 * noise), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step, start = step + 1, start + 2
            if step == stop_at:
                manager.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "epoch": epoch,
                              "start": start}, step)
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

def _run_args(**overrides):
    """The flags a tu.Run reads, at the trainers' defaults."""
    args = dict(grad_accum=1, keep=3, resume="auto", seed=0, num_workers=0, log_every=1, sample_every=1000,
                ckpt_every=1000, max_nonfinite=20)
    return argparse.Namespace(**dict(args, **overrides))


def _agree(run, *checks, metrics=None, tallies=None):
    """One Run.agree call outside of Run.batches (which installs the signal handler)."""
    run.preempt = run.preempt or PreemptionHandler()
    return run.agree({f"opt{i}": torch.tensor(ok) for i, ok in enumerate(checks)}, metrics or {}, tallies)


def test_run_agree_skips_non_finite_steps_counts_them_and_fails_after_a_streak(tmp_path):
    run = tu.Run(str(tmp_path), _run_args(max_nonfinite=3), torch.device("cpu"))
    try:
        assert _agree(run, True, False) == {"opt0": True, "opt1": False}
        assert _agree(run, False, False) == {"opt0": False, "opt1": False}
        assert _agree(run, True, True) == {"opt0": True, "opt1": True}  # a good step resets each streak
        assert run.progress["nonfinite_steps"] == 2
        _agree(run, True, False)
        _agree(run, True, False)
        with pytest.raises(RuntimeError, match="3 consecutive steps"):
            _agree(run, True, False)  # one optimizer diverging stops the run even while the other is fine
    finally:
        run.preempt.restore()
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert tu.grad_norm([p, nn.Parameter(torch.ones(2))]).item() == 5.0  # no gradient: ignored
    assert tu.finite(torch.tensor(0.5), tu.grad_norm([p])) and not tu.finite(torch.tensor(math.inf), torch.ones(1))
    p.grad[1] = math.nan
    assert not tu.finite(torch.tensor(0.5), tu.grad_norm([p]))
    guard = NonFiniteGuard(max_in_a_row=2)
    assert guard.step_ok(True) and not guard.step_ok(False) and guard.in_a_row == 1


def test_run_metrics_are_means_over_the_log_interval_and_tallies_run_totals(tmp_path, capsys):
    run = tu.Run(str(tmp_path / "out"), _run_args(log_every=2), torch.device("cpu"))
    run.plan(8, 2, epochs=1)
    run.progress["step"] = 2
    try:
        _agree(run, True, metrics={"loss": torch.tensor(1.0), "lr": 0.5}, tallies={"rho": (torch.tensor(6.0), 2)})
        _agree(run, True, metrics={"loss": torch.tensor(3.0), "lr": 0.5}, tallies={"rho": (torch.tensor(3.0), 4)})
        _agree(run, True, metrics={"loss": torch.tensor(math.nan), "lr": 0.5})  # a skipped step's NaN is not averaged
    finally:
        run.preempt.restore()
    assert run.tally("rho") == 9.0 / 6 and run.progress["tallies"]["rho"] == [9.0, 6.0]
    run.log()
    record = json.loads((tmp_path / "out" / "metrics.jsonl").read_text())
    assert (record["step"], record["loss"], record["lr"], record["rho"]) == (2, 2.0, 0.5, 1.5)
    assert "step 2 | loss 2 | lr 0.5 | rho 1.5" in capsys.readouterr().out
    assert run.interval == {}  # the next line averages the next interval


def test_run_plan_splits_the_global_batch_and_refuses_what_cannot_work(tmp_path):
    run = tu.Run(str(tmp_path), _run_args(grad_accum=4), torch.device("cpu"))
    run.plan(100, 16, epochs=3)
    assert (run.batch, run.steps_per_epoch, run.total_steps) == (16, 6, 18)  # 100 // 16 = 6 full batches
    run.plan(100, 16, epochs=3, max_steps=5)
    assert run.total_steps == 5
    with pytest.raises(tu.UsageError, match="--global-batch 18 must be a multiple of ranks × --grad-accum = 1 × 4"):
        run.plan(100, 18, epochs=1)
    with pytest.raises(tu.DataError, match="fewer than one global batch"):
        run.plan(10, 16, epochs=1)
    assert not os.listdir(tmp_path)  # nothing written before the first step


def test_preemption_signal_stops_the_run_after_its_step(tmp_path):
    previous = {s: signal.getsignal(s) for s in PreemptionHandler.SIGNALS}
    run = tu.Run(str(tmp_path), _run_args(), torch.device("cpu"))
    run.preempt = PreemptionHandler()
    try:
        _agree(run, True)
        assert run.stopped is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert _agree(run, True) == {"opt0": True}  # the step in flight still takes its optimizer step
        assert run.stopped == signal.SIGUSR1
        handler = PreemptionHandler()
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: finish the step ...
        assert handler.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # ... and a second Ctrl-C interrupts at once
        handler.restore()
    finally:
        run.preempt.restore()
    assert {s: signal.getsignal(s) for s in PreemptionHandler.SIGNALS} == previous


def test_logger_lazy_folder_truncation_and_image_grid(tmp_path, capsys):
    logger = Logger(str(tmp_path / "out"), enabled=True)
    assert not (tmp_path / "out").exists()  # a run that fails before its first record leaves no folder
    for step in (100, 200, 300):
        logger.log(step, {"loss": torch.tensor(0.123456), "lr": 1e-4, "img/s": 123.44})
    lines = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [e["step"] for e in lines] == [100, 200, 300] and abs(lines[0]["loss"] - 0.123456) < 1e-6
    assert "step 100 | loss 0.1235 | lr 0.0001 | img/s 123.4" in capsys.readouterr().out
    logger.truncate(200)  # resumed from the step-200 checkpoint: the record of step 300 is dropped
    logger.log(300, {"loss": 0.5})
    assert [json.loads(line)["step"] for line in open(tmp_path / "out" / "metrics.jsonl")] == [100, 200, 300]
    Logger(str(tmp_path / "off"), enabled=False).log(1, {"loss": 1.0})
    assert not (tmp_path / "off").exists()

    images = torch.ones(4, 3, 8, 8) * 5  # out of range: clamped to white
    images[0] = -1
    path = tmp_path / "deep" / "dir" / "grid.png"
    save_image_grid(images, str(path), nrow=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2, 3)
    assert grid[2:10, 2:10].max() == 0 and grid[2:10, 12:20].min() == 255


def test_sample_rng_draws_follow_the_sample_not_the_rank_or_micro_batch():
    """Sample k of step s draws from its own generator: rank r of W holds samples r, r + W, ...; micro-batches split
    the generators like torch.chunk splits the batch."""
    single = SampleRNG.for_step(3, 7, 6, 0, 1, "cpu")
    ranks = [SampleRNG.for_step(3, 7, 3, r, 2, "cpu") for r in range(2)]
    draws = single.rand(2)  # [6, 2]: samples k = 0..5 of the global batch
    by_rank = [r.rand(2) for r in ranks]  # rank r's j-th sample is k = 2j + r
    assert all(torch.equal(by_rank[k % 2][k // 2], draws[k]) for k in range(6))
    again = SampleRNG.for_step(3, 7, 6, 0, 1, "cpu")
    first, second = again.chunk(4)[:2]
    assert len(again.chunk(4)) == 3 and [len(c.generators) for c in again.chunk(4)] == [2, 2, 2]
    assert torch.equal(torch.cat([first.rand(2), second.rand(2)]), draws[:4])
    assert not torch.equal(SampleRNG.for_step(3, 8, 6, 0, 1, "cpu").rand(2), draws)  # another step, other numbers
    x = SampleRNG.for_step(0, 1, 5, 0, 1, "cpu")
    assert x.randint(-1, 2, 1, 1).shape == (5, 1, 1) and x.randn(3, 4).shape == (5, 3, 4)


def test_cli_prints_user_errors_as_one_line_and_keeps_tracebacks_for_bugs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["script.py"])
    for error, code in ((tu.UsageError("--epochs must be at least 1, got 0"), 2),
                        (tu.DataError("checkpoint x.pt is unreadable"), 1),
                        (tu.MissingFileError("--data /nope does not exist"), 1)):
        def main():
            raise error
        with pytest.raises(SystemExit) as exit_info:
            tu.cli(main)
        assert exit_info.value.code == code
        assert capsys.readouterr().err == f"script.py: error: {error}\n"
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 speaks
    with pytest.raises(SystemExit):
        tu.cli(lambda: train_ae.main(["--stage", "5"]))
    assert capsys.readouterr().err == ""
    with pytest.raises(ZeroDivisionError):
        tu.cli(lambda: 1 / 0)


def _infra_dist_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.cuda.is_available = lambda: False  # exercise the gloo path even on a GPU machine
    r, world_size, device = tu.setup_distributed()
    try:
        assert (r, world_size, device.type) == (rank, 2, "cpu") and tu.is_main() == (rank == 0)
        run = tu.Run(out, _run_args(), device)
        run.preempt = PreemptionHandler()
        try:
            loss = torch.tensor(2.0 + rank)
            ok = run.agree({"G": torch.tensor(True)}, {"loss": loss}, {"n": (torch.tensor(1.0 + rank), 1)})
            assert ok == {"G": True} and run.interval["loss"] == [2.5, 1] and run.progress["tallies"]["n"] == [3.0, 2]
            assert run.agree({"G": torch.tensor(rank == 0)}, {}) == {"G": False}  # one rank's NaN stops both
            if rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            run.agree({"G": torch.tensor(True)}, {})
            assert run.stopped is not None  # agreed: rank 1 got no signal
        finally:
            run.preempt.restore()
        tu.barrier()
    finally:
        tu.cleanup_distributed()


def test_two_process_gloo_agreement(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork rather than spawn: the children skip re-importing torch and the test module (seconds each on 2 cores)
    torch.multiprocessing.start_processes(_infra_dist_worker, args=(port, str(tmp_path)), nprocs=2,
                                          start_method="fork")


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
    assert torch.allclose(u_t, fd, atol=1e-8)  # rounding eps * R / h ~ 1e-9 dominates
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
    assert torch.allclose(x_t, x0, atol=1e-5) and u_t.abs().max() < 1e-5
    # Nearly identical: straight line x0 + t (x1 - x0) to first order, velocity ~ x1 - x0.
    x1 = rfm.project_sphere(x0 + 1e-3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5)), R)
    x_t, u_t = rfm.geodesic_path(x0, x1, t, R)
    tt = t.view(-1, 1, 1, 1)
    assert torch.allclose(x_t, x0 + tt * (x1 - x0), atol=1e-5)
    assert torch.allclose(u_t, x1 - x0, atol=2e-5)
    # Antipodal (exactly and nearly): finite, on the sphere, angle pi, endpoints kept.
    noise = 1e-6 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    for x1 in (-x0, rfm.project_sphere(-x0 + noise, R)):
        x_t, u_t = rfm.geodesic_path(x0, x1, t, R)
        assert torch.isfinite(x_t).all() and torch.isfinite(u_t).all()
        assert torch.allclose(_rfm_norms(x_t), torch.full_like(_rfm_norms(x_t), R), rtol=1e-5)
        assert torch.allclose(_rfm_norms(u_t), torch.full_like(_rfm_norms(u_t), R * math.pi), rtol=1e-5)
        assert (x_t * u_t).sum(1).abs().max() / (R * R * math.pi) < 1e-5
        # angle from x0 grows as t * pi
        cos = (x_t * x0).sum(1) / R ** 2
        assert torch.allclose(cos, torch.cos(math.pi * tt.view(-1, 1, 1)).expand_as(cos), atol=1e-5)
        end, _ = rfm.geodesic_path(x0, x1, torch.ones(2), R)
        assert torch.allclose(end, x1, atol=1e-4)


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


def _rfm_linear_field(C, R, seed):
    """A smooth tangent field that is no geodesic flow: P_x (A x + (1 + t) b), with its numpy twin for scipy."""
    g = torch.Generator().manual_seed(seed)
    A = 1.5 * torch.randn(C, C, generator=g, dtype=torch.float64) / C ** 0.5
    b = torch.randn(C, generator=g, dtype=torch.float64)

    def velocity_fn(x, t):
        f = torch.einsum("dc,bct->bdt", A, x) + (1 + t).view(-1, 1, 1) * b.view(1, -1, 1)
        return f - (f * x).sum(1, keepdim=True) / R ** 2 * x

    def ode_rhs(t, y):  # y: the tokens as rows, flattened
        x = y.reshape(-1, C)
        f = x @ A.numpy().T + (1 + t) * b.numpy()
        return (f - (f * x).sum(1, keepdims=True) / R ** 2 * x).ravel()

    return velocity_fn, ode_rhs


def test_rfm_rodrigues_and_euler_proj_agree_to_second_order_on_a_general_field():
    from scipy.integrate import solve_ivp
    R, C = 2.0, 6
    velocity_fn, ode_rhs = _rfm_linear_field(C, R, 17)
    x_noise = _rfm_sphere((2, C, 3), R, 18)
    sol = solve_ivp(ode_rhs, (1.0, 0.0), x_noise.transpose(1, 2).reshape(-1).numpy(), method="DOP853",
                    rtol=1e-12, atol=1e-12)
    exact = torch.from_numpy(sol.y[:, -1]).view(2, 3, C).transpose(1, 2)
    assert ((exact * x_noise).sum(1) / R ** 2).max() < 0.8  # every token travels more than 0.6 rad
    for alpha in (1.0, 3.0):
        errors, gaps = [], []
        for steps in (16, 32, 64, 128):
            x_euler = rfm.sample_euler_proj(velocity_fn, x_noise, R, alpha, steps)
            x_rod = rfm.sample_rodrigues(velocity_fn, x_noise, R, alpha, steps)
            errors.append([(x - exact).norm(dim=1).max().item() for x in (x_euler, x_rod)])
            gaps.append((x_euler - x_rod).norm(dim=1).max().item())
        # both are first order in general: halving dt halves their error
        for coarse, fine in zip(errors[:-1], errors[1:]):
            assert all(abs(c / f / 2 - 1) < 0.1 for c, f in zip(coarse, fine)), errors
        # per step they move along the same great circle by |dt| |v| / R vs atan of it: the samplers differ by
        # O(dt^3) per step, O(dt^2) in all, measurably at 16 steps
        assert gaps[0] > 2e-3 * R and gaps[-1] < 0.05 * min(errors[-1]), gaps
        for coarse, fine in zip(gaps[:-1], gaps[1:]):
            assert abs(coarse / fine / 4 - 1) < 0.15, gaps


def test_rfm_time_shift_and_grid():
    assert rfm.shift_alpha(16 * 16, 1024) == 8.0
    for alpha in (0.5, 1.0, 8.0):
        assert rfm.time_shift(0.0, alpha) == 0.0 and rfm.time_shift(1.0, alpha) == 1.0
    t = torch.linspace(0, 1, 101)
    s = rfm.time_shift(t, 8.0)
    assert (s[1:] > s[:-1]).all() and (s[1:-1] > t[1:-1]).all()  # monotone, towards noise
    # 8t / (1 + 7t) at t = 1, 3/4, 1/2, 1/4, 0: 8/8, 6/6.25, 4/4.5, 2/2.75, 0
    grid = rfm.time_grid(4, 8.0)
    assert grid.dtype == torch.float64
    assert torch.allclose(grid, torch.tensor([1, 24 / 25, 8 / 9, 8 / 11, 0], dtype=torch.float64), rtol=0, atol=1e-15)
    grid = rfm.time_grid(10, 8.0)
    assert grid[0] == 1 and grid[-1] == 0 and len(grid) == 11 and (grid[1:] < grid[:-1]).all()
    assert torch.allclose(rfm.time_grid(3, 1.0), torch.tensor([1, 2 / 3, 1 / 3, 0], dtype=torch.float64), atol=1e-15)
    g = torch.Generator().manual_seed(0)
    ts = rfm.sample_time(20000, 8.0, generator=g)
    assert ts.shape == (20000,) and (ts > 0).all() and (ts < 1).all()
    # Quantiles of logit-normal(0, 1) are sigmoid of the normal's: z = 0 -> 1/2, z = -+0.6745 -> 0.3375, 0.6625; the
    # shift maps them to 8/9, 2.700/3.3625 = 0.8030, 5.300/5.6375 = 0.9401. Tolerances are ~3.4 standard errors.
    assert abs(ts.median().item() - 8 / 9) < 0.003
    q1, q3 = ts.quantile(torch.tensor([0.25, 0.75])).tolist()
    assert abs(q1 - 0.8030) < 0.005 and abs(q3 - 0.9401) < 0.002
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
    assert torch.allclose(v, rfm.project_tangent(x, v_u + 3.0 * (v_c - v_u), R), rtol=0, atol=1e-12)
    assert (v * x).sum(1).abs().max() < 1e-10
    # w = 1 is the conditional velocity; outside the interval the conditional velocity is used
    v1 = rfm.guided_velocity(model, y, 1.0, R, null_class=null)(x, t)
    assert torch.allclose(v1, rfm.project_tangent(x, v_c, R), rtol=0, atol=1e-12)
    t_out = torch.full((3,), 0.9, dtype=torch.float64)
    v_out = rfm.guided_velocity(model, y, 3.0, R, interval=(0.2, 0.6), null_class=null)(x, t_out)
    assert torch.allclose(v_out, rfm.project_tangent(x, model(x, t_out, y), R), rtol=0, atol=1e-12)
    # per-sample times straddling the interval
    t_mix = torch.tensor([0.5, 0.9, 0.3], dtype=torch.float64)
    v_mix = rfm.guided_velocity(model, y, 3.0, R, interval=(0.2, 0.6), null_class=null)(x, t_mix)
    c, u = model(x, t_mix, y), model(x, t_mix, torch.full_like(y, null))
    inside = torch.tensor([True, False, True]).view(-1, 1, 1, 1)
    assert torch.allclose(v_mix, rfm.project_tangent(x, torch.where(inside, u + 3.0 * (c - u), c), R), rtol=0,
                          atol=1e-12)


def _rfm_recording(model):
    """model, plus the list of (x_t, t) it was called with."""
    calls = []

    def recording(x_t, t, y):
        calls.append((x_t, t))
        return model(x_t, t, y)

    return recording, calls


def _rfm_loss_by_hand(model, x_data, R, alpha, seed, tangent):
    """Eq. 14 on Eq. 12-13 and 15 written out literally (x0 = data, x1 = noise), replaying rfm_loss's draws from a
    generator seeded alike: logit-normal times in float32, shifted, then Gaussian noise scaled onto the sphere."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(x_data.shape[0], generator=g).sigmoid()
    t = (alpha * s / (1 + (alpha - 1) * s)).double()
    eps = torch.randn(x_data.shape, generator=g, dtype=torch.float64)
    x0, x1 = x_data, R * eps / eps.norm(dim=1, keepdim=True)
    omega = torch.acos((x0 * x1).sum(1, keepdim=True) / R ** 2)
    tt = t.view(-1, 1, 1, 1)
    x_t = (torch.sin((1 - tt) * omega) * x0 + torch.sin(tt * omega) * x1) / torch.sin(omega)
    u_t = omega / torch.sin(omega) * (torch.cos(tt * omega) * x1 - torch.cos((1 - tt) * omega) * x0)
    v = model(x_t, t, None)
    if tangent:
        v = v - (v * x_t).sum(1, keepdim=True) / R ** 2 * x_t
    return ((v - u_t) ** 2).mean(), x_t, t, v


def test_rfm_loss_is_eq14_on_raw_output_and_tangent_ablation_projects():
    R, C, alpha = 4.0, 16, 3.0
    x_data = _rfm_sphere((5, C, 2, 3), R, 14)
    g = torch.Generator().manual_seed(19)
    W = torch.randn(C, C, generator=g, dtype=torch.float64) + 2 * torch.eye(C, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    # this affine map of x_t has a large radial part <v, x_t>, so projecting changes the loss
    model = lambda x_t, t, y: torch.einsum("dc,bchw->bdhw", W, x_t) + t.view(-1, 1, 1, 1) * b.view(1, -1, 1, 1)
    losses = {}
    for tangent in (False, True):
        recording, calls = _rfm_recording(model)
        loss = rfm.rfm_loss(recording, x_data, None, R, alpha, tangent=tangent,
                            generator=torch.Generator().manual_seed(7))
        by_hand, x_t, t, v = _rfm_loss_by_hand(model, x_data, R, alpha, 7, tangent)
        assert len(calls) == 1
        assert torch.allclose(calls[0][0], x_t, rtol=0, atol=1e-12) and torch.equal(calls[0][1], t)
        assert loss.ndim == 0 and loss.dtype == torch.float64
        assert abs(loss.item() - by_hand.item()) < 1e-12 * by_hand.item()
        losses[tangent] = loss.item()
    # u_t is tangent, so the raw loss exceeds the projected one by the mean squared radial part, <v, x_t>^2 / R^2 / C
    _, x_t, _, v = _rfm_loss_by_hand(model, x_data, R, alpha, 7, tangent=False)
    radial = ((v * x_t).sum(1) ** 2 / R ** 2).mean() / C
    assert radial > 0.1 * losses[False]
    assert abs(losses[False] - losses[True] - radial.item()) < 1e-12 * losses[False]


def test_rfm_loss_zero_for_exact_target_and_counts_radial_part_unless_tangent():
    R, C = 4.0, 16
    x_data = _rfm_sphere((8, C, 2, 2), R, 14)
    seeded = lambda: torch.Generator().manual_seed(0)

    def exact(x_t, t, y):
        _, u = rfm.geodesic_path(x_data, x_t, torch.ones_like(t), R)
        return u / t.view(-1, 1, 1, 1)

    radial = lambda x_t, t, y: exact(x_t, t, y) + 0.5 * x_t
    for tangent in (False, True):
        assert rfm.rfm_loss(exact, x_data, None, R, alpha=8.0, tangent=tangent, generator=seeded()).item() < 1e-24
    # 0.5 x_t adds 0.25 ||x_t||^2 / C = 0.25 R^2 / C per element, which the projection removes
    loss = rfm.rfm_loss(radial, x_data, None, R, alpha=8.0, generator=seeded()).item()
    assert abs(loss - 0.25 * R ** 2 / C) < 1e-12
    assert rfm.rfm_loss(radial, x_data, None, R, alpha=8.0, tangent=True, generator=seeded()).item() < 1e-24
    # Euclidean baseline: x_t = (1-t) x_data + t eps, target eps - x_data = (x_t - x_data) / t, raw output
    lin = lambda x_t, t, y: (x_t - x_data) / t.view(-1, 1, 1, 1)
    loss = rfm.rfm_loss(lin, x_data, None, R, alpha=1.0, euclidean=True, generator=seeded())
    assert loss.item() < 1e-24
    recording, calls = _rfm_recording(lambda x_t, t, y: lin(x_t, t, y) + 0.5 * x_t)
    loss = rfm.rfm_loss(recording, x_data, None, R, alpha=1.0, euclidean=True, generator=seeded())
    assert abs(loss.item() - 0.25 * (calls[0][0] ** 2).mean().item()) < 1e-12
    with pytest.raises(ValueError):
        rfm.rfm_loss(lin, x_data, None, R, alpha=1.0, euclidean=True, tangent=True)


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


@pytest.mark.slow
def test_rfm_toy_study_rfm_beats_euclidean_fm():
    # One token on S^15, 500 steps of batch 512 (~11 s on one core). Over seeds 0-4 RFM's MMD^2 is 0.30-0.49x FM's;
    # training RFM on the straight path between the same endpoints (Euclidean targets) gives 0.97-1.32x.
    curves, off_sphere = rfm.toy_study(seeds=(0,), steps=500, eval_every=500, batch=512, num_eval=2000,
                                       sample_steps=32, tokens=1)
    assert sorted(curves["rfm"]) == sorted(curves["fm"]) == [500]
    mmd_rfm, mmd_fm = curves["rfm"][500][0], curves["fm"][500][0]
    assert mmd_rfm < 0.7 * mmd_fm, (mmd_rfm, mmd_fm)
    # the samplers keep RFM on the sphere to float32 precision; Euclidean FM lands several percent off it
    assert off_sphere["rfm"][0] < 1e-6 and off_sphere["fm"][0] > 0.03, off_sphere


@pytest.fixture(scope="session")
def fid_random_inception():
    return fid.random_inception(seed=0)


class _FidTinyNet(nn.Module):
    """Stand-in for the Inception with its interface (pool, spatial, logits of a [B,3,299,299] batch) and a dozen
    features, so that tests of the evaluation plumbing run in milliseconds."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mix, self.fc = nn.Linear(12, 12, bias=False), nn.Linear(12, 10, bias=False)
        with torch.no_grad():
            for layer in (self.mix, self.fc):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))

    def forward(self, x):
        pool = self.mix(F.adaptive_avg_pool2d(x, 2).flatten(1))
        return pool, pool[:, :5], self.fc(pool)


class _FidTinyLpips(nn.Module):
    """Stand-in for LPIPS: mean absolute difference of the [-1, 1] images, known by hand for a constant shift."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # tells paired_metrics the device

    def forward(self, a, b):
        return (a - b).abs().mean((1, 2, 3))


def _fid_images(n=10, size=64, seed=0):
    """Smooth random colour fields plus noise: image-like uint8 [n,size,size,3] with varied statistics."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    noisy = smooth + 20 * torch.randn(n, 3, size, size, generator=g)
    return noisy.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _fid_notes(capsys):
    """The one-line messages fid.py printed on stderr since the last call."""
    return [line[len("fid.py: "):] for line in capsys.readouterr().err.splitlines() if line.startswith("fid.py: ")]


def _fid_forbid_networks(monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError("a network was built before the inputs were checked")

    monkeypatch.setattr(fid.FIDInception, "__init__", built)
    monkeypatch.setattr(losses.LPIPS, "__init__", built)


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


def _fid_inception_score_loops(logits, splits):
    """exp of the mean KL(p(y|x) ‖ p(y)) per split, averaged over splits, with explicit loops; the first N % splits
    splits hold one image more (numpy's array_split)."""
    scores, start = [], 0
    for s in range(splits):
        size = len(logits) // splits + (1 if s < len(logits) % splits else 0)
        probs = []
        for row in logits[start:start + size]:
            e = [math.exp(v - max(row)) for v in row]
            probs.append([v / sum(e) for v in e])
        start += size
        marginal = [sum(p[c] for p in probs) / size for c in range(len(probs[0]))]
        kl = [sum(p[c] * math.log(p[c] / marginal[c]) for c in range(len(p)) if p[c] > 0) for p in probs]
        scores.append(math.exp(sum(kl) / size))
    return sum(scores) / splits


def _fid_ssim_loops(a, b):
    """SSIM (Wang et al. 2004) window by window: 11x11 Gaussian weights of σ 1.5, statistics as weighted moments
    about the window means, valid positions only, mean over positions and channels, per image."""
    g = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    per_image = []
    for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
        values = []
        for c in range(3):
            for i in range(x.shape[0] - 10):
                for j in range(x.shape[1] - 10):
                    px, py = x[i:i + 11, j:j + 11, c], y[i:i + 11, j:j + 11, c]
                    mx, my = (w * px).sum(), (w * py).sum()
                    dx, dy = px - mx, py - my
                    vx, vy, cov = (w * dx * dx).sum(), (w * dy * dy).sum(), (w * dx * dy).sum()
                    values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        per_image.append(np.mean(values))
    return np.array(per_image)


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


@pytest.mark.slow
def test_fid_load_inception_with_and_without_num_batches_tracked(tmp_path, fid_random_inception):
    state = fid_random_inception.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in state)
    stripped = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for name, sd in (("with.pth", state), ("without.pth", stripped)):
        torch.save(sd, tmp_path / name)
        net = fid.load_inception(tmp_path / name)
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        for k, v in stripped.items():
            assert torch.equal(net.state_dict()[k], v), k


def test_fid_unreadable_or_wrong_inception_file_is_one_line(tmp_path):
    torch.save({"x": torch.zeros(1000)}, tmp_path / "small.pth")
    files = {"random.pth": os.urandom(4096), "empty.pth": b"", "text.pth": b"hello world\n",
             "truncated.pth": (tmp_path / "small.pth").read_bytes()[:300]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save([1, 2], tmp_path / "list.pth")
    torch.save({"AuxLogits.fc.weight": torch.zeros(1)}, tmp_path / "aux.pth")
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, tmp_path / "imagenet1000.pth")  # torchvision's 1000 classes
    for name, detail in [("random.pth", "unreadable"), ("empty.pth", "unreadable"), ("text.pth", "unreadable"),
                         ("truncated.pth", "unreadable"), ("list.pth", "holds a list"),
                         ("aux.pth", "unexpected ['AuxLogits.fc.weight']"),
                         ("imagenet1000.pth", "of another shape ['fc.weight']")]:
        with pytest.raises(tu.DataError) as info:
            fid.load_inception(tmp_path / name)
        message = str(info.value)
        assert message.startswith(f"--inception {tmp_path / name}") and detail in message, message
        assert fid.FID_WEIGHTS_NAME in message and "\n" not in message and "weights_only" not in message, message


def test_fid_missing_inception_names_file_and_url(tmp_path):
    path = tmp_path / "nowhere" / fid.FID_WEIGHTS_NAME
    with pytest.raises(tu.MissingFileError) as err:
        fid.load_inception(path)
    msg = str(err.value)
    assert str(path) in msg and "--inception" in msg and "\n" not in msg
    assert "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + fid.FID_WEIGHTS_NAME in msg


def test_fid_default_inception_path_uses_env(monkeypatch):
    monkeypatch.setenv("DINO_SAE_WEIGHTS", "/some/dir")
    assert fid.default_inception_path() == os.path.join("/some/dir", fid.FID_WEIGHTS_NAME)
    monkeypatch.delenv("DINO_SAE_WEIGHTS")
    assert fid.default_inception_path() == os.path.join("weights", fid.FID_WEIGHTS_NAME)


def test_fid_features_shapes_stable_and_batch_size_invariant(fid_random_inception):
    net, images = fid_random_inception, _fid_images(4)
    feats = fid.inception_features(net, images, batch_size=3, progress=False)
    assert feats["pool"].shape == (4, 2048) and feats["logits"].shape == (4, 1008)
    assert feats["spatial"].shape == (4, 2023)
    for v in feats.values():
        assert v.dtype == np.float32 and np.isfinite(v).all()
    # Stable regime: activations neither vanish nor explode, and differ between images.
    assert 0.05 < feats["pool"].mean() < 5 and feats["pool"].std(0).mean() > 1e-3
    assert (feats["pool"] >= 0).all() and (feats["spatial"] >= 0).all()  # post-ReLU features
    np.testing.assert_allclose(feats["logits"], feats["pool"] @ net.fc.weight.numpy().T, rtol=1e-4, atol=1e-4)
    again = fid.inception_features(net, torch.from_numpy(images[2:4]), batch_size=2, progress=False)
    for k in feats:  # images 2 and 3 went through in different batches the first time
        np.testing.assert_allclose(again[k], feats[k][2:4], rtol=1e-4, atol=1e-5)


def test_fid_features_reject_bad_input():
    net = _FidTinyNet()
    with pytest.raises(ValueError, match="uint8"):
        fid.inception_features(net, np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        fid.inception_features(net, np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="N > 0"):
        fid.inception_features(net, np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="preprocess"):
        fid.inception_features(net, np.zeros((2, 32, 32, 3), np.uint8), preprocess="tf2")
    with pytest.raises(ValueError, match="batch_size"):
        fid.inception_features(net, np.zeros((2, 32, 32, 3), np.uint8), batch_size=0)


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
    assert pt.shape == (2, 3, 299, 299) and pt.min() >= -1 - 1e-6 and pt.max() <= 1 + 1e-6  # float rounding of 2x - 1
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


def test_fid_inception_score_closed_forms():
    # Half the images predict (a, 1 - a) over two classes, half (1 - a, a): p(y) = (1/2, 1/2) and every image has
    # KL = log 2 + a log a + (1 - a) log(1 - a), so IS = 2 a^a (1 - a)^(1 - a).
    a = 0.9
    logits = np.full((20, 1008), -1e4)
    logits[:, :2] = np.log([[a, 1 - a], [1 - a, a]] * 10)
    assert fid.inception_score(logits, splits=10) == pytest.approx(2 * a ** a * (1 - a) ** (1 - a), rel=1e-9)
    # Splits alternate between two confident classes (IS 2) and one repeated prediction (IS 1): the mean is 1.5.
    logits = np.full((20, 1008), -1e4)
    logits[np.arange(20), [0, 1, 2, 2] * 5] = 0
    assert fid.inception_score(logits, splits=10) == pytest.approx(1.5, rel=1e-9)


def test_fid_inception_score_matches_explicit_loops_with_uneven_splits():
    logits = 3 * np.random.default_rng(0).standard_normal((23, 40))  # splits of 3, 3, 3, 2, ... images
    assert fid.inception_score(logits, splits=10) == pytest.approx(_fid_inception_score_loops(logits, 10), rel=1e-9)


def test_fid_precision_recall_limits():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((60, 32)).astype(np.float32)
    assert fid.precision_recall(a, a, k=3) == (1.0, 1.0)
    assert fid.precision_recall(a, a + 100, k=3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="k=3"):
        fid.precision_recall(a[:3], a, k=3)


def test_fid_precision_recall_on_a_line_by_hand():
    # Reference 0, 1, ..., 9: 3rd-neighbour radii are 3 at both ends and 2 inside, so its manifold is [-3, 12].
    # Samples 0.5 .. 3.5 (radii 3, 2, 2, 3: manifold [-2.5, 6.5]) and 30 .. 33: precision 4/8, and the reference
    # points 0 .. 6 lie in the samples' manifold: recall 7/10. No distance is within 0.5 of a radius.
    line = np.concatenate([np.arange(10.0), [0.5, 1.5, 2.5, 3.5, 30, 31, 32, 33]])
    rotation = np.linalg.qr(np.random.default_rng(0).standard_normal((5, 5)))[0]  # distances do not change
    points = (line[:, None] * rotation[0]).astype(np.float32)
    assert fid.precision_recall(points[:10], points[10:], k=3) == pytest.approx((0.5, 0.7), abs=1e-12)


def test_fid_precision_recall_exact_coverage_of_a_grid():
    # An 11x11 grid of spacing h over the unit square: every 3rd-neighbour radius is >= h, and every point of the
    # square is within h/sqrt(2) of a grid point, so the grid's manifold holds the square and nothing 9 away.
    # Against points drawn from the square and from a copy 10 to the right, recall (grid as samples) and precision
    # (grid as reference) are exactly the share of points in the square.
    grid = np.stack(np.meshgrid(np.linspace(0, 1, 11), np.linspace(0, 1, 11)), -1).reshape(-1, 2).astype(np.float32)
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 1, (400, 2)) + np.where(rng.uniform(size=(400, 1)) < 0.5, [[0, 0]], [[10, 0]])
    points = points.astype(np.float32)
    share = (points[:, 0] < 5).mean()
    assert 0.3 < share < 0.7  # both parts of the set are there
    assert fid.precision_recall(points, grid)[1] == pytest.approx(share, abs=1e-12)
    assert fid.precision_recall(grid, points)[0] == pytest.approx(share, abs=1e-12)


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


def test_fid_ssim_matches_window_by_window_loops():
    x, y = _fid_images(2, 15, seed=0), _fid_images(2, 15, seed=1)
    np.testing.assert_allclose(fid.ssim(x, y).numpy(), _fid_ssim_loops(x, y), rtol=1e-10)


def test_fid_center_crop_and_image_folder(tmp_path):
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
    (tmp_path / "3.png").write_bytes(b"not a png")
    with pytest.raises(tu.DataError, match="3.png"):
        fid.load_images(str(tmp_path), 40)[0:4]
    with pytest.raises(ValueError, match="size"):
        fid.load_images(str(tmp_path))
    with pytest.raises(tu.MissingFileError, match="missing.npz"):
        fid.load_images(str(tmp_path / "missing.npz"))


def test_fid_paired_metrics_against_image_folder(tmp_path):
    images = np.minimum(_fid_images(10, 16), 245)  # room for +10 without clipping
    (tmp_path / "val" / "cls").mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "val" / "cls" / f"{i:03d}.png")
    originals = fid.load_images(str(tmp_path / "val"), 16)
    same = fid.paired_metrics(images, originals, _FidTinyLpips(), batch_size=4, progress=False)
    assert math.isinf(same["psnr"]) and same["ssim"] == pytest.approx(1.0, abs=1e-12) and same["lpips"] == 0
    other = fid.paired_metrics(images + 10, originals, _FidTinyLpips(), batch_size=4, progress=False)
    assert other["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / 100), rel=1e-12)  # MSE = 10² exactly
    assert other["ssim"] == pytest.approx(_fid_ssim_loops(images + 10, images).mean(), rel=1e-10)
    assert other["lpips"] == pytest.approx(10 / 127.5, rel=1e-6)  # the stand-in saw [-1, 1] images


def test_fid_cache_follows_reference_content(tmp_path, capsys):
    net, samples = _FidTinyNet(), _fid_images(10, 32, seed=0)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    ref, cache = tmp_path / "ref.npz", tmp_path / "ref_adm_fidstats.npz"
    np.savez(ref, arr_0=_fid_images(10, 32, seed=1))

    def run(**kwargs):
        return fid.evaluate(str(tmp_path / "samples.npz"), str(ref), net, progress=False, **kwargs)

    first = run()
    assert first["fid"] > 1e-3 and cache.is_file()
    assert _fid_notes(capsys) == [f"caching the reference statistics of {ref} in {cache}"]
    # The samples themselves become the reference, in a file of the same size and modification time: only its
    # bytes tell the two references apart.
    before = ref.stat()
    np.savez(ref, arr_0=samples)
    os.utime(ref, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (ref.stat().st_size, ref.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = run()
    assert abs(second["fid"]) < 1e-6 and abs(second["sfid"]) < 1e-6  # identical sets, up to eigh round-off
    assert _fid_notes(capsys) == [f"recomputing the cached reference statistics {cache}: {ref} changed since it "
                                  "was made"]
    assert run() == second  # a cache never changes a number
    assert _fid_notes(capsys) == [f"using the cached reference statistics {cache} ({ref} is unchanged)"]
    assert run(cache=False) == second and _fid_notes(capsys) == []
    with pytest.raises(tu.DataError, match="another Inception"):  # the cache as REF keeps its network tag
        fid.reference_stats(str(cache), _FidTinyNet(seed=1))
    np.testing.assert_array_equal(fid.reference_stats(str(cache), net)["pool"],
                                  fid.inception_features(net, samples, progress=False)["pool"])
    fid.reference_stats(str(ref), _FidTinyNet(seed=1), progress=False)
    assert _fid_notes(capsys) == [f"recomputing the cached reference statistics {cache}: it was made with another "
                                  "Inception or preprocessing"]


def test_fid_cache_of_image_folder_follows_its_files(tmp_path, capsys):
    net = _FidTinyNet()
    np.savez(tmp_path / "samples.npz", arr_0=_fid_images(10, 32, seed=0))
    (tmp_path / "ref").mkdir()
    for i, im in enumerate(_fid_images(10, 32, seed=1)):
        Image.fromarray(im).save(tmp_path / "ref" / f"{i}.png")
    cache = tmp_path / "ref_adm_32px_fidstats.npz"

    def run(**kwargs):
        return fid.evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref"), net, progress=False, **kwargs)

    first = run()
    assert cache.is_file() and run() == first and len(_fid_notes(capsys)) == 2
    path = tmp_path / "ref" / "3.png"
    before = path.stat()
    Image.fromarray(_fid_images(1, 32, seed=2)[0]).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    changed = run()
    assert changed != first and changed == run(cache=False)
    assert _fid_notes(capsys) == [f"recomputing the cached reference statistics {cache}: {tmp_path / 'ref'} changed "
                                  "since it was made"]
    (tmp_path / "ref" / "7.png").unlink()
    fewer = run()
    assert fewer != changed and fewer == run(cache=False)
    assert "changed since it was made" in _fid_notes(capsys)[0]


def test_fid_damaged_or_older_cache_is_rebuilt(tmp_path, capsys):
    net = _FidTinyNet()
    np.savez(tmp_path / "samples.npz", arr_0=_fid_images(10, 32, seed=0))
    np.savez(tmp_path / "ref.npz", arr_0=_fid_images(10, 32, seed=1))
    ref, cache = tmp_path / "ref.npz", tmp_path / "ref_adm_fidstats.npz"
    fresh = fid.evaluate(str(tmp_path / "samples.npz"), str(ref), net, progress=False, cache=False)
    cache.write_bytes(b"PK\x03\x04 cut short")  # an npz (zip) killed while being written
    older = {"mu": np.zeros(12), "tag": np.array(fid.stats_tag(net, "adm"))}  # no content key
    for content, why in [(None, "it is unreadable (BadZipFile)"), (older, "it lacks ['sigma', 'mu_s', 'sigma_s', "
                                                                        "'pool', 'image_size', 'source']")]:
        if content is not None:
            np.savez(cache, **content)
        assert fid.evaluate(str(tmp_path / "samples.npz"), str(ref), net, progress=False) == fresh
        assert _fid_notes(capsys) == [f"recomputing the cached reference statistics {cache}: {why}"]
        assert fid.stale_cache(str(cache), str(ref), fid.stats_tag(net, "adm"), fid.content_digest(str(ref))) == ""


def test_fid_no_cache_reads_and_writes_nothing(tmp_path, capsys):
    net = _FidTinyNet()
    np.savez(tmp_path / "samples.npz", arr_0=_fid_images(10, 32, seed=0))
    np.savez(tmp_path / "ref.npz", arr_0=_fid_images(10, 32, seed=1))
    fresh = fid.evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), net, progress=False, cache=False)
    assert sorted(os.listdir(tmp_path)) == ["ref.npz", "samples.npz"] and _fid_notes(capsys) == []
    # A cache that is wrong for the present REF (made by another network, relabelled as this one's) is not read.
    fid.evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), _FidTinyNet(seed=1), progress=False)
    cache = tmp_path / "ref_adm_fidstats.npz"
    with np.load(cache) as data:
        poisoned = {**data, "tag": np.array(fid.stats_tag(net, "adm"))}
    np.savez(cache, **poisoned)
    written = cache.read_bytes()
    capsys.readouterr()
    again = fid.evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), net, progress=False, cache=False)
    assert again == fresh and cache.read_bytes() == written and _fid_notes(capsys) == []
    assert fid.evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), net, progress=False) != fresh


def test_fid_refuses_doubtful_inputs_before_building_networks(tmp_path, monkeypatch):
    _fid_forbid_networks(monkeypatch)
    for name, images in [("s32", _fid_images(10, 32)), ("s64", _fid_images(10, 64)), ("r12", _fid_images(12, 32)),
                         ("five", _fid_images(5, 32)), ("wide", _fid_images(10, 32)[:, :, :24]),
                         ("empty", np.zeros((0, 32, 32, 3), np.uint8)), ("floats", np.zeros((10, 32, 32, 3)))]:
        np.savez(tmp_path / f"{name}.npz", arr_0=images)
    np.savez(tmp_path / "mu_only.npz", mu=np.zeros(2048))
    (tmp_path / "random.npz").write_bytes(os.urandom(1000))
    (tmp_path / "folder").mkdir()
    Image.fromarray(_fid_images(1, 40)[0]).save(tmp_path / "folder" / "a.png")
    p = lambda name: str(tmp_path / name)
    cases = [
        ([p("s32.npz"), p("s64.npz")], tu.DataError, "32x32 images but .* 64x64.*--allow-size-mismatch"),
        ([p("s32.npz"), p("s64.npz"), "--paired"], tu.DataError, "--paired: .* 10 images of 32x32 .* 10 of 64x64"),
        ([p("s32.npz"), p("r12.npz"), "--paired"], tu.DataError, "--paired: .* 10 images .* 12 of 32x32"),
        ([p("empty.npz"), p("s32.npz")], tu.DataError, "empty.npz holds no images"),
        ([p("s32.npz"), p("empty.npz")], tu.DataError, "empty.npz holds no images"),
        ([p("five.npz"), p("s32.npz")], tu.DataError, "five.npz holds 5 images: the Inception score needs at least 10"),
        ([p("floats.npz"), p("s32.npz")], tu.DataError, "floats.npz: arr_0 should hold uint8"),
        ([p("s32.npz"), p("mu_only.npz")], tu.DataError, "mu_only.npz has no images \\(key arr_0\\)"),
        ([p("random.npz"), p("s32.npz")], tu.DataError, "random.npz is not an npz file"),
        ([p("s32.npz"), p("nowhere.npz")], tu.MissingFileError, "nowhere.npz"),
        ([p("folder"), p("s32.npz")], tu.DataError, "folder is a folder, not an npz file"),
        ([p("wide.npz"), p("folder")], tu.DataError, "must be square"),
        ([p("s32.npz"), p("folder")], tu.DataError, "precision/recall need more than k=3 reference images; .* 1$"),
        ([p("s32.npz"), p("s32.npz"), "--batch-size", "0"], tu.UsageError, "--batch-size: must be a positive"),
        ([p("s32.npz"), p("s32.npz"), "--random-lpips"], tu.UsageError, "--random-lpips applies to --paired"),
        ([p("s32.npz"), p("s32.npz"), "--paired", "--allow-size-mismatch"], tu.UsageError, "--allow-size-mismatch"),
        ([p("s32.npz"), p("s32.npz"), "--inception", "x.pth", "--random-inception"], tu.UsageError, "exclude"),
    ]
    for argv, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            fid.main(argv)
    # The inputs pass once the mismatch is allowed: the next step builds the network.
    with pytest.raises(AssertionError, match="network was built"):
        fid.main([p("s32.npz"), p("s64.npz"), "--allow-size-mismatch", "--random-inception"])


def test_fid_main_labels_random_networks_and_honours_no_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, "random_inception", lambda seed: _FidTinyNet(seed))
    monkeypatch.setattr(fid, "seeded_random_lpips", lambda: _FidTinyLpips())
    images = np.minimum(_fid_images(10, 32), 245)
    np.savez(tmp_path / "originals.npz", arr_0=images)
    np.savez(tmp_path / "recons.npz", arr_0=images + 10)
    out = tmp_path / "out" / "metrics.json"
    results = fid.main([str(tmp_path / "recons.npz"), str(tmp_path / "originals.npz"), "--paired", "--no-cache",
                        "--random-inception", "--random-lpips", "--json", str(out), "--batch-size", "4"])
    assert sorted(os.listdir(tmp_path)) == ["originals.npz", "out", "recons.npz"]  # no cache
    assert json.loads(out.read_text()) == results
    assert results["note"] == ("seeded random Inception and LPIPS VGG trunk: plumbing-only numbers, not comparable "
                               "to published FIDs")
    assert results["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / 100), rel=1e-12)
    assert results["lpips"] == pytest.approx(10 / 127.5, rel=1e-6) and results["num_samples"] == 10
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0] == f"note: {results['note']}" and "psnr: 28.1308" in stdout
    fid.main([str(tmp_path / "recons.npz"), str(tmp_path / "originals.npz"), "--random-inception"])
    assert (tmp_path / "originals_adm_fidstats.npz").is_file()
    assert capsys.readouterr().out.startswith("note: seeded random Inception: plumbing-only")


@pytest.mark.slow
def test_fid_random_lpips_is_seeded_and_leaves_the_global_generator_alone():
    with torch.random.fork_rng():
        torch.manual_seed(1)
        a = fid.seeded_random_lpips()
        torch.manual_seed(2)
        state = torch.get_rng_state()
        b = fid.seeded_random_lpips()
        assert torch.equal(torch.get_rng_state(), state)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.slow
def test_fid_cli_user_error_is_one_line(tmp_path):
    """The only subprocess test of fid.py: its __main__ turns a user error into one line and exit status 1."""
    np.savez(tmp_path / "samples.npz", arr_0=_fid_images(10, 32))
    np.savez(tmp_path / "ref.npz", arr_0=_fid_images(10, 64))
    here = os.path.dirname(os.path.abspath(fid.__file__))
    proc = subprocess.run([sys.executable, os.path.join(here, "fid.py"), "samples.npz", "ref.npz"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["fid.py: error: samples.npz holds 32x32 images but ref.npz 64x64: a FID "
                                        "between images of different sizes is not meaningful "
                                        "(--allow-size-mismatch computes it anyway)"]


@pytest.fixture(scope="module")
def probe_ae(tmp_path_factory):
    """A random tiny DINO-SAE saved as train_ae.py saves it, with ρ measured as train_ae.py measures it (the mean token
    norm of z_S) on 16 synthetic images -> (stage folder, ρ)."""
    out = str(tmp_path_factory.mktemp("probe"))
    args = train_ae.parse_args(["--stage", "4", "--preset", "tiny", "--out", out])
    config = train_ae.build_config(args)
    torch.manual_seed(0)
    ae = build_autoencoder(config).eval()
    with torch.no_grad():
        rho = ae.encoder(_probe_images(16, seed=5))["z_s"].norm(dim=-1).mean().item()
    opt = torch.optim.AdamW(ae.decoder.parameters())
    progress = dict(step=0, epoch=0, step_in_epoch=0, skipped_images=0, nonfinite_steps=0, tallies={})
    state = dict(train_ae.checkpoint_state(args, config, ae, None, opt, None, rho), progress=progress)
    folder = os.path.join(out, "stage4")
    tu.CheckpointManager(folder).save(state, 0)
    return folder, rho


def _probe_images(n, seed=0):
    data = tu.SyntheticImages(num_items=n, image_size=TINY_CONFIG["image_size"], seed=seed)
    return torch.stack([data[i][0] for i in range(n)])


def _probe_uint8_levels(x):
    """[-1, 1] images -> their saved 8-bit levels clamp(127.5x + 128) truncated, as float64 [B, 3, H, W]."""
    return (127.5 * x.float() + 128).clamp(0, 255).floor().double()


def _probe_psnr(a, b):
    """10·log10(255² / MSE) per image on the 8-bit levels, averaged over the images."""
    mse = (_probe_uint8_levels(a) - _probe_uint8_levels(b)).square().flatten(1).mean(1)
    return (10 * torch.log10(255 ** 2 / mse)).mean().item()


def _probe_l1_levels(a, b):
    """Mean absolute difference of the 8-bit levels, on the [-1, 1] scale, averaged over the images."""
    return ((_probe_uint8_levels(a) - _probe_uint8_levels(b)).abs().flatten(1).mean(1) / 127.5).mean().item()


class _ProbeL1(nn.Module):
    """A stand-in for LPIPS (per-image mean |a - b|): cheap, and known exactly, so the LPIPS column can be checked."""

    def __init__(self, pretrained=True):
        super().__init__()
        self.pretrained = pretrained

    def forward(self, a, b):
        return (a - b).abs().flatten(1).mean(1)


_PROBE_SETTINGS = ["z_S", "rho*z_S/|z_S|", "0.5*z_S", "0.75*z_S", "1.25*z_S", "1.5*z_S", "2*z_S"]


def _probe_decoded_by_hand(ae, images, rho):
    """The magnitude experiment's latents decoded without probe.py or DinoSAE.decode_sphere -> {setting: images}."""
    with torch.no_grad():
        z = ae.encoder.encode(images)
        decoded = {"z_S": ae(images)["x_hat"], "rho*z_S/|z_S|": ae.decoder(rho * z / z.norm(dim=1, keepdim=True))}
        decoded.update({f"{k:g}*z_S": ae.decoder(k * z) for k in (0.5, 0.75, 1.25, 1.5, 2.0)})
    return decoded


def test_linear_probe_separable_features_reach_top1_one():
    g = torch.Generator().manual_seed(0)

    def sample(n):
        y = torch.randint(0, 4, (n,), generator=g)
        f = torch.randn(n, 16, generator=g) * 0.3
        f[:, :4] += 3 * torch.nn.functional.one_hot(y, 4)
        return f, y

    (ft, yt), (fv, yv) = sample(200), sample(100)
    result = probe.train_linear_probe(ft, yt, fv, yv)
    assert result == {"top1": 1.0, "top5": 1.0}


def test_linear_probe_random_labels_at_chance():
    # Val labels independent of everything the classifier saw: each val image is a hit with probability k/10 for
    # top-k, so top-1 ~ Binomial(2000, 0.1)/2000 (sd 0.0067) and top-5 ~ Binomial(2000, 0.5)/2000 (sd 0.0112).
    g = torch.Generator().manual_seed(1)
    ft, yt = torch.randn(400, 32, generator=g), torch.randint(0, 10, (400,), generator=g)
    fv, yv = torch.randn(2000, 32, generator=g), torch.randint(0, 10, (2000,), generator=g)
    result = probe.train_linear_probe(ft, yt, fv, yv)
    assert abs(result["top1"] - 0.1) < 4 * 0.0067
    assert abs(result["top5"] - 0.5) < 4 * 0.0112


def test_linear_probe_rejects_bad_inputs():
    f, y = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(ValueError, match="dim"):
        probe.train_linear_probe(f, y, torch.randn(10, 5), y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        probe.train_linear_probe(f, torch.zeros(10, dtype=torch.long), f, y)


def test_pca_rgb_is_the_min_max_scaled_svd_projection():
    g = torch.Generator().manual_seed(0)
    B, h, w, D = 2, 3, 4, 8
    tokens = torch.randn(B, h * w, D, generator=g) * torch.linspace(3, 0.2, D)  # distinct variances
    tokens = tokens @ torch.linalg.qr(torch.randn(D, D, generator=g))[0] + 5  # rotated and shifted
    rgb = probe.pca_rgb(tokens, h, w)
    assert rgb.shape == (B, 3, h, w)
    x = tokens.reshape(-1, D).double()
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    for c in range(3):
        v = vh[c] * vh[c][vh[c].abs().argmax()].sign()  # the documented sign: the largest loading is positive
        proj = x @ v
        expected = (proj - proj.min()) / (proj.max() - proj.min())
        got = rgb[:, c].reshape(-1).double()  # row-major tokens, like the patch sequence
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="tokens"):
        probe.pca_rgb(tokens, h, w + 1)


def test_pca_maps_writes_grid_png(probe_ae, tmp_path):
    ae, _ = load_autoencoder(probe_ae[0])
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


def test_magnitude_table_rows_are_the_settings_decoded_by_hand(probe_ae):
    folder, rho = probe_ae
    ae, _ = load_autoencoder(folder)
    images = _probe_images(4)
    table = probe.magnitude_table(ae, images, lpips_net=_ProbeL1(), batch_size=3, progress=False)  # batches 3 + 1
    assert list(table["settings"]) == _PROBE_SETTINGS
    # Other batch sizes move a few pixels across a rounding edge (a few 1e-6 dB); the tiny random decoder makes all
    # rows noise-like, ~9.3 dB, so the rows a wrong latent would give are only ~2e-3 dB away (checked below).
    decoded = _probe_decoded_by_hand(ae, images, rho)
    expected = {name: _probe_psnr(x_hat, images) for name, x_hat in decoded.items()}
    for name, x_hat in decoded.items():
        assert table["settings"][name]["psnr"] == pytest.approx(expected[name], abs=5e-5), name
        assert table["settings"][name]["lpips"] == pytest.approx(_probe_l1_levels(x_hat, images), abs=2e-6), name
    assert table["rho"] == pytest.approx(rho) and table["radius"] == math.sqrt(128) and table["num_images"] == 4
    assert json.loads(json.dumps(table)) == table
    with torch.no_grad():
        z = ae.encoder.encode(images)
        at_radius = _probe_psnr(ae.decoder(math.sqrt(128) * z / z.norm(dim=1, keepdim=True)), images)
    assert abs(expected["rho*z_S/|z_S|"] - at_radius) > 1e-3 and abs(expected["rho*z_S/|z_S|"] - expected["z_S"]) > 1e-3


def test_magnitude_direction_row_is_decoded_at_rho(probe_ae):
    # The tiny model's measured rho is close to R and to every token norm; at a rho of 2R, forgetting the rescale or
    # decoding z_S instead of its direction is a tenth of a dB away.
    ae, _ = load_autoencoder(probe_ae[0])
    ae.rho = 2 * math.sqrt(128)
    images = _probe_images(4)
    row = probe.magnitude_table(ae, images, factors=[], progress=False)["settings"]["rho*z_S/|z_S|"]
    with torch.no_grad():
        z = ae.encoder.encode(images)
        direction = z / z.norm(dim=1, keepdim=True)
        expected, at_radius, z_s = (_probe_psnr(ae.decoder(x), images) for x in (ae.rho * direction,
                                                                                  math.sqrt(128) * direction, z))
    assert row["psnr"] == pytest.approx(expected, abs=5e-5)
    assert abs(expected - at_radius) > 0.05 and abs(expected - z_s) > 0.05


def test_magnitude_table_without_lpips_and_without_rho(probe_ae):
    ae, _ = load_autoencoder(probe_ae[0])
    table = probe.magnitude_table(ae, _probe_images(2), factors=[3.0], progress=False)
    assert list(table["settings"]) == ["z_S", "rho*z_S/|z_S|", "3*z_S"]
    assert all(row["lpips"] is None for row in table["settings"].values())
    ae.rho = None
    with pytest.raises(ValueError, match="rho"):
        probe.magnitude_table(ae, _probe_images(2), progress=False)


def test_magnitude_grid_png_has_originals_then_one_row_per_setting(probe_ae, tmp_path):
    folder, rho = probe_ae
    ae, _ = load_autoencoder(folder)
    images = _probe_images(3)
    path = str(tmp_path / "grid" / "magnitude.png")
    grid = probe.magnitude_grid(ae, images, path)
    size = TINY_CONFIG["image_size"]
    with Image.open(path) as im:
        assert im.size == (3 * (size + 2) + 2, 8 * (size + 2) + 2)  # 3 columns, originals + 7 settings
    assert grid.shape == (24, 3, size, size)
    assert torch.equal(grid[:3], images)
    expected = _probe_decoded_by_hand(ae, images, rho)
    for row, name in enumerate(_PROBE_SETTINGS, start=1):
        torch.testing.assert_close(grid[3 * row:3 * row + 3], expected[name], atol=1e-4, rtol=0, msg=name)


def test_magnitude_lpips_net_is_pretrained_when_its_file_is_there_else_random_on_request(tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "build_lpips", _ProbeL1)
    vgg = tmp_path / "vgg16.pth"
    monkeypatch.setattr(probe, "vgg16_cache_path", lambda: str(vgg))
    net, kind = probe.build_lpips_for(argparse.Namespace(random_lpips=False, seed=0), torch.device("cpu"))
    assert net is None and kind.startswith("not computed") and str(vgg) in kind
    net, kind = probe.build_lpips_for(argparse.Namespace(random_lpips=True, seed=0), torch.device("cpu"))
    assert net.pretrained is False and "plumbing" in kind
    vgg.write_bytes(b"")
    net, kind = probe.build_lpips_for(argparse.Namespace(random_lpips=False, seed=0), torch.device("cpu"))
    assert net.pretrained is True and kind == "pretrained VGG16"


def test_magnitude_cli_tiny_end_to_end(probe_ae, tmp_path, monkeypatch, capsys):
    folder, rho = probe_ae
    monkeypatch.setattr(probe, "build_lpips", _ProbeL1)
    out, png = str(tmp_path / "m.json"), str(tmp_path / "m.png")
    probe.main(["magnitude", "--preset", "tiny", "--ae", folder, "--num-images", "6", "--show", "4", "--random-lpips",
                "--json", out, "--out", png])
    with open(out) as f:
        result = json.load(f)
    assert set(result) == {"settings", "rho", "radius", "num_images", "lpips_net"}
    assert list(result["settings"]) == _PROBE_SETTINGS and result["num_images"] == 6
    assert result["rho"] == pytest.approx(rho) and "plumbing" in result["lpips_net"]
    ae, _ = load_autoencoder(folder)
    images = _probe_images(6)  # the tiny preset's synthetic images, all 6 in order
    z_s = result["settings"]["z_S"]
    with torch.no_grad():
        x_hat = ae(images)["x_hat"]
    assert z_s["psnr"] == pytest.approx(_probe_psnr(x_hat, images), abs=1e-4)
    assert z_s["lpips"] == pytest.approx(_probe_l1_levels(x_hat, images), abs=1e-6)
    printed = capsys.readouterr().out
    assert f"z_S            | {z_s['psnr']:9.2f} | {z_s['lpips']:.4f}" in printed
    assert printed.index("rho*z_S/|z_S|") < printed.index("0.5*z_S") < printed.index("2*z_S")
    with Image.open(png) as im:
        assert im.size == (4 * 66 + 2, 8 * 66 + 2)


def test_to_uint8_inverts_dataset_scaling():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    x = u.float() / 127.5 - 1  # ImageFolderDataset's scaling
    assert torch.equal(tu.to_uint8(x), u.permute(0, 2, 3, 1))
    between = torch.tensor([-3.0, 0.3, 3.0]).view(1, 1, 1, 3)  # clamped, 127.5·0.3 + 128 = 166.25 truncated, clamped
    assert tu.to_uint8(between).flatten().tolist() == [0, 166, 255]


def test_linear_cli_tiny_end_to_end(probe_ae, tmp_path, capsys):
    out = str(tmp_path / "linear.json")
    probe.main(["linear", "--preset", "tiny", "--ae", probe_ae[0], "--num-images", "32", "--json", out])
    with open(out) as f:
        result = json.load(f)
    printed = capsys.readouterr().out
    assert result == json.loads(printed[printed.index("{"):])  # after the tiny preset's line
    assert (result["num_train"], result["num_val"]) == (32, 8)
    assert result["feature_dim"] == 2 * 128
    for name in ("teacher", "student"):
        assert 0 <= result[name]["top1"] <= result[name]["top5"] <= 1


def _probe_class_folder(root, classes):
    for c in classes:
        os.makedirs(os.path.join(root, c))
        Image.new("RGB", (8, 8)).save(os.path.join(root, c, "a.png"))
    return str(root)


def test_cli_errors(probe_ae, tmp_path, monkeypatch, capsys):
    folder = probe_ae[0]
    train = _probe_class_folder(tmp_path / "train", ["cat", "dog"])
    val = _probe_class_folder(tmp_path / "val", ["cat", "emu"])
    tiny = ["--preset", "tiny", "--ae", folder]
    cases = [
        (["magnitude", "--preset", "tiny", "--ae", str(tmp_path / "missing")], tu.MissingFileError,
         "no autoencoder checkpoint"),
        (["pca", "--ae", folder], tu.UsageError, "image folder is required"),
        (["linear", *tiny, "--train-data", train], tu.UsageError, "both --train-data and --val-data"),
        (["magnitude", *tiny, "--batch-size", "0"], tu.UsageError, "--batch-size must be at least 1, got 0"),
        (["magnitude", *tiny, "--show", "0"], tu.UsageError, "--show must be at least 1"),
        (["magnitude", *tiny, "--factors", "0.5", "-1"], tu.UsageError, "--factors must be distinct and positive"),
        (["magnitude", *tiny, "--factors", "2", "2"], tu.UsageError, "--factors must be distinct and positive"),
        (["pca", *tiny, "--num-workers", "-1"], tu.UsageError, "--num-workers"),
        (["pca", *tiny, "--bogus"], tu.UsageError, "unrecognized arguments: --bogus"),
        (["magnitude", "--ae", folder, "--data", str(tmp_path / "nowhere")], tu.MissingFileError, "does not exist"),
        (["linear", "--ae", folder, "--train-data", train, "--val-data", val], tu.DataError, "same class subfolders"),
    ]
    monkeypatch.setattr(probe, "load_autoencoder", lambda *a, **k: pytest.fail("a model was loaded"))
    for argv, error, message in cases:
        with pytest.raises(error, match=message):
            probe.main(argv)
    with pytest.raises(SystemExit) as stop:
        tu.cli(lambda: probe.main(["magnitude", *tiny, "--batch-size", "0"]))
    assert stop.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_magnitude_cli_refuses_a_checkpoint_without_rho(probe_ae, tmp_path):
    state, _ = tu.load_checkpoint(probe_ae[0], "dino-sae-ae", "--ae")
    folder = str(tmp_path / "old")
    tu.CheckpointManager(folder).save(dict(state, rho=None), 0)
    with pytest.raises(tu.DataError, match="no mean token norm rho"):
        probe.main(["magnitude", "--preset", "tiny", "--ae", folder, "--num-images", "2"])


@pytest.mark.slow
def test_cli_errors_are_one_line_from_the_shell(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "probe.py"), "magnitude", "--preset", "tiny", "--ae",
                           str(tmp_path / "missing")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"probe.py: error: no autoencoder checkpoint at {tmp_path / 'missing'}"
                                                ": train one with train_ae.py (stages 1-4; --preset tiny writes "
                                                "runs/tiny/ae/stage4) or pass --ae"]


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory):
    """A tiny stage-4 DINO-SAE checkpoint with random weights, written by train_ae.py's own checkpoint code; its ρ is
    measured on synthetic images as the trainer measures it (mean token norm of z_S)."""
    out = tmp_path_factory.mktemp("ae")
    args = train_ae.parse_args(["--stage", "4", "--preset", "tiny", "--out", str(out)])
    config = train_ae.build_config(args)
    torch.manual_seed(0)
    ae = train_ae.build_autoencoder(config)
    with torch.no_grad():
        images = torch.stack([tu.SyntheticImages(8, 64)[i][0] for i in range(8)])
        rho = ae.encoder(images)["z_s"].norm(dim=-1).mean().item()
    opt = torch.optim.AdamW(ae.decoder.parameters())
    progress = dict(step=0, epoch=0, step_in_epoch=0, skipped_images=0, nonfinite_steps=0, tallies={})
    state = dict(train_ae.checkpoint_state(args, config, ae, None, opt, None, rho), progress=progress)
    return tu.CheckpointManager(str(out / "stage4")).save(state, 0)


def _gen_train(ae_path, out, *extra):
    argv = ["--preset", "tiny", "--ae", ae_path, "--out", str(out), "--num-images", "12", "--global-batch", "4",
            "--log-every", "1", "--sample-every", "1000", "--ckpt-every", "1000", *extra]
    return train_dit.main(argv)


@pytest.fixture(scope="module")
def tiny_dit(tiny_ae, tmp_path_factory):
    """A tiny LightningDiT run folder (2 steps)."""
    out = tmp_path_factory.mktemp("dit")
    _gen_train(tiny_ae, out, "--max-steps", "2")
    return str(out)


def _gen_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _gen_png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])  # width, height


def _gen_weights(result):
    return {**{f"model.{k}": v for k, v in result.model.state_dict().items()},
            **{f"ema.{k}": v for k, v in result.ema.state_dict().items()}}


@pytest.mark.slow
def test_tiny_dit_loss_falls(tiny_ae, tmp_path):
    out = tmp_path / "learn"
    _gen_train(tiny_ae, out, "--num-images", "8", "--global-batch", "8", "--max-steps", "30")
    losses = [m["loss"] for m in _gen_metrics(str(out))]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:3])
    assert _gen_png_size(out / "samples_0000030.png") == (8 * 66 + 2, 2 * 66 + 2)  # 16 EMA samples, 8 per row
    state = torch.load(out / "ckpt_0000030.pt", weights_only=True)
    assert state["kind"] == "dino-sae-dit" and state["model_kwargs"]["in_channels"] == 128
    assert state["ae_config"]["image_size"] == 64 and state["progress"]["step"] == 30
    assert state["ae"] == tiny_ae  # the resolved autoencoder file, which sample.py decodes with


def test_dit_recipe_per_family(tiny_ae, tmp_path):
    """§4.2: AdamW lr 2e-4, betas (0.9, 0.95), no weight decay, batch 1024, 80 epochs; LightningDiT EMA 0.9999, constant
    lr, no clipping; DiT^DH EMA 0.9995, warm-up over 40 epochs, clipping at 1.0; label dropout 0.1."""
    light = train_dit.parse_args(["--model", "LightningDiT-XL/1"])
    dh = train_dit.parse_args(["--model", "DiTDH-XL/1"])
    for args in (light, dh):
        assert (args.lr, args.global_batch, args.epochs) == (2e-4, 1024, 80)
    assert (light.ema, light.warmup_epochs, light.grad_clip) == (0.9999, 0, 0.0)
    assert (dh.ema, dh.warmup_epochs, dh.grad_clip) == (0.9995, 40, 1.0)
    assert train_dit.BETAS == (0.9, 0.95) and train_dit.LABEL_DROPOUT == 0.1
    result = _gen_train(tiny_ae, tmp_path / "run", "--model", "DiTDH-XL/1", "--max-steps", "1", "--lr", "3e-4")
    group = torch.load(tmp_path / "run" / "ckpt_0000001.pt", weights_only=True)["opt"]["param_groups"][0]
    assert group["betas"] == (0.9, 0.95) and group["weight_decay"] == 0.0
    assert group["lr"] == pytest.approx(3e-4 / 3)  # warm-up: step 1 of the tiny preset's 1 epoch = 3 steps
    assert [train_dit.learning_rate(s, 2e-4, 4) for s in (1, 2, 4, 9)] == [5e-5, 1e-4, 2e-4, 2e-4]
    assert train_dit.learning_rate(1, 2e-4, 0) == 2e-4
    # EMA: ema <- decay·ema + (1 - decay)·param, from a copy of the model at init
    model = _dit_tiny("lightning")
    ema = copy.deepcopy(model)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    train_dit.update_ema(ema, model, 0.9)
    for (name, p), e in zip(model.named_parameters(), ema.parameters()):
        assert torch.allclose(e, 0.9 * before[name] + 0.1 * p, atol=1e-6), name
    # label dropout: 10% of the labels go to the null class, sample by sample
    rng = SampleRNG.for_step(0, 1, 20000, 0, 1, "cpu")
    dropped = (train_dit.drop_labels(torch.zeros(20000, dtype=torch.long), 1000, rng) == 1000).double().mean().item()
    assert abs(dropped - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 20000)
    assert isinstance(result.model, DiTDH)


def _dit_first_step(tiny_ae, out, *extra):
    """Gradients the optimizer saw at step 1 and the parameters after it."""
    seen = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        result = _gen_train(tiny_ae, out, "--num-images", "8", "--global-batch", "8", "--max-steps", "1", *extra)
    finally:
        torch.optim.AdamW.step = original
    return seen[0], list(result.model.parameters())


def test_dit_grad_accum_equals_the_full_batch_step(tiny_ae, tmp_path):
    """--grad-accum 4 (4 micro-batches of 2) takes the optimizer step of one batch of 8: every random number (label
    dropout, t, noise) belongs to a sample, and the chunk losses are divided by 4."""
    grads_full, params_full = _dit_first_step(tiny_ae, tmp_path / "full")
    grads_accum, params_accum = _dit_first_step(tiny_ae, tmp_path / "accum", "--grad-accum", "4")
    for a, b in zip(grads_full, grads_accum):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(params_full, params_accum):  # AdamW's lr·g/(|g| + 1e-8) turns fp noise on |g| ≈ 1e-8 into ~1e-6
        assert torch.allclose(a, b, rtol=0, atol=1e-5)
    grads_other, _ = _dit_first_step(tiny_ae, tmp_path / "other", "--seed", "1")
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads_full, grads_other))


def test_dit_resume_bit_identical_and_sigterm_mid_accumulation_window(tiny_ae, tmp_path, monkeypatch):
    # DiT^DH: lr warm-up (1 epoch = 3 steps in the tiny preset) and grad clipping are part of the resumed state;
    # two micro-batches per step, and the signal arrives between them.
    common = ("--model", "DiTDH-XL/1", "--max-steps", "6", "--grad-accum", "2")
    straight = _gen_weights(_gen_train(tiny_ae, tmp_path / "straight", *common))

    halves = tmp_path / "halves"
    _gen_train(tiny_ae, halves, *common[:2], "--max-steps", "4", "--grad-accum", "2", "--ckpt-every", "2")  # mid-epoch
    newest = halves / "ckpt_0000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a crash while writing, say
    with pytest.warns(UserWarning, match="ckpt_0000004.pt is unreadable"):
        resumed = _gen_weights(_gen_train(tiny_ae, halves, *common))  # falls back to step 2, runs 3..6

    real_loss, calls = train_dit.flow_matching_loss, []

    def loss_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # the first micro-batch of step 2: its window completes, then checkpoint and return
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*a, **k)

    monkeypatch.setattr(train_dit, "flow_matching_loss", loss_then_signal)
    stopped = _gen_train(tiny_ae, tmp_path / "preempted", *common)
    monkeypatch.setattr(train_dit, "flow_matching_loss", real_loss)
    assert stopped.stopped == signal.SIGTERM and len(calls) == 4
    assert sorted(f for f in os.listdir(tmp_path / "preempted") if f.startswith("ckpt")) == ["ckpt_0000002.pt"]
    after_signal = _gen_weights(_gen_train(tiny_ae, tmp_path / "preempted", *common))

    assert straight.keys() == resumed.keys() == after_signal.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
        assert torch.equal(straight[k], after_signal[k]), k
    metrics = _gen_metrics(str(halves))
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # the records of the lost steps 3-4 were replaced
    assert metrics[-1]["lr"] == pytest.approx(1e-3)  # warm-up over


def test_dit_non_finite_steps_skipped_then_fatal(tiny_ae, tmp_path, monkeypatch):
    real_loss, calls = train_dit.flow_matching_loss, []

    def nan_on_second_call(*a, **k):
        calls.append(1)
        loss = real_loss(*a, **k)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(train_dit, "flow_matching_loss", nan_on_second_call)
    result = _gen_train(tiny_ae, tmp_path / "one_nan", "--max-steps", "3")
    assert _gen_metrics(str(tmp_path / "one_nan"))[-1]["nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in [*result.model.parameters(), *result.ema.parameters()])

    monkeypatch.setattr(train_dit, "flow_matching_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    with pytest.raises(RuntimeError, match="2 consecutive steps"):
        _gen_train(tiny_ae, tmp_path / "all_nan", "--max-steps", "5", "--max-nonfinite", "2")


def test_dit_wrong_checkpoints_and_inputs_fail_clearly(tiny_ae, tiny_dit, tmp_path):
    with pytest.raises(tu.DataError, match="'dino-sae-ae' checkpoint, not a DiT checkpoint"):
        _gen_train(tiny_ae, tmp_path / "x", "--max-steps", "1", "--resume", tiny_ae)
    with pytest.raises(tu.DataError, match="holds LightningDiT-XL/1 .* this run builds DiTDH-XL/1"):
        _gen_train(tiny_ae, tmp_path / "x", "--max-steps", "1", "--model", "DiTDH-XL/1",
                   "--resume", os.path.join(tiny_dit, "ckpt_0000002.pt"))
    with pytest.raises(tu.DataError, match="Riemannian flow matching; pass the same --euclidean"):
        _gen_train(tiny_ae, tmp_path / "x", "--max-steps", "1", "--euclidean", "--resume", "auto", "--out", tiny_dit)
    with pytest.raises(tu.MissingFileError, match="does not exist"):
        _gen_train(tiny_ae, tmp_path / "x", "--data", str(tmp_path / "no_such_folder"))
    with pytest.raises(tu.MissingFileError, match="--ae .* does not exist"):
        train_dit.main(["--preset", "tiny", "--ae", str(tmp_path / "no_ae"), "--out", str(tmp_path / "x")])
    with pytest.raises(tu.DataError, match="--dit .* is a 'dino-sae-ae' checkpoint: expected a 'dino-sae-dit'"):
        sample.main(["--preset", "tiny", "--dit", tiny_ae, "--out", str(tmp_path / "s.npz")])
    with pytest.raises(tu.UsageError, match="trained with Riemannian flow matching: use --sampler euler-proj"):
        sample.main(["--preset", "tiny", "--dit", tiny_dit, "--sampler", "euler", "--out", str(tmp_path / "s.npz")])
    assert not (tmp_path / "x").exists()


def test_sample_writes_class_balanced_adm_npz_and_grid(tiny_dit, tmp_path):
    assert tu.to_uint8(torch.tensor([-1.0, 1.0, 0.0, -3.0, 3.0, 0.5]).view(1, 1, 1, 6)).flatten().tolist() == \
        [0, 255, 128, 0, 255, 191]  # clamp(127.5x + 128), truncated as the ADM/DiT samplers do
    out = str(tmp_path / "samples.npz")
    sample.main(["--preset", "tiny", "--dit", tiny_dit, "--num-samples", "16", "--steps", "4", "--batch-size", "16",
                 "--cfg-scale", "1.5", "--cfg-interval", "0.2", "1.0", "--out", out])
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (16, 64, 64, 3) and images.std() > 0
    assert labels.tolist() == [i % 8 for i in range(16)]  # 'equal': sample i has class i mod 8
    assert _gen_png_size(str(tmp_path / "samples.png")) == (8 * 66 + 2, 2 * 66 + 2)
    assert not [f for f in os.listdir(tmp_path) if "shard" in f]

    # each sample's noise depends on (seed, index) only: a different batching gives the same images
    sample.main(["--preset", "tiny", "--dit", tiny_dit, "--num-samples", "16", "--steps", "4", "--batch-size", "5",
                 "--cfg-scale", "1.5", "--cfg-interval", "0.2", "1.0", "--out", str(tmp_path / "again.npz")])
    with np.load(tmp_path / "again.npz") as f:
        assert np.abs(f["arr_0"].astype(int) - images).max() <= 1
    sample.main(["--preset", "tiny", "--dit", tiny_dit, "--num-samples", "400", "--steps", "1",
                 "--label-sampling", "random", "--out", str(tmp_path / "random.npz")])
    with np.load(tmp_path / "random.npz") as f:
        counts = np.bincount(f["arr_1"], minlength=8)
    assert counts.sum() == 400 and len(set(counts.tolist())) > 1 and counts.min() > 20  # uniform, not balanced


@pytest.fixture(scope="module")
def moving_dit(tiny_dit, tmp_path_factory):
    """The tiny DiT with its zero-initialised output layers perturbed: a velocity field that actually moves."""
    state = torch.load(os.path.join(tiny_dit, "ckpt_0000002.pt"), weights_only=True)
    g = torch.Generator().manual_seed(0)
    state["ema"] = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() and "freqs" not in k
                    else v for k, v in state["ema"].items()}
    path = tmp_path_factory.mktemp("moving") / "ckpt_0000002.pt"
    torch.save(state, path)
    return str(path)


def test_sample_decodes_through_the_sphere_with_the_decoder_only(moving_dit, tiny_ae, tmp_path, monkeypatch):
    """Generation loads the decoder only (no DINOv3 file) and feeds it ρ/R·x: tokens of norm ρ."""
    seen = []
    monkeypatch.setattr(DCAEDecoder, "forward", lambda self, z, f=DCAEDecoder.forward: seen.append(z) or f(self, z))
    monkeypatch.setattr(train_ae, "load_vit", lambda *a: pytest.fail("generation must not load the encoder"))
    sample.main(["--preset", "tiny", "--dit", moving_dit, "--num-samples", "4", "--steps", "3",
                 "--out", str(tmp_path / "s.npz")])
    rho = torch.load(tiny_ae, weights_only=True)["rho"]
    norms = torch.cat(seen).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, rho), rtol=1e-4)


def test_sample_rodrigues_and_euler_proj_converge_to_each_other(moving_dit, tmp_path):
    """Both integrate the same ODE on the spheres: at 2 steps their latents differ, and the gap shrinks with steps."""
    model, state = sample.load_dit(moving_dit, "cpu")
    noise = sample.initial_noise(range(4), model, math.sqrt(128), False, 0, "cpu")
    labels = torch.arange(4)
    gaps = []
    for steps in (2, 8, 32):
        a, b = (sample.sample_latents(model, labels, noise, math.sqrt(128), 1.0, name, steps)
                for name in ("euler-proj", "rodrigues"))
        gaps.append((a - b).norm(dim=1).max().item())
    assert gaps[0] > 1e-3 and gaps[1] < gaps[0] / 3 and gaps[2] < gaps[1] / 3, gaps


def test_recon_writes_paired_npz_of_center_crops(tiny_ae, tmp_path):
    data = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate([(60, 90), (140, 64), (64, 64)]):  # save_image_grid pads 2 px on each side
        tu.save_image_grid(torch.rand(1, 3, h, w, generator=g) * 2 - 1, str(data / "c0" / f"{i}.png"), 1)
    (data / "c0" / "broken.png").write_bytes(b"not a png")  # sorted last: with batches of 3 it is a batch alone
    out = str(tmp_path / "recon")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        sample.main(["--recon", "--preset", "tiny", "--ae", tiny_ae, "--data", str(data), "--batch-size", "3",
                     "--out", out])
    with np.load(out + "_originals.npz") as f:
        originals = f["arr_0"]
    with np.load(out + "_reconstructions.npz") as f:
        reconstructions = f["arr_0"]
    assert originals.dtype == reconstructions.dtype == np.uint8
    assert originals.shape == reconstructions.shape == (3, 64, 64, 3)

    dataset = tu.ImageFolderDataset(str(data), 64)
    ae, _ = train_ae.load_autoencoder(tiny_ae)
    x = torch.stack([dataset[i][0] for i in range(4) if dataset[i] is not None])
    assert np.array_equal(originals, ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    with torch.no_grad():
        z = ae.encoder(x)["z"]
        expected = ae.decoder(z)  # the decoder reads z_S itself
    expected = (127.5 * expected + 128).clamp(0, 255).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(expected.astype(int) - reconstructions).max() <= 1


REPO = os.path.dirname(os.path.abspath(__file__))
_RUNNER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import train_ae, train_dit
rank = os.environ.get("RANK", "0")
nan_step = int(os.environ.get("NAN_STEP", "0"))
if nan_step:  # poison one rank's loss at one step: every rank must skip that step together
    original, calls = train_ae.generator_loss, [0]
    def poisoned(*args, **kwargs):
        loss, metrics, out = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == nan_step and rank == "0":
            loss = loss * float("nan")
        return loss, metrics, out
    train_ae.generator_loss = poisoned
if os.environ.get("GRAD_DUMP"):  # the gradients each optimizer sees at its first step (all-reduced under DDP)
    original_step, seen = torch.optim.AdamW.step, set()
    def step(self, *args, **kwargs):
        if id(self) not in seen:
            seen.add(id(self))
            grads = [p.grad.clone() for group in self.param_groups for p in group["params"]]
            torch.save(grads, os.environ["GRAD_DUMP"] + rank + "_" + str(len(seen)))
        return original_step(self, *args, **kwargs)
    torch.optim.AdamW.step = step
trainer = train_dit if sys.argv[1] == "dit" else train_ae
result = trainer.main(sys.argv[2:])
model = result.model if sys.argv[1] == "dit" else result.ae
state = {{k: v for k, v in model.state_dict().items() if not k.startswith("encoder.vit.")}}
torch.save(state, os.path.join(os.environ["DUMP"], "rank" + rank + ".pt"))
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


def _launch(trainer, script_args, tmp_path, nproc=1, **env):
    """trainer ('ae' or 'dit') in a fresh process, or under torchrun with nproc gloo ranks -> (each rank's trained
    weights, the process)."""
    runner = tmp_path / "runner.py"
    runner.write_text(_RUNNER.format(repo=REPO))
    dump = tmp_path / f"dump_{nproc}_{len(os.listdir(tmp_path))}"
    dump.mkdir()
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                 if nproc > 1 else [])
    proc = subprocess.run(launch + [str(runner), trainer] + script_args, cwd=REPO,
                          env=_ae_env(DUMP=str(dump), **env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(dump / f"rank{r}.pt") for r in range(nproc)], proc


def _ae_same(a, b, atol=0.0):
    return all(torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0) for k in a)


def test_ae_recipe_of_the_four_stages():
    """§4.1: what trains, the loss terms and weights, AdamW's lr and betas, Eq. 10's noise; and the full preset's
    global batch 256 and flags default to them."""
    assert (train_ae.W_COS, train_ae.W_L1, train_ae.W_LPIPS, train_ae.W_ADV) == (0.5, 1.0, 1.0, 0.5)
    expected = {1: (True, True, False, 0.0, 1e-5, (0.9, 0.999)), 2: (True, True, True, 0.0, 1e-4, (0.5, 0.9)),
                3: (False, False, True, 0.0, 1e-4, (0.5, 0.9)), 4: (False, False, True, 0.8, 5.4e-5, (0.5, 0.9))}
    for stage, (stem, align, gan, tau, lr, betas) in expected.items():
        s = train_ae.STAGES[stage]
        assert (s["train_stem"], s["align"], s["gan"], s["noise_tau"], s["lr"], s["betas"]) == \
            (stem, align, gan, tau, lr, betas), stage
        args = train_ae.parse_args(["--stage", str(stage), "--data", "x"])
        assert args.lr is None and args.global_batch == 256 and args.grad_accum == 1


def _ae_parts(seed=0, with_disc=False):
    torch.manual_seed(seed)
    enc = DinoSAEEncoder(_model_tiny_vit(), stem_widths=(32, 32, 64, 64))
    ae = DinoSAE(enc, _model_tiny_decoder()).train()
    disc = DinoDiscriminator(_model_tiny_vit(seed=1, depth=12), resolution=32) if with_disc else None
    return ae, build_lpips(pretrained=False), disc


def test_ae_generator_loss_terms_and_weights_by_hand():
    """Stage 1: 0.5·(1 - cos) + L1 + LPIPS; stage 2 adds 0.5·λ·(-mean D(fake)) with λ the gradient-norm ratio at the
    decoder's last conv; stage 3 drops the alignment. Each term recomputed here from its definition."""
    ae, lpips, disc = _ae_parts(with_disc=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for stage in (1, 2, 3):
        loss, metrics, out = train_ae.generator_loss(ae, lpips, disc, x, train_ae.STAGES[stage],
                                                     SampleRNG.for_step(0, 1, 2, 0, 1, "cpu"))
        l1 = (out["x_hat"] - x).abs().mean()
        lp = lpips.net(out["x_hat"], x).mean()
        expect = l1 + lp
        if stage < 3:
            cos = torch.stack([1 - F.cosine_similarity(out["z_s"][b, n], out["z_t"][b, n], dim=0)
                               for b in range(2) for n in range(4)]).mean()
            expect = expect + 0.5 * cos
            assert torch.allclose(metrics["cos"], cos, atol=1e-6)
        else:
            assert "cos" not in metrics and "z_t" not in out
        if stage > 1:
            logits = disc(out["x_hat"], SampleRNG.for_step(0, 1, 2, 0, 1, "cpu"))
            g = -logits.mean()
            w = ae.decoder.last_layer_weight
            rec_grad, = torch.autograd.grad(expect, w, retain_graph=True)
            g_grad, = torch.autograd.grad(g, w, retain_graph=True)
            lam = rec_grad.norm() / (g_grad.norm() + 1e-6)
            assert torch.allclose(metrics["lam"], lam, rtol=1e-4)
            expect = expect + 0.5 * lam * g
        assert torch.allclose(loss, expect, rtol=1e-5, atol=1e-6), stage


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_ae_each_stage_overfits_a_fixed_batch(tmp_path, stage):
    args = _ae_args(tmp_path, stage, "--num-images", "4", "--max-steps", "12", "--lr", "1e-3", "--from-scratch")
    train_ae.main(args)
    rec = [m["l1"] + m["lpips"] for m in _ae_metrics(tmp_path, stage)]
    assert np.mean(rec[-3:]) < 0.75 * rec[0], rec
    if stage in (1, 2):
        cos = [m["cos"] for m in _ae_metrics(tmp_path, stage)]
        assert cos[-1] < 0.8 * cos[0], cos


@pytest.mark.slow
def test_ae_stages_chain_train_exactly_their_parts_and_see_raw_z_s(tmp_path, monkeypatch):
    """Stages 1-4 chained, 2 steps each: the stem trains in stages 1-2 only, the discriminator's heads in 2-4, the
    ViTs never; the optimizers carry the stage's betas; the logged terms are the stage's. In every step the decoder
    reads the encoder's z_S bit for bit, and in stage 4 z_S + σ·ε with σ ~ U(0, 0.8) drawn per sample."""
    seen = {"z": [], "decoder_in": []}

    def hook(module, args, output=None):
        if module.training and isinstance(module, DinoSAEEncoder) and output is not None:
            seen["z"].append(output["z"].detach().clone())
        elif module.training and isinstance(module, DCAEDecoder) and output is None:
            seen["decoder_in"].append(args[0].detach().clone())

    handles = [torch.nn.modules.module.register_module_forward_hook(hook),
               torch.nn.modules.module.register_module_forward_pre_hook(hook)]
    vit_file = tmp_path / "weights" / "tiny_dinov3_dino.pth"
    previous, terms = None, {1: {"cos"}, 2: {"cos", "g", "lam", "d_loss"}, 3: {"g", "lam", "d_loss"},
                             4: {"g", "lam", "d_loss"}}
    try:
        for stage in (1, 2, 3, 4):
            for key in seen:
                seen[key].clear()
            result = train_ae.main(_ae_args(tmp_path, stage, "--max-steps", "2"))
            assert len(seen["z"]) == len(seen["decoder_in"]) == 2
            for step, (z, dec) in enumerate(zip(seen["z"], seen["decoder_in"]), start=1):
                if stage < 4:
                    assert torch.equal(dec, z)
                else:  # the stage's SampleRNG: each sample's first draws are its σ/0.8 and then its ε
                    rng = SampleRNG.for_step(0, step, 4, 0, 1, "cpu")
                    sigma, eps = rng.rand(1, 1, 1) * 0.8, rng.randn(*z.shape[1:])
                    assert torch.equal(dec, z + sigma * eps) and (sigma > 0).all() and (sigma < 0.8).all()
                    assert len(set(sigma.flatten().tolist())) == 4
            frozen = load_dinov3(str(vit_file)).state_dict()
            assert all(torch.equal(v, frozen[k]) for k, v in result.ae.encoder.vit.state_dict().items())
            ckpt = _ae_latest(tmp_path, stage)
            assert ckpt["stage"] == stage and ckpt["progress"]["step"] == 2
            assert {g["betas"] for g in ckpt["opt"]["param_groups"]} == {train_ae.STAGES[stage]["betas"]}
            assert set(_ae_metrics(tmp_path, stage)[-1]) >= {"l1", "lpips", "loss"} | terms[stage]
            assert not (set(_ae_metrics(tmp_path, stage)[-1]) & ({"cos", "g", "lam", "d_loss"} - terms[stage]))
            if previous is not None:
                assert not _ae_same(ckpt["decoder"], previous["decoder"])
                assert _ae_same(ckpt["stem"], previous["stem"]) == (stage >= 3)
                if stage >= 3:
                    assert not _ae_same(ckpt["disc"], previous["disc"])
            if result.disc is not None:
                disc_vit = load_dinov3(str(tmp_path / "weights" / "tiny_dinov3_disc.pth")).state_dict()
                assert all(torch.equal(v, disc_vit[k]) for k, v in result.disc.feature_net.state_dict().items())
            previous = ckpt
    finally:
        for handle in handles:
            handle.remove()


def _ae_rho_by_hand(ckpt, epochs):
    """Mean token norm of z_S over the flipped training images of the given epochs, computed here from the data."""
    args = train_ae.parse_args(_ae_args("unused", 3, "--num-images", "4"))
    dataset = train_ae.build_dataset(args)
    ae, _ = train_ae.load_autoencoder(ckpt)
    norms = []
    for epoch in epochs:
        dataset.epoch = epoch
        x = torch.stack([dataset[i][0] for i in range(4)])
        with torch.no_grad():
            norms.append(ae.encoder(x)["z_s"].norm(dim=-1).flatten())
    return torch.cat(norms).double().mean().item()


@pytest.mark.slow
def test_ae_rho_is_the_mean_token_norm_and_survives_checkpoints_and_resume(tmp_path):
    """ρ of stage 3 (frozen encoder; 4 images, global batch 4: one step per epoch) equals the mean of ‖z_S‖ over the
    tokens of the images the steps saw, with their flips; in the log, the checkpoint and after a resume alike."""
    common = ("--num-images", "4", "--from-scratch", "--init", str(tmp_path / "none"))
    train_ae.main(_ae_args(tmp_path / "straight", 3, "--max-steps", "3", *common))
    train_ae.main(_ae_args(tmp_path / "resumed", 3, "--max-steps", "1", *common))
    train_ae.main(_ae_args(tmp_path / "resumed", 3, "--max-steps", "3", *common))
    straight, resumed = _ae_latest(tmp_path / "straight", 3), _ae_latest(tmp_path / "resumed", 3)
    ckpt = str(tmp_path / "straight" / "stage3")
    expected = _ae_rho_by_hand(ckpt, epochs=(0, 1, 2))
    assert straight["rho"] == pytest.approx(expected, rel=1e-6) and straight["rho"] == resumed["rho"]
    assert _ae_metrics(tmp_path / "straight", 3)[-1]["rho"] == straight["rho"]
    assert train_ae.load_autoencoder(ckpt)[0].rho == straight["rho"]
    first = _ae_metrics(tmp_path / "straight", 3)[0]["rho"]
    assert first == pytest.approx(_ae_rho_by_hand(ckpt, epochs=(0,)), rel=1e-6) and first != straight["rho"]


def test_ae_grad_accum_equals_the_full_batch_step(tmp_path):
    """--grad-accum 4 on a stage-1 batch of 8 takes the optimizer step of the full batch when the decoder's
    BatchNorms are in eval mode (in training mode they would see micro-batch statistics, as the README says)."""
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    results = []
    for accum in (1, 4):
        ae, lpips, _ = _ae_parts()
        for m in ae.decoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        # eps 1e-4: AdamW's first step is lr·g/(|g| + eps), which with the default eps turns fp noise on a gradient
        # element near 0 into a difference of up to lr; with 1e-4 it stays below lr·1e-7/1e-4 = 1e-6.
        opt = torch.optim.AdamW([p for p in ae.parameters() if p.requires_grad], lr=1e-3, eps=1e-4)
        args = _run_args(grad_accum=accum, precision="fp32")
        run = tu.Run(str(tmp_path / str(accum)), args, torch.device("cpu"))
        run.preempt = PreemptionHandler()
        try:
            train_ae.train_step(ae, None, lpips, opt, None, x, SampleRNG.for_step(0, 1, 8, 0, 1, "cpu"),
                                train_ae.STAGES[1], args, run)
        finally:
            run.preempt.restore()
        results.append(([p.grad.clone() for p in ae.parameters() if p.grad is not None],
                        [p.detach().clone() for p in ae.parameters()], run.interval["loss"][0]))
    (grads_a, params_a, loss_a), (grads_b, params_b, loss_b) = results
    assert len(grads_a) == len(grads_b) > 0 and loss_a == pytest.approx(loss_b, rel=1e-6)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(params_a, params_b):
        assert torch.allclose(a, b, rtol=0, atol=2e-6)


def test_ae_stage_refuses_to_start_without_previous_stage(tmp_path):
    with pytest.raises(tu.MissingFileError, match="stage-2 checkpoint"):
        train_ae.main(_ae_args(tmp_path, 3, "--max-steps", "1"))
    train_ae.main(_ae_args(tmp_path, 1, "--max-steps", "1"))
    with pytest.raises(tu.DataError, match="stage-1 checkpoint; stage 3 needs stage 2"):
        train_ae.main(_ae_args(tmp_path, 3, "--max-steps", "1", "--init", str(tmp_path / "stage1")))
    assert not (tmp_path / "stage3").exists()


@pytest.mark.slow
def test_ae_exact_resume_bit_identical(tmp_path):
    """Stage 2 (GAN, DiffAugment randomness, flips, 2 epochs): 4 steps straight == 2 + resume + 2."""
    common = ["--from-scratch", "--precision", "fp32"]
    train_ae.main(_ae_args(tmp_path / "a", 2, "--max-steps", "4", *common))
    train_ae.main(_ae_args(tmp_path / "b", 2, "--max-steps", "2", *common))
    train_ae.main(_ae_args(tmp_path / "b", 2, "--max-steps", "4", *common))
    a, b = _ae_latest(tmp_path / "a", 2), _ae_latest(tmp_path / "b", 2)
    assert b["progress"] == a["progress"] and b["rho"] == a["rho"]
    for part in ("stem", "decoder", "disc"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part
    assert all(torch.equal(v, b["opt"]["state"][0]["exp_avg"]) for v in [a["opt"]["state"][0]["exp_avg"]])


@pytest.mark.slow
def test_ae_truncated_latest_checkpoint_falls_back(tmp_path):
    train_ae.main(_ae_args(tmp_path, 1, "--max-steps", "4", "--ckpt-every", "2"))
    newest = tmp_path / "stage1" / "ckpt_0000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="ckpt_0000004.pt is unreadable"):
        train_ae.main(_ae_args(tmp_path, 1, "--max-steps", "6", "--ckpt-every", "2"))
    assert [m["step"] for m in _ae_metrics(tmp_path, 1)] == [1, 2, 3, 4, 5, 6]  # 3-4 re-run, logged once
    assert _ae_latest(tmp_path, 1)["progress"]["step"] == 6


@pytest.mark.slow
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
        with pytest.raises(tu.MissingFileError):
            train_ae.main(_ae_args(tmp_path / "run", 1, "--data", str(folder)))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ae_gan_stage_on_two_gloo_ranks_equals_one_process(tmp_path):
    """Stage 2 under DDP over 2 gloo ranks (torchrun) takes the steps of one process on the same global batch: the
    decoder's BatchNorms use global statistics, λ the rank-averaged gradients, and every random number (DiffAugment)
    belongs to a sample, not to a rank. Both optimizers' first gradients agree; so do the weights after 2 steps."""
    args = lambda out: _ae_args(out, 2, "--max-steps", "2", "--lr", "1e-3", "--from-scratch")
    (r0, r1), _ = _launch("ae", args(tmp_path / "ddp"), tmp_path, nproc=2, GRAD_DUMP=str(tmp_path / "grads_ddp"))
    (single,), _ = _launch("ae", args(tmp_path / "single"), tmp_path, GRAD_DUMP=str(tmp_path / "grads_single"))
    assert _ae_same(r0, r1)
    # Tolerances: fp32 noise (summation order) in the generator's gradients; the discriminator judges fakes quantised
    # to 8 bits, where that noise can flip a pixel by a level, so its gradients agree less tightly. Conv biases in
    # front of the per-sample norms have a zero gradient up to noise (~1e-8): left out. A real desync (per-rank
    # BatchNorm statistics or augmentation) is off by 10% and more.
    for optimizer, rtol in (("1", 1e-3), ("2", 5e-2)):  # the generator's, then the discriminator's
        ddp = torch.load(tmp_path / f"grads_ddp0_{optimizer}")
        assert all(torch.equal(a, b) for a, b in zip(ddp, torch.load(tmp_path / f"grads_ddp1_{optimizer}")))
        for i, (a, b) in enumerate(zip(ddp, torch.load(tmp_path / f"grads_single0_{optimizer}"))):
            if b.norm() > 1e-6:
                assert (a - b).norm() <= rtol * b.norm(), (optimizer, i, ((a - b).norm() / b.norm()).item())
    assert _ae_same(r0, single, atol=4e-3)  # AdamW: 2 steps of at most lr = 1e-3 each where |g| is fp noise
    # stage 3 continues from stage 2 under torchrun as well
    _launch("ae", _ae_args(tmp_path / "ddp", 3, "--max-steps", "1"), tmp_path, nproc=2)
    assert _ae_latest(tmp_path / "ddp", 3)["progress"]["step"] == 1


@pytest.mark.slow
def test_dit_two_gloo_ranks_with_grad_accum_equal_one_process(tiny_ae, tmp_path):
    """--grad-accum 2 on 2 gloo ranks (4 micro-batches of 2) is the step of one process on the global batch of 8."""
    args = lambda out: ["--preset", "tiny", "--ae", tiny_ae, "--out", str(out), "--num-images", "8",
                        "--global-batch", "8", "--max-steps", "2", "--log-every", "1"]
    (r0, r1), _ = _launch("dit", args(tmp_path / "ddp") + ["--grad-accum", "2"], tmp_path, nproc=2,
                          GRAD_DUMP=str(tmp_path / "grads_ddp"))
    (single,), _ = _launch("dit", args(tmp_path / "single"), tmp_path, GRAD_DUMP=str(tmp_path / "grads_single"))
    assert _ae_same(r0, r1)
    ddp, one = torch.load(tmp_path / "grads_ddp0_1"), torch.load(tmp_path / "grads_single0_1")
    for a, b in zip(ddp, one):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert _ae_same(r0, single, atol=1e-5)


@pytest.mark.slow
def test_ae_nan_step_skipped_identically_on_two_ranks(tmp_path):
    (r0, r1), _ = _launch("ae", _ae_args(tmp_path / "run", 1, "--max-steps", "3"), tmp_path, nproc=2, NAN_STEP="2")
    assert _ae_same(r0, r1)
    metrics = _ae_metrics(tmp_path / "run", 1)
    assert [m["nonfinite_steps"] for m in metrics] == [0, 1, 1]


# ---------------------------------------------------------------------------------------------------------------------
# What bad input gets: one line on stderr, the right exit status, no run folder

def _refused(capsys, main, argv):
    """Run an entry point as its script does -> (exit status, the one line on stderr)."""
    with pytest.raises(SystemExit) as info:
        tu.cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return info.value.code, err


def test_refused_flags_are_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    for argv in (["--epochs", "0"], ["--epochs", "-2"], ["--grad-accum", "0"], ["--max-steps", "0"]):
        code, err = _refused(capsys, train_ae.main, ["--stage", "1", "--preset", "tiny", "--out", str(out), *argv])
        assert code == 2 and f"{argv[0]} must be at least 1, got {argv[1]}" in err
        code, err = _refused(capsys, train_dit.main, ["--preset", "tiny", "--out", str(out), *argv])
        assert code == 2 and argv[0] in err
    code, err = _refused(capsys, train_ae.main, ["--stage", "1", "--data", str(tmp_path), "--epochs", "0"])
    assert code == 2 and "--epochs" in err  # the full preset too
    code, err = _refused(capsys, train_ae.main, ["--stage", "5"])
    assert code == 2 and "--stage" in err
    code, err = _refused(capsys, train_ae.main, ["--stage", "1", "--preset", "tiny", "--global-batch", "6",
                                                 "--grad-accum", "4", "--out", str(out)])
    assert code == 2 and "--global-batch 6 must be a multiple of ranks × --grad-accum = 1 × 4" in err
    for argv, flag in ((["--cfg-scale", "-1"], "--cfg-scale"), (["--steps", "0"], "--steps"),
                       (["--num-samples", "0"], "--num-samples"), (["--cfg-interval", "0.8", "0.2"], "--cfg-interval")):
        code, err = _refused(capsys, sample.main, ["--dit", str(tmp_path / "no_dit"), *argv])
        assert code == 2 and flag in err  # the flag, not the missing checkpoint: checked first
    assert not out.exists() and not (tmp_path / "weights").exists()


def test_tiny_preset_prints_the_defaults_it_changes(tmp_path, capsys):
    train_ae.parse_args(["--stage", "1", "--preset", "tiny", "--out", str(tmp_path)])
    line = capsys.readouterr().out
    assert "tiny preset:" in line and "--lr 0.0005" in line and "--global-batch 8" in line and "--max-steps 40" in line
    args = train_ae.parse_args(["--stage", "1", "--preset", "tiny", "--epochs", "2", "--out", str(tmp_path)])
    assert args.max_steps is None and args.epochs == 2  # --epochs is not overridden by the preset's length


def test_wrong_or_unreadable_dinov3_files_are_one_line_naming_the_flag(tmp_path, capsys):
    images = tmp_path / "images" / "c0"
    images.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    tiny = tmp_path / "tiny_vit.pth"
    torch.save(_model_tiny_vit().state_dict(), tiny)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    common = ["--stage", "1", "--data", str(tmp_path / "images"), "--global-batch", "2", "--out", str(tmp_path / "run")]
    code, err = _refused(capsys, train_ae.main, common + ["--dino-weights", str(tiny)])
    assert code == 1 and f"--dino-weights: {tiny} holds a ViT of width 128, depth 2, 2 heads, not vitl16" in err
    code, err = _refused(capsys, train_ae.main, common + ["--dino-weights", str(garbage)])
    assert code == 1 and "--dino-weights" in err and str(garbage) in err and "not a DINOv3 checkpoint" in err
    code, err = _refused(capsys, train_ae.main, common + ["--dino-weights", str(tmp_path / "absent.pth")])
    assert code == 1 and "absent.pth" in err and "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth" in err
    code, err = _refused(capsys, lambda argv: train_ae.load_vit(str(tiny), "vits16", "--disc-weights"), [])
    assert code == 1 and f"--disc-weights: {tiny} holds a ViT of width 128" in err and "not vits16" in err
    assert not (tmp_path / "run").exists()


def test_dit_on_an_autoencoder_before_stage_4_warns_in_one_line(tiny_ae, tmp_path, capsys):
    state = torch.load(tiny_ae, weights_only=True)
    state["stage"] = 3
    early = tmp_path / "stage3" / "ckpt_0000000.pt"
    early.parent.mkdir()
    torch.save(state, early)
    _gen_train(str(early), tmp_path / "dit", "--max-steps", "1")
    warnings_printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings_printed) == 1 and "stage-3 autoencoder" in warnings_printed[0]


@pytest.mark.slow
def test_scripts_turn_user_errors_into_one_line_and_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "train_ae.py", "--stage", "1", "--preset", "tiny", "--epochs", "0",
                           "--out", str(tmp_path / "run")], cwd=REPO, env=_ae_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == "train_ae.py: error: --epochs must be at least 1, got 0\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_demo_stops_within_a_step_of_sigterm(tmp_path):
    proc = subprocess.Popen([sys.executable, "demo.py", "--out", str(tmp_path / "demo")], cwd=REPO, env=_ae_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "demo" / "ae" / "stage1" / "metrics.jsonl"
    deadline = time.time() + 120
    while not metrics.exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and time.time() - t0 < 15, err[-2000:]
    assert "demo.py: stopped by SIGTERM" in err
    step = _ae_latest(tmp_path / "demo" / "ae", 1)["progress"]["step"]
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged[-1] <= step <= logged[-1] + 10  # the step in flight finished, then its checkpoint
    assert not (tmp_path / "demo" / "ae" / "stage2").exists()


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


class _BenchPoolEncoder(nn.Module):
    """Stands in for the frozen autoencoder: latents from 16× average pooling, so the DiT's activations set the
    peak (the tiny autoencoder's stem at 64 px would: 480 KB per image)."""
    radius = rho = math.sqrt(128)

    def encode_sphere(self, x):
        return rfm.project_sphere(F.avg_pool2d(x, 16).repeat(1, 43, 1, 1)[:, :128], self.radius)


def _bench_tiny_dit_memory(depth):
    import dataclasses
    spec = bench.dit_training_step("LightningDiT-XL/1", depth=depth)
    spec = dataclasses.replace(spec, models=lambda preset, models=spec.models: dict(models(preset),
                                                                                    ae=_BenchPoolEncoder()))
    return bench.measure_training_memory(spec, "tiny", [512, 1024, 1536])


def _dit_tiny_blocks(depth):
    with torch.device("meta"):
        return list(bench.dit("tiny", "LightningDiT-XL/1", depth=depth).blocks.parameters())


@pytest.mark.slow
def test_bench_checkpointing_keeps_only_each_blocks_input():
    """With checkpointing a DiT block keeps only its input (N tokens × width, fp32) per image until backward; without,
    all its activations. Fixed memory drops at most by the bf16 weight copies autograd would keep for backward."""
    shallow, deep = _bench_tiny_dit_memory(2), _bench_tiny_dit_memory(4)
    block_input = 16 * 128 * 4  # tiny preset: 4×4 latent tokens, width 128, fp32 residual stream
    per_image = {k: deep[k]["per_image_bytes"] - shallow[k]["per_image_bytes"]
                 for k in ("with_checkpointing", "without_checkpointing")}
    assert per_image["with_checkpointing"] == pytest.approx(2 * block_input)
    assert per_image["without_checkpointing"] > 4 * 2 * block_input
    blocks_bf16 = 2 * sum(p.numel() for p in _dit_tiny_blocks(4))  # bf16 weight copies autograd keeps without it
    for m in (shallow, deep):
        saved = m["without_checkpointing"]["fixed_bytes"] - m["with_checkpointing"]["fixed_bytes"]
        assert 0 <= saved <= blocks_bf16 + 1
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
    spec = bench.TRAINING_STEPS["lightningdit_xl"]

    def peak(prime):
        models = bench.meta_models(spec, "tiny")
        with torch._subclasses.fake_tensor.FakeTensorMode(), bench.LiveBytes() as live, bench.CudaAutocastFp32():
            bench.fake_storage(models.values())
            optimizers = spec.optimizers(models)
            step = spec.step(models, optimizers, spec.data("tiny", 2, "cpu"), "bf16")
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
    both runs: without a GPU to query, fake CUDA falls back to the math kernel, which a GPU does not use. Fake CUDA
    tensors need a CUDA build of torch, which requirements.txt installs (it runs without a GPU)."""
    assert torch.backends.cuda.is_built(), "the memory model needs a CUDA build of torch (pip install -r requirements.txt)"
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
def test_bench_bad_flags_fail(argv):
    with pytest.raises(tu.UsageError):
        bench.parse_args(argv)


def test_ae_quantize_bf16_fakes_land_on_the_8bit_grid():
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1
    q = train_ae.quantize(levels.bfloat16())  # the decoder's output dtype under bf16 autocast
    assert q.dtype == torch.float32 and torch.allclose(q, levels, atol=1e-6, rtol=0)


def test_readme_paper_to_code_table_names_what_exists():
    """Every row of the README's paper → code table names a file and functions or classes that exist in it."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    table = text.split("## Paper → code")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| paper")]
    assert len(rows) >= 20
    for row in rows:
        code = row.split("|")[2]
        names, module = [], None
        for token in code.split("`")[1::2]:
            if token.endswith(".py"):
                module = importlib.import_module(token[:-3])
                continue
            obj = module
            for part in token.split("."):
                obj = getattr(obj, part)  # AttributeError names what the README got wrong
            names.append(token)
        assert names, row
