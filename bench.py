"""Speed and memory of DINO-SAE's training steps and hot paths, as JSON. Full-size models with random weights (no
files needed), driven by the project's own training and sampling code.

    python bench.py --json bench.json           throughput of every hot path here (CUDA bf16, or CPU fp32 at batch 1)
    python bench.py --memory --json mem.json    memory model of every full-size training step (CPU, minutes)
    python bench.py --gpu-check --json gpu.json --memory-json mem.json    one GPU, under 8 minutes
    python bench.py --preset tiny ...           tiny models: the machinery in seconds

Training steps (one optimizer step each, as train_ae.py / train_dit.py run it, bf16 autocast):
  ae_stage1        stem + decoder train: student ViT-L with gradients through its frozen blocks to the stem, teacher
                   ViT-L forward without grad, 0.5·cos + L1 + LPIPS(VGG)                              (paper §4.1)
  ae_stage2        stage 1 + adaptive-weighted GAN loss through the DINO discriminator (frozen ViT-S/16 features),
                   then the discriminator's hinge-loss step
  ae_stage3_4      decoder only trains (encoder without grad), L1 + LPIPS + GAN; stage 4's latent noise (Eq. 10)
  lightningdit_xl  LightningDiT-XL/1 (677M) + EMA copy + AdamW; images encoded online by the frozen autoencoder
  ditdh_xl         DiT^DH-XL/1, likewise, with gradient clipping                                       (paper §4.2)

Throughput (default mode and --gpu-check):
  images_per_s      batch / median seconds of the timed iterations (synchronised), after untimed warm-up ones
  gflop_per_image   FLOPs of one iteration counted by torch's FlopCounterMode (matmuls, convolutions, attention,
                    forward and backward, recomputation under activation checkpointing included; elementwise ops are
                    not counted), per image
  fraction_of_peak  counted FLOP/s / the speed of a large square matmul measured in the same process, in the dtype
                    the benchmark's matmuls run in; nominal FLOPs, so convolution-heavy benchmarks can exceed 1 where
                    the backend uses fast algorithms (Winograd 3×3 convolutions on CPU)
  peak_memory_mb    CUDA: torch.cuda.max_memory_allocated; CPU: growth of the process's peak resident set size

Memory model (--memory): see measure_training_memory. --gpu-check: see gpu_check.
"""
import argparse
import copy
import ctypes
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

import train_utils as tu
from fid import inception_features, random_inception
from losses import build_lpips
import train_ae
import train_dit
from model import BatchRandom, DiT_models, DinoDiscriminator, DinoSAE, DinoSAEEncoder, DCAEDecoder, dinov3_vit, \
    imagenet_normalize
from rfm import project_sphere, shift_alpha
from sample import sample_latents
from train_ae import STAGES, TINY_CONFIG, decoder_config, tiny_dinov3
from train_dit import FAMILY_DEFAULTS, TINY_HEAD, TINY_SIZE

PRESETS = {
    "full": dict(image_size=256, stem_widths=[128, 256, 512, 1024], disc_resolution=224,
                 decoder=decoder_config("f16-in"), dit_size={}, dit_head={}, num_classes=1000, cpu_matmul_size=2048),
    "tiny": dict(image_size=64, stem_widths=TINY_CONFIG["stem_widths"], disc_resolution=64,
                 decoder=TINY_CONFIG["decoder"], dit_size=TINY_SIZE, dit_head=TINY_HEAD, num_classes=8,
                 cpu_matmul_size=512),
}
PAPER_GPUS = 8  # the per-GPU batches of the paper's runs: 256/8 for the autoencoder, 1024/8 for the DiTs
CFG_SCALE = 1.5  # any scale != 1 runs the batched [cond; uncond] forward
GIB = 2 ** 30


#################################################################################
#                              Models of a preset                               #
#################################################################################

def encoder_vit(preset):
    return dinov3_vit("vitl16") if preset == "full" else tiny_dinov3(depth=4, seed=1)


def disc_vit(preset):
    return dinov3_vit("vits16") if preset == "full" else tiny_dinov3(depth=12, seed=2)


def decoder(preset):
    return DCAEDecoder(**PRESETS[preset]["decoder"])


def autoencoder(preset):
    return DinoSAE(DinoSAEEncoder(encoder_vit(preset), PRESETS[preset]["stem_widths"]), decoder(preset))


def dit(preset, name, **overrides):
    p = PRESETS[preset]
    size = dict(p["dit_size"], **(p["dit_head"] if name.startswith("DiTDH") else {}), **overrides)
    return DiT_models[name](input_size=p["image_size"] // 16, in_channels=p["decoder"]["latent_channels"],
                            num_classes=p["num_classes"], **size)


def random_images(batch, size, device):
    return torch.rand(batch, 3, size, size, device=device) * 2 - 1


def random_latents(model, batch, device):
    """Points on the spheres of radius sqrt(C), as the encoder produces them."""
    shape = (batch, model.in_channels, model.input_size, model.input_size)
    return project_sphere(torch.randn(shape, device=device), math.sqrt(model.in_channels))


@dataclass(frozen=True)
class Autocast:
    """The benchmarks' autocast: called, the context manager of (device, precision); training steps read the
    precision itself, as the trainers take it from --precision."""
    device: torch.device
    precision: str

    def __call__(self):
        return tu.autocast(self.device, self.precision)


#################################################################################
#        Training steps: models, optimizers and one step, as the trainers run them
#################################################################################
# Each step is built in parts so that the memory model can build the models on the meta device, give them
# fake storage, prime the optimizers once and then run steps of several batch sizes on the same state.

