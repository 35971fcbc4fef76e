"""Training infrastructure shared by train_ae.py and train_dit.py.

What a week-long multi-GPU torchrun job needs to never lose work and to resume exactly:
  distributed setup     torchrun env → process group (NCCL on CUDA, gloo on CPU); one plain process works too
  data                  ADM center crop (SPEC §2.5), ImageFolder dataset that skips corrupt images, synthetic images
                        for the tiny presets, flips decided by (seed, epoch, index), a sampler that resumes mid-epoch
  checkpoints           atomic writes, a `latest` pointer, keep-K pruning, fallback past a corrupt newest file
  RNG                   capture/restore of torch, CUDA, python and numpy generators per rank
  preemption            SIGTERM/SIGUSR1 → finish the step, agree across ranks, checkpoint, exit 0
  non-finite steps      skip steps whose loss or gradients are not finite (agreed across ranks), fail after a streak
  logging               JSON-lines metrics, a concise printed line, a rank-0 progress bar, image grids

Exact resume: a run of N steps equals N/2 steps + checkpoint + resume + N/2 steps bit for bit when the trainer stores
the model, optimizer, step, epoch and `gather_rng_states()`, and restarts the sampler with
`set_epoch(epoch, start=steps_done_in_epoch * batch_per_rank)` (`endless_batches` does that).
"""
import argparse
import glob
import json
import math
import os
import random
import signal
import sys
import tempfile
import warnings
from datetime import datetime

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from tqdm import tqdm


# ---------------------------------------------------------------------------------------------------------------------
# User errors: one line on stderr, no traceback

class UserError(Exception):
    """The user's input is wrong (a flag, a file, the data). `cli` prints it as one line, without a traceback."""
    exit_code = 1


class UsageError(UserError, ValueError):
    """A bad flag value or combination of flags: exit status 2, as argparse."""
    exit_code = 2


class DataError(UserError, ValueError):
    """A file or data set that exists but is not what the run needs (wrong kind, unreadable, wrong shape): exit 1."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the run needs is not there: exit 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError: one line through `cli`, and an exception (not SystemExit) for callers
    in Python."""

    def error(self, message):
        raise UsageError(message)


def cli(main):
    """Run an entry script's main(): a UserError becomes one line on stderr (rank 0 only under torchrun) and exit
    status 2 (usage) or 1 (files, data); any other exception is a bug or an accident and keeps its traceback."""
    try:
        main()
    except UserError as error:
        if os.environ.get("RANK", "0") == "0":
            message = str(error).replace("\n", " ")
            print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)


# ---------------------------------------------------------------------------------------------------------------------
# Distributed

def setup_distributed():
    """Start the process group from torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) → (rank, world_size, device).

    A plain process (no torchrun) gets (0, 1, device) and no process group.
    """
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return rank, world_size, device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def cleanup_distributed():
    if is_distributed():
        dist.destroy_process_group()


def is_main():
    return not is_distributed() or dist.get_rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


def _all_reduce(tensor, op):
    """All-reduce a small tensor on the device the backend needs (CUDA for NCCL); identity without a process group."""
    if not is_distributed():
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = tensor.to(device)
    dist.all_reduce(tensor, op=op)
    return tensor


