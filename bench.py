"""Throughput of the hot paths, as JSON: the frozen DINOv3 ViT-L, the DC-AE decoder, a full stage-2 autoencoder step,
LightningDiT-XL/1 and DiT^DH-XL/1 training steps, one guided sampling step and the FID Inception (SPEC §1.1, §2, §3).

Full-size models with random weights (no files needed), driven by the project's own training and sampling code, so
the numbers are those of what users run. For each benchmark:
  images_per_s      batch / median seconds of the timed iterations (synchronised), after untimed warm-up ones
  gflop_per_image   FLOPs of one iteration counted by torch's FlopCounterMode (matmuls, convolutions, attention,
                    forward and backward; elementwise ops are not counted), per image
  gflops_achieved   counted FLOPs / median seconds
  fraction_of_peak  gflops_achieved / the speed of a large square matmul measured in this run, in the dtype the
                    benchmark's matmuls run in (bf16 under autocast; the FID Inception always runs in exact fp32);
                    nominal FLOPs, so convolution-heavy benchmarks can exceed 1 where the backend uses fast
                    algorithms (Winograd 3×3 convolutions on CPU: the decoder reached 1.8 here)
  peak_memory_mb    CUDA: torch.cuda.max_memory_allocated; CPU: growth of the process's peak resident set size
                    (VmHWM, reset through /proc/self/clear_refs); both include weights, gradients and optimizer states

    python bench.py                                  # CUDA when present (bf16, realistic batches), else CPU (fp32, batch 1)
    python bench.py --only lightningdit_xl_train_step --batch 64 --compile --json bench.json
    python bench.py --preset tiny                    # tiny models: the machinery in seconds
"""
import argparse
import copy
import ctypes
import gc
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

import train_utils as tu
from fid import inception_features, random_inception
from losses import build_lpips
from model import DiT_models, DinoDiscriminator, DinoSAE, DinoSAEEncoder, DCAEDecoder, dinov3_vit, imagenet_normalize
from rfm import project_sphere, rfm_loss, shift_alpha
from sample import sample_latents
from train_ae import STAGES, TINY_CONFIG, decoder_config, discriminator_loss, generator_loss, tiny_dinov3
from train_dit import FAMILY_DEFAULTS, TINY_HEAD, TINY_SIZE, drop_labels, update_ema

PRESETS = {
    "full": dict(image_size=256, stem_widths=[128, 256, 512, 1024], disc_resolution=224,
                 decoder=decoder_config("f16-in"), dit_size={}, dit_head={}, num_classes=1000, cpu_matmul_size=2048),
    "tiny": dict(image_size=64, stem_widths=TINY_CONFIG["stem_widths"], disc_resolution=64,
                 decoder=TINY_CONFIG["decoder"], dit_size=TINY_SIZE, dit_head=TINY_HEAD, num_classes=8,
                 cpu_matmul_size=512),
}
CUDA_BATCH = dict(vit_l_forward=64, decoder_fwd_bwd=32, ae_stage2_step=32, lightningdit_xl_train_step=32,
                  ditdh_xl_train_step=32, sampling_step=32, inception_features=50)
CFG_SCALE = 1.5  # any scale != 1 runs the batched [cond; uncond] forward


#################################################################################
#                              Models of a preset                               #
#################################################################################

def encoder_vit(preset):
    return dinov3_vit("vitl16") if preset == "full" else tiny_dinov3(depth=4, seed=1)


def disc_vit(preset):
    return dinov3_vit("vits16") if preset == "full" else tiny_dinov3(depth=12, seed=2)


def decoder(preset):
    return DCAEDecoder(**PRESETS[preset]["decoder"])


def dit(preset, name):
    p = PRESETS[preset]
    size = dict(p["dit_size"], **(p["dit_head"] if name.startswith("DiTDH") else {}))
    return DiT_models[name](input_size=p["image_size"] // 16, in_channels=p["decoder"]["latent_channels"],
                            num_classes=p["num_classes"], **size)


def random_images(batch, size, device):
    return torch.rand(batch, 3, size, size, device=device) * 2 - 1


def random_latents(model, batch, device):
    """Points on the spheres of radius sqrt(C), as the encoder produces them."""
    shape = (batch, model.in_channels, model.input_size, model.input_size)
    return project_sphere(torch.randn(shape, device=device), math.sqrt(model.in_channels))


#################################################################################
#        Benchmarks: each builds its models and returns (step, hot modules)     #
#################################################################################