@dataclass(frozen=True)
class TrainingStep:
    models: Callable        # preset -> {name: module}, built on the default device
    optimizers: Callable    # models -> [AdamW, ...]
    data: Callable          # (preset, batch, device) -> the step's inputs: random images (and class labels)
    step: Callable          # (models, optimizers, data, autocast) -> a function running one training step on data
    compiled: Callable      # models -> the modules the trainer's --compile compiles
    checkpointed: Callable  # models -> the block stacks whose activations checkpointing recomputes in backward
    global_batch: int       # the paper's global batch


def ae_models(preset, stage):
    """What train_ae.py holds in a stage: autoencoder, LPIPS(VGG), and from stage 2 on the DINO discriminator."""
    ae = autoencoder(preset)
    ae.encoder.stem.requires_grad_(STAGES[stage]["train_stem"])
    models = dict(ae=ae.train(), lpips=build_lpips(pretrained=False))
    if STAGES[stage]["gan"]:
        models["disc"] = DinoDiscriminator(disc_vit(preset), resolution=PRESETS[preset]["disc_resolution"])
    return models


def ae_optimizers(models, stage):
    """train_ae.py's AdamW; foreach is what torch picks for CUDA parameters, stated so a CPU run allocates alike."""
    kw = dict(lr=STAGES[stage]["lr"], betas=STAGES[stage]["betas"], weight_decay=0.0, foreach=True)
    opts = [torch.optim.AdamW([p for p in models["ae"].parameters() if p.requires_grad], **kw)]
    if "disc" in models:
        opts.append(torch.optim.AdamW(models["disc"].parameters(), **kw))
    return opts


def ae_data(preset, batch, device):
    return (random_images(batch, PRESETS[preset]["image_size"], device),)


class BenchRun(tu.Run):
    """The trainers' run bookkeeping for one step outside a training run. On fake tensors (the memory model) there
    are no values to agree on: every optimizer steps."""

    def __init__(self, device):
        args = argparse.Namespace(grad_accum=1, keep=1, max_nonfinite=1, seed=0, resume="none")
        super().__init__(os.devnull, args, device)
        self.preempt = argparse.Namespace(received=None)

    def agree(self, checks, metrics, tallies=None):
        if any(is_fake(ok) for ok in checks.values()):
            return {name: True for name in checks}
        ok = super().agree(checks, metrics, tallies)
        if not all(ok.values()):  # a skipped optimizer step would time less work
            raise RuntimeError("non-finite loss or gradient in a benchmark step")
        return ok


def step_args(precision):
    return argparse.Namespace(grad_accum=1, precision=precision, euclidean=False, tangent_loss=False)


def ae_step(models, optimizers, data, precision, stage):
    """One iteration of train_ae.py's loop: its own train_step (generator step, then from stage 2 the
    discriminator's)."""
    ae, lpips, disc = models["ae"], models["lpips"], models.get("disc")
    opt, opt_d = optimizers if disc is not None else (optimizers[0], None)
    x, = data
    run, args = BenchRun(x.device), step_args(precision)
    return lambda: train_ae.train_step(ae, disc, lpips, opt, opt_d, x, BatchRandom(len(x), x.device), STAGES[stage],
                                       args, run)


def ae_compiled(models):
    ae = models["ae"]
    return [ae.decoder, ae.encoder.stem, *ae.encoder.vit.blocks]


def ae_checkpointed(models):
    """What train_ae.py's --grad-checkpoint recomputes: the student ViT's blocks and the decoder's stages."""
    return [models["ae"].encoder.vit, models["ae"].decoder]


def dit_models(preset, name, **size):
    """What train_dit.py holds: the frozen autoencoder (encoder and decoder, fp32), the DiT and its EMA copy."""
    model = dit(preset, name, **size)
    return dict(ae=autoencoder(preset).requires_grad_(False).eval(), model=model,
                ema=copy.deepcopy(model).requires_grad_(False))


def dit_optimizers(models):
    """train_dit.py's AdamW (fused on CUDA; stated so a CPU run allocates alike)."""
    return [torch.optim.AdamW(models["model"].parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)]


def dit_data(preset, batch, device):
    p = PRESETS[preset]
    return random_images(batch, p["image_size"], device), torch.randint(p["num_classes"], (batch,), device=device)


def dit_step(models, optimizers, data, precision, family):
    """One iteration of train_dit.py's loop: its own train_step (online encoding, Eq. 14 with label dropout,
    AdamW, clipping for DiT^DH, EMA)."""
    ae, model, ema, (opt,) = models["ae"], models["model"], models["ema"], optimizers
    x, y = data
    args = argparse.Namespace(**vars(step_args(precision)), **FAMILY_DEFAULTS[family])
    run, alpha = BenchRun(x.device), shift_alpha(model.input_size ** 2, model.in_channels)
    ae.rho = ae.radius  # any measured norm: the step never decodes
    return lambda: train_dit.train_step(model, ema, opt, ae, x, y, BatchRandom(len(x), x.device), 2e-4, alpha, args,
                                        run)


def ae_training_step(stage):
    return TrainingStep(models=lambda preset: ae_models(preset, stage),
                        optimizers=lambda models: ae_optimizers(models, stage), data=ae_data,
                        step=lambda *a: ae_step(*a, stage=stage), compiled=ae_compiled, checkpointed=ae_checkpointed,
                        global_batch=256)