def autocast(device, precision="bf16"):
    """bf16 autocast on CUDA and CPU for precision 'bf16'; a no-op context for 'fp32'."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def check_batch(global_batch, world_size):
    """Per-rank batch size; the global batch must split evenly over the ranks."""
    if global_batch <= 0 or global_batch % world_size != 0:
        raise ValueError(f"global batch size {global_batch} must be a positive multiple of the world size {world_size}")
    return global_batch // world_size


# ---------------------------------------------------------------------------------------------------------------------
# Data

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def center_crop_arr(pil_image, image_size):
    """ADM center crop (SPEC §2.5): BOX-halve while the short side ≥ 2·size, bicubic short side → size, center crop."""
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def _image_files(folder, recursive):
    if recursive:
        found = [os.path.join(d, f) for d, _, files in os.walk(folder, followlinks=True) for f in files]
    else:
        found = [e.path for e in os.scandir(folder) if e.is_file()]
    return sorted(f for f in found if f.lower().endswith(IMAGE_EXTENSIONS))


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under `root` → ([-1, 1] float tensor [3, size, size], label), or None for an unreadable image.

    Layout: class subfolders (labels follow the sorted class names, images found recursively), or a flat folder of
    images (label 0). Deterministic: flips are done by the trainer with a seeded generator so that resume is exact.
    A corrupt file is skipped (warned once per file and worker process) instead of killing a week-long job;
    `collate_skip` counts the skips for the trainer's log.
    """

    def __init__(self, root, image_size):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root} does not exist")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if classes:
            per_class = [_image_files(os.path.join(root, c), recursive=True) for c in classes]
        else:
            per_class = [_image_files(root, recursive=False)]
        files = [os.path.relpath(f, root) for fs in per_class for f in fs]
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
        self.root, self.image_size, self.classes = root, image_size, classes
        # numpy arrays instead of python lists: forked loader workers read them without touching refcounts, so
        # the 1.28M ImageNet paths are not copied into every worker.
        self.files = np.array([f.encode() for f in files])
        self.labels = np.repeat(np.arange(len(per_class)), [len(fs) for fs in per_class])
        self._warned = set()

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = os.path.join(self.root, self.files[index].decode())
        try:
            with Image.open(path) as image:
                image = center_crop_arr(image.convert("RGB"), self.image_size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # PIL's decode errors
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(f"skipping unreadable image {path}: {error}")
            return None
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
        return x, int(self.labels[index])


def collate_skip(batch):
    """Collate (x, y) pairs, dropping the None of unreadable images → (x [B',3,H,W], y [B'], n_skipped)."""
    kept = [b for b in batch if b is not None]
    if not kept:
        raise RuntimeError(f"all {len(batch)} images of a batch were unreadable: check the dataset and its disk")
    x, y = torch.utils.data.default_collate(kept)
    return x, y, len(batch) - len(kept)


class SyntheticImages(torch.utils.data.Dataset):
    """Deterministic class-conditional toy images: a coloured shape on a gradient background, drawn from the index.

    The class fixes the shape (disc, square, ring, bars) and its hue, so a conditional generator has something to learn.
    """

    def __init__(self, num_items=512, image_size=64, num_classes=8, seed=0):
        self.num_items, self.size, self.num_classes, self.seed = num_items, image_size, num_classes, seed

    def __len__(self):
        return self.num_items

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = index % self.num_classes
        s = self.size
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
        c0, c1 = torch.rand(3, 1, 1, generator=g) * 0.8 - 0.9, torch.rand(3, 1, 1, generator=g) * 0.8 - 0.9
        angle = torch.rand(1, generator=g) * 2 * math.pi
        t = (xx * angle.cos() + yy * angle.sin() + 1.5) / 3
        img = c0 + (c1 - c0) * t
        cy, cx = (torch.rand(2, generator=g) - 0.5).tolist()
        radius = 0.3 + 0.2 * torch.rand(1, generator=g).item()
        d = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        shape = label % 4
        mask = [d < radius, ((yy - cy).abs() < radius) & ((xx - cx).abs() < radius),
                (d < radius) & (d > radius * 0.6), ((xx * 6 + cy * 6).floor() % 2 == 0) & (yy.abs() < 0.6)][shape]
        hue = 2 * math.pi * label / self.num_classes
        colour = torch.tensor([math.cos(hue), math.cos(hue + 2.1), math.cos(hue + 4.2)]).view(3, 1, 1) * 0.9
        img = torch.where(mask, colour, img)
        return img.clamp(-1, 1), label


class HorizontalFlip(torch.utils.data.Dataset):
    """Random horizontal flips decided by (seed, epoch, index), not by a rank's RNG stream: any number of ranks sees
    exactly the images one process would, and a resumed run sees the same flips as an uninterrupted one."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        if item is None or random.Random(f"{self.seed}-{self.epoch}-{index}").random() >= 0.5:
            return item
        return item[0].flip(-1), item[1]


class ResumableSampler(torch.utils.data.Sampler):
    """Distributed sampler that can restart mid-epoch.

    Each epoch draws a permutation from a generator seeded with seed + epoch, pads it (by repetition) to a multiple
    of the world size and gives rank r the items r, r + W, r + 2W, ... `set_epoch(epoch, start)` skips the first
    `start` items of this rank's share, i.e. the ones consumed before the checkpoint.
    """

    def __init__(self, num_items, rank, world_size, seed, shuffle=True):
        if num_items <= 0:
            raise ValueError(f"ResumableSampler needs at least one item, got {num_items}")
        self.num_items, self.rank, self.world_size = num_items, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.num_per_rank = math.ceil(num_items / world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        if not 0 <= start <= self.num_per_rank:
            raise ValueError(f"start {start} is outside this rank's share of {self.num_per_rank} items")
        self.epoch, self.start = epoch, start

    def rank_indices(self):
        """This rank's full share of the current epoch, before skipping `start`."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        total = self.num_per_rank * self.world_size
        order = (order * math.ceil(total / self.num_items))[:total]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter(self.rank_indices()[self.start:])

    def __len__(self):
        return self.num_per_rank - self.start


def make_loader(dataset, batch_per_rank, sampler, num_workers):
    """DataLoader over `sampler` yielding (x, y, n_skipped); full batches only.

    The loader gets its own generator: creating an iterator then does not draw its worker base seed from the global
    torch RNG, so the trainer's random stream does not depend on when epochs start (exact resume).
    """
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_per_rank, sampler=sampler, num_workers=num_workers, collate_fn=collate_skip,
        drop_last=True, persistent_workers=False, pin_memory=torch.cuda.is_available(), generator=torch.Generator())


