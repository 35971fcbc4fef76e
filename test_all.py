import math

import pytest
import torch
import torch.nn.functional as F

from model import (DCAE_CONFIGS, ChannelDuplicatingUpsample, DCAEDecoder, DinoDiscriminator, DinoSAEEncoder,
                   DinoVisionTransformer, LiteMLA, RMSNorm2d, dcae_decoder, dinov3_vit, imagenet_normalize,
                   load_dinov3, write_safetensors)


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
    write_safetensors(_model_to_hf(state), tmp_path / "model.safetensors")
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


def test_lite_mla_linear_equals_quadratic_and_formula():
    torch.manual_seed(0)
    mla = LiteMLA(64, "trms2d")
    qkv = torch.randn(2, 192, 3, 5)
    lin, quad = mla.linear_attention(qkv), mla.quadratic_attention(qkv)
    assert torch.allclose(lin, quad, atol=1e-5, rtol=1e-4)
    q, k, v = qkv.reshape(2, 2, 96, 15).split(32, dim=2)  # head 0 of sample 0 by the SPEC formula
    q, k = q.relu()[0, 0], k.relu()[0, 0]
    scores = k.T @ q
    expect = v[0, 0] @ scores / (scores.sum(0) + 1e-15)
    assert torch.allclose(lin[0, 0], expect, atol=1e-5, rtol=1e-4)


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
