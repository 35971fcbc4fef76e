import math

import pytest
import torch
import torch.nn.functional as F

from model import (AxialRoPE, ChannelDuplicatingUpsample, DCAE_CONFIGS, dcae_decoder, DCAEDecoder, DinoDiscriminator,
                   DinoSAEEncoder, dinov3_vit, DinoVisionTransformer, DiT_models, DIT_SIZES, DiTDH,
                   imagenet_normalize, LightningDiT, LiteMLA, load_dinov3, RMSNorm2d, RoPEAttention,
                   sincos_pos_embed_2d, to_image, to_tokens, write_safetensors)


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


"""Tests of losses.py and train_utils.py (CPU, fast)."""
import argparse
import io
import json
import math
import os
import random
import signal
import socket

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import losses
import train_utils
from losses import adaptive_weight, alignment_loss, build_lpips, hinge_d_loss, hinge_g_loss
from train_utils import (CheckpointManager, ImageFolderDataset, Logger, NonFiniteGuard, PreemptionHandler,
                         ResumableSampler, all_finite, center_crop_arr, check_batch, collate_skip, make_loader,
                         random_flip, restore_rng_states, rng_state, save_image_grid, seed_everything, set_rng_state)


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
    with open(manager.loaded_path, "wb") as f:
        f.write(os.urandom(100))
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
    bad.write_bytes(os.urandom(2000))
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


def test_random_flip_uses_generator():
    x = torch.randn(16, 3, 4, 5)
    a = random_flip(x, torch.Generator().manual_seed(3))
    b = random_flip(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    flipped = [torch.equal(a[i], x[i].flip(-1)) for i in range(16)]
    kept = [torch.equal(a[i], x[i]) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def _infra_train(root, ckpt_dir, total_steps, stop_at, init_seed):
    """A miniature trainer; returns the model after total_steps or, with stop_at, after checkpointing there."""
    seed_everything(init_seed)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(3 * 8 * 8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    flip_gen = torch.Generator().manual_seed(init_seed)
    dataset = ImageFolderDataset(root, 8)
    sampler = ResumableSampler(len(dataset), 0, 1, seed=11)
    loader = make_loader(dataset, 2, sampler, num_workers=0)
    manager = CheckpointManager(ckpt_dir)
    step, epoch, start = 0, 0, 0
    state = manager.load("auto")
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, epoch, start = state["step"], state["epoch"], state["start"]
        flip_gen.set_state(state["flip"])
        restore_rng_states(state["rng"], 0, 1)
    while step < total_steps:
        sampler.set_epoch(epoch, start=start)
        for x, y, _ in loader:
            x = random_flip(x, flip_gen)
            loss = F.cross_entropy(model(x + 0.1 * torch.randn_like(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step, start = step + 1, start + 2
            if step == stop_at:
                manager.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "epoch": epoch,
                              "start": start, "flip": flip_gen.get_state(),
                              "rng": train_utils.gather_rng_states(1)}, step)
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
    r, world_size, device = train_utils.setup_distributed()
    try:
        assert (r, world_size, device.type) == (rank, 2, "cpu") and train_utils.is_main() == (rank == 0)
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
        states = train_utils.gather_rng_states(2)
        assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
        train_utils.barrier()
    finally:
        train_utils.cleanup_distributed()


def test_two_process_gloo_agreement():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork rather than spawn: the children skip re-importing torch and the test module (seconds each on 2 cores)
    torch.multiprocessing.start_processes(_infra_dist_worker, args=(port,), nprocs=2, start_method="fork")