def dit_training_step(name, **size):
    return TrainingStep(models=lambda preset: dit_models(preset, name, **size), optimizers=dit_optimizers, data=dit_data,
                        step=lambda *a: dit_step(*a, family=name.split("-")[0]),
                        compiled=lambda models: [models["model"]], checkpointed=lambda models: [models["model"]],
                        global_batch=1024)


TRAINING_STEPS = {
    "ae_stage1": ae_training_step(1),
    "ae_stage2": ae_training_step(2),
    "ae_stage3_4": ae_training_step(4),  # stage 3 plus Eq. 10's latent noise: the larger of the two
    "lightningdit_xl": dit_training_step("LightningDiT-XL/1"),
    "ditdh_xl": dit_training_step("DiTDH-XL/1"),
}


def set_checkpointing(spec, models, enabled):
    for stack in spec.checkpointed(models):
        stack.grad_checkpointing = enabled


def build_training_step(spec, preset, batch, device, autocast, checkpointing=False):
    with torch.device(device):
        models = spec.models(preset)
    set_checkpointing(spec, models, checkpointing)
    step = spec.step(models, spec.optimizers(models), spec.data(preset, batch, device), autocast.precision)
    return step, spec.compiled(models)


#################################################################################
#             Throughput benchmarks: each returns (step, hot modules)           #
#################################################################################

def vit_l_forward(preset, batch, device, autocast):
    """The frozen DINOv3 ViT-L/16 on 256² images (the teacher; the student shares its blocks)."""
    vit = encoder_vit(preset).to(device)
    x = imagenet_normalize(random_images(batch, PRESETS[preset]["image_size"], device))

    def step():
        with torch.no_grad(), autocast():
            vit(x)
    return step, list(vit.blocks)