def vit_l_forward(preset, batch, device, autocast, channels_last):
    """The frozen DINOv3 ViT-L/16 on 256² images (the teacher; the student shares its blocks)."""
    vit = encoder_vit(preset).to(device)
    x = imagenet_normalize(random_images(batch, PRESETS[preset]["image_size"], device))

    def step():
        with torch.no_grad(), autocast():
            vit(x)
    return step, list(vit.blocks)


def decoder_fwd_bwd(preset, batch, device, autocast, channels_last):
    """The DC-AE f16-in decoder (688 GFLOPs forward per 256² image, SPEC §2.2), forward and backward, train mode."""
    dec = decoder(preset).to(device)
    z = project_sphere(torch.randn(batch, dec.latent_channels, PRESETS[preset]["image_size"] // 16,
                                   PRESETS[preset]["image_size"] // 16, device=device), math.sqrt(dec.latent_channels))
    if channels_last:
        dec, z = dec.to(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)

    def step():
        dec.zero_grad(set_to_none=True)
        with autocast():
            x_hat = dec(z)
        x_hat.float().square().mean().backward()
    return step, [dec]


def ae_stage2_step(preset, batch, device, autocast, channels_last):
    """One stage-2 step of train_ae.py: generator loss (alignment, L1, LPIPS, adaptive-weighted GAN) and AdamW step,
    then the discriminator's hinge loss and AdamW step."""
    p, stage = PRESETS[preset], STAGES[2]
    ae = DinoSAE(DinoSAEEncoder(encoder_vit(preset), p["stem_widths"]), decoder(preset)).to(device).train()
    if channels_last:
        ae.decoder.to(memory_format=torch.channels_last)
    disc = DinoDiscriminator(disc_vit(preset), resolution=p["disc_resolution"]).to(device)
    lpips = build_lpips(pretrained=False).to(device)
    params = [q for q in ae.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage["lr"], betas=stage["betas"], weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=stage["lr"], betas=stage["betas"], weight_decay=0.0)
    x = random_images(batch, p["image_size"], device)

    def step():
        disc.requires_grad_(False)
        with autocast():
            loss, _, out = generator_loss(ae, lpips, disc, x, stage)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        check_finite(loss, params)
        opt.step()
        disc.requires_grad_(True)
        with autocast():
            d_loss = discriminator_loss(disc, x, out["x_hat"])
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        check_finite(d_loss, disc.parameters())
        opt_d.step()
    return step, [*ae.encoder.vit.blocks, ae.decoder, lpips, *disc.feature_net.blocks]


def dit_train_step(name):
    """One step of train_dit.py on encoded latents: RFM loss (Eq. 14) with label dropout, AdamW, grad clipping,
    EMA. Encoding the images (stem + ViT-L forward) is measured by vit_l_forward, not here."""
    defaults = FAMILY_DEFAULTS[name.split("-")[0]]

    def build(preset, batch, device, autocast, channels_last):
        model = dit(preset, name).to(device)
        ema = copy.deepcopy(model).requires_grad_(False)
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)
        z = random_latents(model, batch, device)
        y = torch.randint(model.num_classes, (batch,), device=device)
        radius, alpha = math.sqrt(model.in_channels), shift_alpha(model.input_size ** 2, model.in_channels)

        def step():
            with autocast():
                loss = rfm_loss(model, z, drop_labels(y, model.null_class), radius, alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            check_finite(loss, params)
            torch.nn.utils.clip_grad_norm_(params, defaults["grad_clip"] or math.inf)
            opt.step()
            update_ema(ema, model, defaults["ema"])
        return step, [model]
    return build


def sampling_step(preset, batch, device, autocast, channels_last):
    """One Euler-projection step (Alg. 2) of LightningDiT-XL/1 with classifier-free guidance, through sample.py."""
    model = dit(preset, "LightningDiT-XL/1").to(device).eval().requires_grad_(False)
    noise = random_latents(model, batch, device)
    labels = torch.randint(model.num_classes, (batch,), device=device)
    radius, alpha = math.sqrt(model.in_channels), shift_alpha(model.input_size ** 2, model.in_channels)

    def step():
        with torch.no_grad(), autocast():
            sample_latents(model, labels, noise, radius, alpha, "euler-proj", steps=1, cfg_scale=CFG_SCALE)
    return step, [model]


def inception_step(preset, batch, device, autocast, channels_last):
    """FID Inception features (pool3, logits, spatial) of uint8 256² samples with ADM preprocessing, exact fp32."""
    net = random_inception(0).to(device)
    size = PRESETS[preset]["image_size"]
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)

    def step():
        inception_features(net, images, batch_size=batch, progress=False)
    return step, [net]


BENCHMARKS = {
    "vit_l_forward": vit_l_forward,
    "decoder_fwd_bwd": decoder_fwd_bwd,
    "ae_stage2_step": ae_stage2_step,
    "lightningdit_xl_train_step": dit_train_step("LightningDiT-XL/1"),
    "ditdh_xl_train_step": dit_train_step("DiTDH-XL/1"),
    "sampling_step": sampling_step,
    "inception_features": inception_step,
}
EXACT_FP32 = {"inception_features"}  # fid.py turns autocast and TF32 off: its matmuls run in fp32


def check_finite(loss, params):
    """The trainers skip non-finite steps; a benchmark that skipped its optimizer step would time less work."""
    if not tu.finite(loss, tu.grad_norm(list(params))):
        raise RuntimeError("non-finite loss or gradient in a benchmark step")


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


def count_flops(fn):
    """FLOPs of the matmuls, convolutions and attention fn runs (forward and backward); works on the meta device."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}) as c:
        fn()
    return c.get_total_flops()


def run_benchmark(build, batch, device, autocast, iters, warmup, compile=False, channels_last=False):
    """Build, count the FLOPs of one eager iteration (also the first warm-up), optionally compile, warm up, time."""
    with PeakMemory(device) as memory:
        step, hot_modules = build(batch=batch, device=device, autocast=autocast, channels_last=channels_last)
        flops = count_flops(step)
        if compile:
            for module in hot_modules:
                module.compile()
        for _ in range(warmup):
            step()
        seconds = statistics.median(timed(step, device) for _ in range(iters))
    return dict(batch=batch, images_per_s=batch / seconds, seconds_per_iter=seconds, gflop_per_image=flops / batch / 1e9,
                gflops_achieved=flops / seconds / 1e9, peak_memory_mb=memory.mb, memory_kind=memory.kind, iters=iters)


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
    autocast = lambda: tu.autocast(device, dtype)
    results = {}
    for name in names:
        torch.manual_seed(args.seed)
        batch = args.batch or (CUDA_BATCH[name] if device.type == "cuda" else 1)
        build = lambda **kw: BENCHMARKS[name](args.preset, **kw)
        result = run_benchmark(build, batch, device, autocast, iters, warmup, args.compile, args.channels_last)
        compute_dtype = "fp32" if name in EXACT_FP32 else dtype
        result.update(compute_dtype=compute_dtype, fraction_of_peak=result["gflops_achieved"] / peaks[compute_dtype])
        results[name] = result
        log(f"{name}: {result['images_per_s']:.3g} img/s, {result['gflops_achieved']:.0f} GFLOP/s "
            f"({100 * result['fraction_of_peak']:.0f}% of {compute_dtype} peak), {result['peak_memory_mb']} MB")
    return {"device": device_name(device), "torch": torch.__version__, "preset": args.preset, "dtype": dtype,
            "compile": args.compile, "channels_last": args.channels_last, "matmul_peak_gflops": peaks[dtype],
            "matmul_peak_gflops_by_dtype": peaks, "benchmarks": results}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def log(message):
    print(message, file=sys.stderr, flush=True)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), help="run this benchmark (repeatable)")
    p.add_argument("--preset", choices=list(PRESETS), default="full", help="tiny: small models, for tests")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype of the models (default bf16 on CUDA, fp32 on CPU as the tiny presets train)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help=f"images (latents) per step of every selected benchmark (default 1 on CPU, {CUDA_BATCH} on CUDA)")
    p.add_argument("--iters", type=positive_int, default=None, help="timed iterations (default 10 CUDA, 1 CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations after the FLOP-counting one (default 3 CUDA, 0 CPU, 1 CPU with --compile)")
    p.add_argument("--compile", action="store_true", help="torch.compile the hot modules (ViT blocks, decoder, DiT)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format in the decoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the JSON to this file")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.warmup is not None and args.warmup < (1 if args.compile else 0):
        p.error("--warmup must be >= 0, and >= 1 with --compile (compilation happens in the first warm-up iteration)")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    report = run(args)
    report["wall_s"] = time.time() - t0
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