def endless_batches(dataset, sampler, batch, progress, num_workers):
    """(x, y, n_skipped) forever, epoch after epoch, starting where `progress` (a dict with epoch and step_in_epoch,
    advanced by the trainer) says: mid-epoch after a resume. `dataset.epoch` is set for epoch-dependent flips."""
    while True:
        dataset.epoch = progress["epoch"]
        sampler.set_epoch(progress["epoch"], start=progress["step_in_epoch"] * batch)
        yield from make_loader(dataset, batch, sampler, num_workers)
        progress["epoch"] += 1
        progress["step_in_epoch"] = 0


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints

_PLAIN_TYPES = (torch.Tensor, torch.dtype, torch.device, bool, int, float, str, type(None))


def _check_loadable(obj, where):
    """Refuse at save time what torch.load(weights_only=True) would refuse at resume time, naming the entry."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint {where} has a key of type {type(key).__name__}; use str or int keys")
            _check_loadable(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_loadable(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN_TYPES):
        raise TypeError(f"checkpoint {where} is a {type(obj).__name__}; states hold only tensors and python "
                        "primitives (store argparse args as vars(args), numbers as float/int)")


class CheckpointManager:
    """Checkpoints `ckpt_{step:07d}.pt` in `directory`, a `latest` pointer file; each save keeps the file it wrote
    and the newest `keep` - 1 others.

    `save` is called by rank 0 only (the caller checks `is_main()` and then calls `barrier()`). States must hold
    only tensors and python primitives (dicts, lists, tuples, numbers, strings, None): they are read back with
    torch.load(weights_only=True); store argparse args as `vars(args)`.
    """

    def __init__(self, directory, keep=3):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory, self.keep = directory, keep
        self.loaded_path = None

    def _write_atomic(self, path, write):
        """Write through a temp file in the same folder + fsync + os.replace: a crash leaves the old file or the new
        one, never a partial one under the final name."""
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp_", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    def checkpoints(self):
        """Checkpoint paths, newest step first."""
        return sorted(glob.glob(os.path.join(self.directory, "ckpt_*.pt")), reverse=True)

    def save(self, state, step):
        _check_loadable(state, "state")
        os.makedirs(self.directory, exist_ok=True)
        name = f"ckpt_{step:07d}.pt"
        path = os.path.join(self.directory, name)
        self._write_atomic(path, lambda f: torch.save(state, f))
        self._write_atomic(os.path.join(self.directory, "latest"), lambda f: f.write(name.encode()))
        for old in [p for p in self.checkpoints() if p != path][self.keep - 1:]:
            os.remove(old)
        return path

    def _latest_target(self):
        pointer = os.path.join(self.directory, "latest")
        if not os.path.isfile(pointer):
            return None
        with open(pointer) as f:
            path = os.path.join(self.directory, f.read().strip())
        return path if os.path.isfile(path) else None

    def load(self, path="auto"):
        """Load a checkpoint (on CPU). 'auto': the newest readable one in the folder — the `latest` target first,
        then the others newest first, warning about each unreadable file — or None when the folder holds none."""
        if path != "auto":
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint {path} does not exist")
            self.loaded_path = path
            return _load(path)
        latest = self._latest_target()
        candidates = ([latest] if latest else []) + [p for p in self.checkpoints() if p != latest]
        for candidate in candidates:
            try:
                state = _load(candidate)
            except Exception as error:  # garbage bytes raise any of many types (IndexError, KeyError, ...) in the unpickler
                warnings.warn(f"checkpoint {candidate} is unreadable ({error}); falling back to the previous one")
                continue
            self.loaded_path = candidate
            return state
        if candidates:
            raise RuntimeError(f"no readable checkpoint in {self.directory}: all of {candidates} failed to load")
        return None


def _load(path):
    # mmap: tensors are read when touched, so 8 ranks of sample.py reading the EMA of an 11 GB DiT-XL checkpoint
    # (weights, EMA, Adam moments) share the page cache instead of each materialising it all.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


# ---------------------------------------------------------------------------------------------------------------------
# Random number generators

def seed_everything(seed):
    """Seed torch (CPU and CUDA), python `random` and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def rng_state():
    """This process's RNG states in a weights_only-loadable form (tensors, tuples, numbers, strings)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restore the states captured by `rng_state` (CUDA only when both the state and this machine have it)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(world_size):
    """RNG states of all ranks, indexed by rank (every rank calls this; rank 0 stores the list)."""
    state = rng_state()
    if not is_distributed():
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(states, rank, world_size):
    """Restore this rank's entry of `gather_rng_states`. After a change of world size an exact resume is impossible:
    keep the fresh per-rank seeding and warn."""
    if len(states) != world_size:
        warnings.warn(f"checkpoint holds RNG states of {len(states)} ranks, this run has {world_size}: "
                      "RNG states not restored, the resumed run is not bit-identical to an uninterrupted one")
        return
    set_rng_state(states[rank])


# ---------------------------------------------------------------------------------------------------------------------
# Preemption and non-finite steps

class PreemptionHandler:
    """SIGTERM / SIGUSR1 only set a flag; the trainer polls `should_stop()` once per step, so the current step finishes,
    every rank stops at the same step, rank 0 writes a checkpoint and the job exits 0.

    With SLURM, have the signal sent to the training processes ahead of the kill, e.g. `#SBATCH --signal=USR1@120`;
    torchrun forwards SIGTERM to its workers.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.received = signum

    def should_stop(self):
        """True on every rank as soon as any rank received a signal (a collective: all ranks call it each step)."""
        flag = torch.tensor(0.0 if self.received is None else 1.0)
        return bool(_all_reduce(flag, dist.ReduceOp.MAX).item())

    def restore(self):
        """Reinstall the handlers that were in place before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def all_finite(loss, parameters):
    """True when the loss and every gradient are finite on all ranks (a collective: all ranks call it each step)."""
    checks = [torch.isfinite(loss).all()]
    checks += [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
    ok = torch.stack(checks).all().float()
    return bool(_all_reduce(ok, dist.ReduceOp.MIN).item())


def checkpoint_or_stop(step, total_steps, ckpt_every, preempt, save):
    """Checkpoint at the interval, at the last step and on preemption; True when the run must stop now (every rank
    gets the same answer, so all of them stop at the same step)."""
    stop = preempt.should_stop()
    if step % ckpt_every == 0 or step == total_steps or stop:
        save()
    if stop and is_main():
        print(f"preempted: checkpoint written at step {step}, exiting", flush=True)
    return stop


class NonFiniteGuard:
    """Counts skipped steps; fails loudly once `max_in_a_row` consecutive steps were not finite (a diverged run
    should stop, not spin)."""

    def __init__(self, max_in_a_row=20):
        self.max_in_a_row = max_in_a_row
        self.skipped_total, self.in_a_row = 0, 0

    def step_ok(self, ok):
        """Record one step; returns ok (the trainer takes the optimizer step only when True)."""
        if ok:
            self.in_a_row = 0
            return True
        self.skipped_total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise RuntimeError(
                f"{self.in_a_row} consecutive steps had a non-finite loss or gradient ({self.skipped_total} skipped "
                "in total): the run has diverged; resume from an earlier checkpoint with a lower learning rate")
        return False


# ---------------------------------------------------------------------------------------------------------------------
# Logging

def _format(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Logger:
    """Metrics as JSON lines in out_dir/metrics.jsonl plus one printed line per call (rank 0: enabled=is_main()).

    After a resume, steps between the checkpoint and the interruption appear twice; readers keep the last entry.
    """

    def __init__(self, out_dir, enabled):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if enabled:
            os.makedirs(out_dir, exist_ok=True)

    def log(self, step, metrics):
        if not self.enabled:
            return
        metrics = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": datetime.now().isoformat(timespec="seconds"), **metrics}) + "\n")
        tqdm.write(" | ".join([f"step {step}"] + [f"{k} {_format(v)}" for k, v in metrics.items()]))


def progress_bar(total, initial=0, desc=None):
    """tqdm bar over steps, shown on rank 0 only."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not is_main(), dynamic_ncols=True)


def save_image_grid(images, path, nrow):
    """Save images in [-1, 1] [B,3,H,W] as one PNG grid (values clamped), creating parent folders."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torchvision.utils.save_image((images.detach().float().cpu().clamp(-1, 1) + 1) / 2, path, nrow=nrow)


# ---------------------------------------------------------------------------------------------------------------------
# Command line shared by train_ae.py and train_dit.py

def add_run_args(p):
    """The flags both trainers share: data, resume, length, loader, seed, logging, checkpoints and numerics."""
    p.add_argument("--data", help="ImageFolder root (ImageNet train); synthetic images when omitted with --preset tiny")
    p.add_argument("--resume", default="auto", help="'auto' (newest readable checkpoint of the run), a path, or 'none'")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--num-images", type=int, default=512, help="synthetic images of the tiny preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--max-nonfinite", type=int, default=20, help="stop after this many non-finite steps in a row")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast dtype of the forward")


def apply_preset(parser, args, values):
    """Give the flags the user left at their parser default the preset's values."""
    for key, value in values.items():
        if getattr(args, key) == parser.get_default(key):
            setattr(args, key, value)