def decoder_fwd_bwd(preset, batch, device, autocast):
    """The DC-AE f16-in decoder (688 GFLOP forward per 256² image), forward and backward, train mode."""
    dec = decoder(preset).to(device)
    z = project_sphere(torch.randn(batch, dec.latent_channels, PRESETS[preset]["image_size"] // 16,
                                   PRESETS[preset]["image_size"] // 16, device=device), math.sqrt(dec.latent_channels))

    def step():
        dec.zero_grad(set_to_none=True)
        with autocast():
            x_hat = dec(z)
        x_hat.float().square().mean().backward()
    return step, [dec]


def sampling_step(preset, batch, device, autocast):
    """One Euler-projection step (Alg. 2) of LightningDiT-XL/1 with classifier-free guidance, through sample.py."""
    model = dit(preset, "LightningDiT-XL/1").to(device).eval().requires_grad_(False)
    noise = random_latents(model, batch, device)
    labels = torch.randint(model.num_classes, (batch,), device=device)
    radius, alpha = math.sqrt(model.in_channels), shift_alpha(model.input_size ** 2, model.in_channels)

    def step():
        with torch.no_grad(), autocast():
            sample_latents(model, labels, noise, radius, alpha, "euler-proj", steps=1, cfg_scale=CFG_SCALE)
    return step, [model]


def inception_step(preset, batch, device, autocast):
    """FID Inception features (pool3, logits, spatial) of uint8 256² samples with ADM preprocessing, exact fp32."""
    net = random_inception(0).to(device)
    size = PRESETS[preset]["image_size"]
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)

    def step():
        inception_features(net, images, batch_size=batch, progress=False)
    return step, [net]


def training_benchmark(name):
    return lambda preset, batch, device, autocast: build_training_step(TRAINING_STEPS[name], preset, batch, device,
                                                                       autocast)


BENCHMARKS = {
    "vit_l_forward": vit_l_forward,
    "decoder_fwd_bwd": decoder_fwd_bwd,
    **{name: training_benchmark(name) for name in TRAINING_STEPS},
    "sampling_step": sampling_step,
    "inception_features": inception_step,
}
CUDA_BATCH = dict(vit_l_forward=64, decoder_fwd_bwd=32, sampling_step=32, inception_features=50,
                  **{name: spec.global_batch // PAPER_GPUS for name, spec in TRAINING_STEPS.items()})
EXACT_FP32 = {"inception_features"}  # fid.py turns autocast and TF32 off: its matmuls run in fp32


#################################################################################
#                        Timing, FLOPs, peak and memory                         #
#################################################################################

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def matmul_peak_gflops(device, dtype, n, repeats=5, inner=10):
    """Best speed of an n×n @ n×n matmul: the peak the benchmarks are measured against."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))

    def matmuls():
        for _ in range(inner):
            a @ b
    matmuls()
    best = min(timed(matmuls, device) for _ in range(repeats))
    return 2 * n ** 3 * inner / best / 1e9


CLEAR_REFS = "/proc/self/clear_refs"


class PeakMemory:
    """Peak memory of the block: CUDA allocator peak, or on CPU the growth of the peak resident set size."""

    def __init__(self, device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        else:
            self.kind = "cpu_peak_rss_growth" if os.path.exists(CLEAR_REFS) else "unavailable (needs Linux procfs)"
        self.mb = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss_growth":
            libc = ctypes.CDLL(None)
            if hasattr(libc, "malloc_trim"):  # glibc: free heap memory kept resident would be reused unseen
                libc.malloc_trim(0)
            with open(CLEAR_REFS, "w") as f:
                f.write("5")  # resets VmHWM to the current RSS; ru_maxrss would keep the peaks of earlier benchmarks
            self.start = proc_status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        elif self.kind == "cpu_peak_rss_growth":
            self.mb = (proc_status_kb("VmHWM") - self.start) / 1024


def proc_status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding,
                        groups, output_mask, out_shape=None, **kwargs):
    """Each gradient of a convolution (input, weight) costs what its forward costs. torch's own formula counts the
    weight gradient of a grouped convolution `groups` times over (x4096 for the decoder's depthwise convolutions,
    +60% on its whole backward; pytorch/pytorch#183405)."""
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def cpu_attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
    """The CPU flash-attention kernel costs what the CUDA ones cost; torch's counter knows only the CUDA ones."""
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def cpu_attention_backward_flops(grad_out_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, q_shape, k_shape, v_shape)


FLOP_FORMULAS = {
    torch.ops.aten.convolution_backward: conv_backward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops,
}


def count_flops(fn):
    """FLOPs of the matmuls, convolutions and attention fn runs (forward and backward); works on the meta device."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as c:
        fn()
    return c.get_total_flops()


def measure_speed(step, hot_modules, batch, device, iters, warmup, compile=False):
    """Count the FLOPs of one eager iteration (also the first warm-up), optionally compile, warm up, time."""
    flops = count_flops(step)
    if compile:
        for module in hot_modules:
            module.compile()
    for _ in range(warmup):
        step()
    seconds = statistics.median(timed(step, device) for _ in range(iters))
    return dict(batch=batch, images_per_s=batch / seconds, seconds_per_iter=seconds, gflop_per_image=flops / batch / 1e9,
                gflops_achieved=flops / seconds / 1e9, iters=iters)


def run_benchmark(build, batch, device, autocast, iters, warmup, compile=False):
    """Build and measure one benchmark; the peak memory includes its weights, gradients and optimizer states."""
    with PeakMemory(device) as memory:
        step, hot_modules = build(batch=batch, device=device, autocast=autocast)
        result = measure_speed(step, hot_modules, batch, device, iters, warmup, compile)
    return dict(result, peak_memory_mb=memory.mb, memory_kind=memory.kind)


#################################################################################
#        Memory model: live storage bytes of a training step on fake tensors    #
#################################################################################
# Activation sizes do not depend on the device, so the full-size steps run on the CPU under FakeTensorMode: tensors
# with shapes, dtypes and storages but no data, so a 677M-parameter DiT with batch 64 costs no memory and only the
# Python time of its ops. Two things do depend on the device and are made CUDA's here: the optimizers use CUDA's
# implementations (foreach / fused), and the ops CUDA's autocast runs in fp32 but CPU's autocast does not are
# upcast as on CUDA (CudaAutocastFp32).

class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages and their peak. A storage is counted when an op first returns a tensor on it
    (views share their base's storage: counted once) and uncounted when it is freed (weakref.finalize on the storage,
    which Python keeps alive exactly as long as the storage itself). Storages made before the mode was entered are
    not seen.

    On fake tensors, values read back into Python (.item(): the trainers' finiteness check, AdamW's bias correction)
    have no data; they read as 1, so checks pass and no shape depends on them."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes = {}  # id(storage) -> counted bytes, for live storages only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and is_fake(args[0]):
            return 1
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.count(t.untyped_storage())
        return out

    def count(self, storage):
        key, size = id(storage), storage.nbytes()
        if key not in self.sizes:
            weakref.finalize(storage, self.free, key)
        self.live += size - self.sizes.get(key, 0)  # an existing storage may have been resized in place
        self.sizes[key] = size
        self.peak = max(self.peak, self.live)

    def free(self, key):
        self.live -= self.sizes.pop(key)

    def reset_peak(self):
        self.peak = self.live


def is_fake(t):
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


# CUDA's autocast runs these in fp32 (its fp32 op list); CPU's autocast leaves them in their input dtype. Checked op by
# op against a fake-CUDA forward of every model (test_bench_cuda_autocast_policy_matches_fake_cuda).
CUDA_FP32_FUNCTIONS = {F.group_norm, F.layer_norm, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__}


class CudaAutocastFp32(TorchFunctionMode):
    """Under CPU bf16 autocast, upcast the inputs of CUDA_FP32_FUNCTIONS to fp32, as CUDA's autocast does (stem
    GroupNorms and LPIPS's feature normalisation keep fp32 activations on the GPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CUDA_FP32_FUNCTIONS and torch.is_autocast_enabled("cpu"):
            args, kwargs = tree_map(upcast_half, (args, kwargs))
        return func(*args, **kwargs)


def upcast_half(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x


def fake_storage(modules):
    """Give every parameter and buffer of `modules` (built on the meta device) a fake CPU tensor of the same shape,
    dtype and requires_grad; run under FakeTensorMode. Shared tensors stay shared."""
    made = {}

    def fake(t):
        if id(t) not in made:
            new = torch.empty(t.shape, dtype=t.dtype)
            made[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
        return made[id(t)]
    for module in all_submodules(modules):
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is not None:
                    tensors[name] = fake(t)


def all_submodules(modules):
    """Every module reachable from `modules`, including modules held as plain attributes (the discriminator's
    frozen feature network stays out of its parameters on purpose)."""
    stack, seen = list(modules), set()
    while stack:
        m = stack.pop()
        if id(m) not in seen:
            seen.add(id(m))
            yield m
            stack += [*m._modules.values(), *(v for v in vars(m).values() if isinstance(v, nn.Module))]


def prime_optimizers(optimizers):
    """Leave the state a steady-state step starts from: AdamW's moments allocated (they appear on the first step) and
    the previous step's gradients alive (the trainers free them only after the next forward, zero_grad(set_to_none)
    comes between forward and backward)."""
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()


def storage_bytes(tensors):
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def counted_fixed_bytes(models, optimizers):
    """Exact bytes of what lives across steps: weights (trainable ones apart), their gradients, AdamW's states, the
    EMA copy, and the frozen networks' weights and buffers."""
    trainable = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    ema = [t for m in all_submodules([models["ema"]]) for t in (*m._parameters.values(), *m._buffers.values())] \
        if "ema" in models else []
    everything = [t for m in all_submodules([v for k, v in models.items() if k != "ema"])
                  for t in (*m._parameters.values(), *m._buffers.values())]
    trainable_ids = {id(p) for p in trainable}
    return dict(trainable_weights=storage_bytes(trainable),
                gradients=storage_bytes([p.grad for p in trainable]),
                adamw_states=storage_bytes([s for opt in optimizers for st in opt.state.values() for s in st.values()
                                            if isinstance(s, torch.Tensor)]),
                ema=storage_bytes(ema),
                frozen_weights_and_buffers=storage_bytes([t for t in everything if id(t) not in trainable_ids]))


def fit_line(batches, peaks):
    """Least squares peak = fixed + per_image · batch -> (fixed, per_image, largest absolute residual)."""
    A = np.stack([np.ones(len(batches)), np.asarray(batches, dtype=float)], axis=1)
    (fixed, per_image), *_ = np.linalg.lstsq(A, np.asarray(peaks, dtype=float), rcond=None)
    residual = max(abs(fixed + per_image * b - p) for b, p in zip(batches, peaks))
    return float(fixed), float(per_image), float(residual)


def meta_models(spec, preset):
    """The step's models on the meta device: shapes and dtypes only, built without memory or initialisation."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LPIPS copies its head weights into meta tensors: a no-op, as meant
        return spec.models(preset)


def measure_training_memory(spec, preset, batches, log=lambda *_: None):
    """Peak live bytes of one steady-state step at each batch, without and with activation checkpointing, on fake
    tensors under CPU bf16 autocast with CUDA's fp32 list; fixed + per-image fits of the peaks."""
    models = meta_models(spec, preset)
    result = {}
    with torch._subclasses.fake_tensor.FakeTensorMode(), LiveBytes() as live, CudaAutocastFp32():
        fake_storage(models.values())
        optimizers = spec.optimizers(models)
        prime_optimizers(optimizers)
        result["fixed_counted_bytes"] = counted_fixed_bytes(models, optimizers)
        result["checkpointed"] = [type(stack).__name__ for stack in spec.checkpointed(models)]
        for checkpointing in (False, True):
            set_checkpointing(spec, models, checkpointing)
            peaks = []
            for batch in batches:
                step = spec.step(models, optimizers, spec.data(preset, batch, "cpu"), "bf16")
                live.reset_peak()
                t0 = time.perf_counter()
                step()
                peaks.append(live.peak)
                log(f"  checkpointing={checkpointing} batch {batch}: peak {live.peak / GIB:.3f} GiB "
                    f"({time.perf_counter() - t0:.0f} s)")
                del step
            fixed, per_image, residual = fit_line(batches, peaks)
            result["with_checkpointing" if checkpointing else "without_checkpointing"] = dict(
                peak_bytes=dict(zip(map(str, batches), peaks)), fixed_bytes=fixed, per_image_bytes=per_image,
                fit_max_residual_bytes=residual)
    return result


# What the allocator peak leaves out, taken from the device's memory before a batch size is chosen.
DEFAULT_RESERVE = dict(
    context_and_workspaces_gib=1.0,  # CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces, kernels of torch.compile
    fragmentation=0.10,              # caching allocator: reserved minus allocated, as a fraction of the device
    nccl_gib=1.0,                    # DDP only: NCCL communicators' buffers
)


def max_micro_batch(fixed, per_image, capacity_gib, reserve, ddp_bucket_bytes=0):
    """Largest batch whose predicted peak fits the device after the reserve; DDP adds its gradient buckets (one
    copy of the trainable gradients, gradient_as_bucket_view off as in the trainers) and NCCL's buffers."""
    usable = capacity_gib * (1 - reserve["fragmentation"]) - reserve["context_and_workspaces_gib"]
    if ddp_bucket_bytes:
        usable -= reserve["nccl_gib"] + ddp_bucket_bytes / GIB
    return max(0, math.floor((usable * GIB - fixed) / per_image))


def memory_model(names, preset, batches, capacities, reserve, log):
    steps = {}
    for name in names:
        spec, t0 = TRAINING_STEPS[name], time.time()
        log(f"{name}:")
        measured = measure_training_memory(spec, preset, batches, log)
        counted = measured["fixed_counted_bytes"]
        entry = dict(global_batch=spec.global_batch, paper_batch_per_gpu=spec.global_batch // PAPER_GPUS,
                     fixed_counted_gib={k: v / GIB for k, v in counted.items()},
                     fixed_counted_total_gib=sum(counted.values()) / GIB,
                     ddp_buckets_gib=counted["gradients"] / GIB, checkpointed=measured["checkpointed"],
                     measure_s=time.time() - t0)
        for mode in ("without_checkpointing", "with_checkpointing"):
            m = measured[mode]
            fits = {kind: {str(c): max_micro_batch(m["fixed_bytes"], m["per_image_bytes"], c, reserve, ddp)
                           for c in capacities} for kind, ddp in (("one_gpu", 0), ("ddp", counted["gradients"]))}
            entry[mode] = dict(peak_gib={b: p / GIB for b, p in m["peak_bytes"].items()},
                               fixed_gib=m["fixed_bytes"] / GIB, activation_gib_per_image=m["per_image_bytes"] / GIB,
                               fit_max_residual_gib=m["fit_max_residual_bytes"] / GIB, max_micro_batch=fits)
        steps[name] = entry
    return steps


MIN_EFFICIENT_MICRO_BATCH = 8  # below this, 256-token matmuls no longer fill a large GPU: prefer checkpointing then


def plan(entry, ranks, capacity_gib):
    """Micro-batch, accumulation and checkpointing for the paper's global batch on `ranks` GPUs of a capacity: no
    checkpointing (it recomputes forwards) when the micro-batch stays >= MIN_EFFICIENT_MICRO_BATCH (or the whole
    per-GPU batch), else checkpointing with the fewest accumulation steps."""
    per_rank, kind = entry["global_batch"] // ranks, "ddp" if ranks > 1 else "one_gpu"
    options = {}
    for checkpointing, mode in ((False, "without_checkpointing"), (True, "with_checkpointing")):
        largest = entry[mode]["max_micro_batch"][kind][str(capacity_gib)]
        accum = next((n for n in range(1, per_rank + 1) if per_rank % n == 0 and per_rank // n <= largest), None)
        if accum is not None:
            options[checkpointing] = dict(micro_batch=per_rank // accum, grad_accum=accum, grad_checkpoint=checkpointing)
    plain = options.get(False)
    if plain and plain["micro_batch"] >= min(MIN_EFFICIENT_MICRO_BATCH, per_rank):
        return plain
    return options.get(True) or plain


def command_line(name, entry, ranks, choice):
    if choice is None:
        return f"{name}: does not fit"
    launcher = f"torchrun --nproc_per_node={ranks}" if ranks > 1 else "python"
    script = {"ae_stage1": "train_ae.py --stage 1", "ae_stage2": "train_ae.py --stage 2",
              "ae_stage3_4": "train_ae.py --stage 3", "lightningdit_xl": "train_dit.py --model LightningDiT-XL/1",
              "ditdh_xl": "train_dit.py --model DiTDH-XL/1"}[name]
    flags = f"--global-batch {entry['global_batch']} --grad-accum {choice['grad_accum']}"
    flags += " --grad-checkpoint" * choice["grad_checkpoint"]
    note = "; the same for --stage 4" if name == "ae_stage3_4" else ""
    return f"{launcher} {script} --data /data/imagenet/train {flags}  # micro-batch {choice['micro_batch']}{note}"


def markdown_table(steps, capacities):
    head = ["step", "fixed GiB", "act GiB/img", "fixed GiB (ckpt)", "act GiB/img (ckpt)", "fit residual GiB"]
    head += [f"max batch {c} GB" for c in capacities] + [f"max batch {c} GB (ckpt)" for c in capacities]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in steps.items():
        off, on = e["without_checkpointing"], e["with_checkpointing"]
        cells = [name, f"{off['fixed_gib']:.2f}", f"{off['activation_gib_per_image']:.3f}", f"{on['fixed_gib']:.2f}",
                 f"{on['activation_gib_per_image']:.3f}",
                 f"{max(off['fit_max_residual_gib'], on['fit_max_residual_gib']):.1e}"]
        cells += [str(m["max_micro_batch"]["one_gpu"][str(c)]) for m in (off, on) for c in capacities]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


MEMORY_METHOD = (
    "Full-size models built on the meta device, given fake CPU storage (FakeTensorMode); one training step of the "
    "trainers' code per batch size under CPU bf16 autocast with CUDA autocast's fp32 ops upcast as on CUDA and CUDA's "
    "AdamW implementations (foreach for the autoencoder, fused for the DiTs). A dispatch mode counts the bytes of every "
    "tensor storage from creation to free; peak = the most bytes live at once during the step. The step is a steady-"
    "state one: AdamW states allocated and the previous step's gradients alive when it starts. fixed and per-image "
    "come from a least-squares line through the peaks; fixed includes the batch-independent transients (autocast's "
    "bf16 weight copies, optimizer temporaries) on top of fixed_counted (weights, gradients, AdamW states, EMA, frozen "
    "networks, counted exactly from the tensors). fixed can be lower with checkpointing: without it every student ViT "
    "block keeps the bf16 copies of its frozen weights for the backward. Two CPU-only copies remain, an over-count of "
    "about 1 MB per image: CPU autocast casts cat's bf16 inputs to fp32 in separate ops (freed when cat returns), and "
    "the decoder's linear-attention matmul copies one operand where CUDA's takes a view.")
NOT_COUNTED = [
    "CUDA context and kernel images (~0.5 GiB per process)",
    "cuBLAS/cuDNN/flash-attention workspaces allocated inside kernels",
    "caching-allocator rounding and fragmentation (reserved minus allocated)",
    "NCCL buffers and DDP gradient buckets (ddp_buckets_gib gives the buckets: one copy of the trainable gradients)",
    "data-loader pinned host memory (not GPU memory)",
]


def run_memory(args):
    t0 = time.time()
    names = args.only_steps or list(TRAINING_STEPS)
    steps = memory_model(names, args.preset, args.mem_batches, args.capacities, DEFAULT_RESERVE, log)
    report = dict(method=MEMORY_METHOD, not_counted=NOT_COUNTED, reserve_assumed=DEFAULT_RESERVE,
                  torch=torch.__version__, preset=args.preset, batches=args.mem_batches, capacities_gib=args.capacities,
                  steps=steps)
    report["plans"] = {f"{ranks}x{cap}GB": {name: plan(e, ranks, cap) for name, e in steps.items()}
                       for ranks, cap in ((PAPER_GPUS, 80), (1, 80)) if cap in args.capacities}
    report["commands"] = {key: [command_line(name, steps[name], int(key.split("x")[0]), choice)
                                for name, choice in choices.items()] for key, choices in report["plans"].items()}
    report["wall_s"] = time.time() - t0
    print(markdown_table(steps, args.capacities))
    for key, lines in report["commands"].items():
        print(f"\n{key}:\n" + "\n".join(lines))
    return report


#################################################################################
#              GPU check: every training step on one GPU, in a budget           #
#################################################################################
# Each (step, eager or compiled) runs in its own process, so an out-of-memory state, a compilation cache or a hang
# cannot leak into the next one and the parent can stop it at the budget. Eager runs of all steps come first.

def largest_fitting(try_config, batch, checkpointing=False):
    """try_config(batch, checkpointing) at the paper's batch, with checkpointing when that runs out of memory, then
    halving the batch -> (result or None, attempts)."""
    attempts = []
    while batch >= 1:
        for ckpt in (False, True) if not checkpointing else (True,):
            try:
                result = try_config(batch, ckpt)
            except torch.OutOfMemoryError:
                result = None
            attempts.append(dict(batch=batch, checkpointing=ckpt, outcome="out of memory" if result is None else "ok"))
            if result is not None:
                return dict(result, checkpointing=ckpt), attempts
            free_memory()  # out of the except clause: its traceback no longer holds the failed step's tensors
        batch //= 2
    return None, attempts


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_item(name, preset, device, dtype, batch, checkpointing, compile, iters, warmup):
    """One training step in this process: the largest batch from `batch` down that fits, its speed, FLOPs and peak."""
    spec = TRAINING_STEPS[name]
    n = 8192 if device.type == "cuda" else PRESETS[preset]["cpu_matmul_size"]
    peak = matmul_peak_gflops(device, torch.bfloat16 if dtype == "bf16" else torch.float32, n,
                              inner=10 if device.type == "cuda" else 1)
    with torch.device(device):
        models = spec.models(preset)

    def try_config(b, ckpt):
        for module in models.values():
            module.zero_grad(set_to_none=True)
        set_checkpointing(spec, models, ckpt)
        with PeakMemory(device) as memory:
            step = spec.step(models, spec.optimizers(models), spec.data(preset, b, device), dtype)
            result = measure_speed(step, spec.compiled(models), b, device, iters, warmup, compile)
        return dict(result, peak_memory_gib=memory.mb and memory.mb / 1024, memory_kind=memory.kind)
    result, attempts = largest_fitting(try_config, batch, checkpointing)
    if result is not None:
        result["fraction_of_peak"] = result["gflops_achieved"] / peak
    return dict(result or {"status": "no batch fits"}, matmul_peak_gflops=peak, compile=compile, attempts=attempts)


def run_item_subprocess(args, name, compile, batch, checkpointing, timeout):
    """bench.py --item in a fresh process -> its JSON, or why there is none."""
    cmd = [sys.executable, os.path.abspath(__file__), "--gpu-check", "--item", name, "--preset", args.preset,
           "--device", args.device, "--batch", str(batch), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    cmd += ["--dtype", args.dtype] if args.dtype else []
    cmd += ["--compile"] * compile + ["--checkpointing"] * checkpointing
    # its own process group: stopping it at the budget also stops torch.compile's worker processes
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": f"stopped at the budget after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"status": f"failed (exit {proc.returncode})", "stderr_tail": err[-2000:]}
    return json.loads(out)


MIN_ITEM_S = 20  # an item started with less left could not even import torch and build its models


def gpu_check(args, run_item=run_item_subprocess, clock=time.monotonic):
    """Every training step at the paper's per-GPU batch (or the largest that fits), eager then compiled, until the
    budget is spent; a compiled run starts from the batch and checkpointing its eager run found."""
    deadline, results = clock() + args.budget_s, {}
    for compile in args.variants:
        for name in args.only_steps or TRAINING_STEPS:
            key = f"{name}/{'compiled' if compile else 'eager'}"
            remaining = deadline - clock()
            if remaining < MIN_ITEM_S:
                results[key] = {"status": "not started: budget spent"}
                continue
            eager = results.get(f"{name}/eager", {})
            batch = eager.get("batch") or args.batch or TRAINING_STEPS[name].global_batch // PAPER_GPUS
            t0 = clock()
            results[key] = dict(run_item(args, name, compile, batch, eager.get("checkpointing", False), remaining),
                                wall_s=clock() - t0)
            log(f"{key}: {summary(results[key])}")
    return results


def summary(r):
    if "images_per_s" not in r:
        return r.get("status", "?")
    return (f"batch {r['batch']}{' (checkpointing)' * r['checkpointing']}: {r['images_per_s']:.3g} img/s, "
            f"{100 * r['fraction_of_peak']:.0f}% of the matmul peak, {r['peak_memory_gib']:.1f} GiB")


def add_predictions(results, memory_report):
    """The memory model's peak for the batch and checkpointing each run used, beside the measured peak."""
    for key, r in results.items():
        entry = memory_report["steps"].get(key.split("/")[0])
        if entry and "batch" in r:
            m = entry["with_checkpointing" if r["checkpointing"] else "without_checkpointing"]
            r["predicted_peak_gib"] = m["fixed_gib"] + m["activation_gib_per_image"] * r["batch"]


def run_gpu_check(args):
    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.iters = args.iters or (5 if device.type == "cuda" else 1)
    args.warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
    if args.item:
        return check_item(args.item, args.preset, device, dtype, args.batch, args.checkpointing, args.compile,
                          args.iters, args.warmup)
    t0 = time.time()
    results = gpu_check(args)
    if args.memory_json:
        with open(args.memory_json) as f:
            add_predictions(results, json.load(f))
    return {"device": device_name(device), "torch": torch.__version__, "preset": args.preset, "dtype": dtype,
            "budget_s": args.budget_s, "steps": results, "wall_s": time.time() - t0}


#################################################################################
#                                    Main                                       #
#################################################################################

def run(args):
    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    names = args.only or list(BENCHMARKS)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else int(args.compile))
    iters = args.iters or (10 if device.type == "cuda" else 1)
    n = 8192 if device.type == "cuda" else PRESETS[args.preset]["cpu_matmul_size"]
    peaks = {name: matmul_peak_gflops(device, dt, n, inner=10 if device.type == "cuda" else 1)
             for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    log(f"matmul peak on {device}: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    autocast = Autocast(device, dtype)
    results = {}
    for name in names:
        torch.manual_seed(args.seed)
        batch = args.batch or (CUDA_BATCH[name] if device.type == "cuda" else 1)
        build = lambda **kw: BENCHMARKS[name](args.preset, **kw)
        result = run_benchmark(build, batch, device, autocast, iters, warmup, args.compile)
        compute_dtype = "fp32" if name in EXACT_FP32 else dtype
        result.update(compute_dtype=compute_dtype, fraction_of_peak=result["gflops_achieved"] / peaks[compute_dtype])
        results[name] = result
        log(f"{name}: {result['images_per_s']:.3g} img/s, {result['gflops_achieved']:.0f} GFLOP/s "
            f"({100 * result['fraction_of_peak']:.0f}% of {compute_dtype} peak), {result['peak_memory_mb']} MB")
    return {"device": device_name(device), "torch": torch.__version__, "preset": args.preset, "dtype": dtype,
            "compile": args.compile, "matmul_peak_gflops": peaks[dtype], "matmul_peak_gflops_by_dtype": peaks,
            "benchmarks": results}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def log(message):
    print(message, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = tu.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--memory", action="store_true",
                      help="memory model of the training steps (fake tensors on the CPU; prints a Markdown table)")
    mode.add_argument("--gpu-check", action="store_true",
                      help="every training step on one GPU within --budget-s: img/s, fraction of the matmul peak, "
                           "peak memory, at the paper's per-GPU batch or the largest that fits, eager and compiled")
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), help="throughput: this benchmark (repeatable)")
    p.add_argument("--only-step", dest="only_steps", action="append", choices=list(TRAINING_STEPS),
                   help="--memory / --gpu-check: this training step only (repeatable)")
    p.add_argument("--preset", choices=list(PRESETS), default="full", help="tiny: small models, for tests")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype of the models (default bf16 on CUDA, fp32 on CPU as the tiny presets train)")
    p.add_argument("--batch", type=tu.positive_int, default=None,
                   help=f"images per step (throughput default 1 on CPU, {CUDA_BATCH} on CUDA; --gpu-check: the batch "
                        "to start from, default the paper's per-GPU batch)")
    p.add_argument("--iters", type=tu.positive_int, default=None, help="timed iterations (default 10 CUDA (5 in "
                                                                   "--gpu-check), 1 CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations after the FLOP-counting one (default 3 CUDA (2 in --gpu-check), 0 CPU, "
                        "1 with --compile)")
    p.add_argument("--compile", action="store_true", help="torch.compile the hot modules (ViT blocks, decoder, DiT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-batches", type=tu.positive_int, nargs="+", default=[1, 2, 4],
                   help="--memory: batch sizes the line is fitted through")
    p.add_argument("--capacities", type=tu.positive_int, nargs="+", default=[24, 40, 80, 141],
                   help="--memory: GPU memories (GB, taken as the GiB the driver reports) of the max-batch columns")
    p.add_argument("--budget-s", type=float, default=450, help="--gpu-check: wall-clock budget of the whole check")
    p.add_argument("--variants", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"],
                   help="--gpu-check: eager and/or torch.compile runs")
    p.add_argument("--memory-json", help="--gpu-check: the --memory JSON; its predicted peaks go beside the measured")
    p.add_argument("--item", choices=list(TRAINING_STEPS), help=argparse.SUPPRESS)  # one --gpu-check process
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the JSON to this file")
    args = p.parse_args(argv)
    args.variants = [v == "compiled" for v in args.variants]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.warmup is not None and args.warmup < (1 if args.compile else 0):
        p.error("--warmup must be >= 0, and >= 1 with --compile (compilation happens in the first warm-up iteration)")
    if args.memory and len(set(args.mem_batches)) < 2:
        p.error("--mem-batches needs at least two different batch sizes to fit a line")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    if args.memory:
        report = run_memory(args)
    elif args.gpu_check:
        report = run_gpu_check(args)
    else:
        report = run(args)
        report["wall_s"] = time.time() - t0
    text = json.dumps(report, indent=2)
    if not args.memory:
        print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    tu.cli(main)
