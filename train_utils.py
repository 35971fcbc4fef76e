"""What every training run shares, so that train_ae.py and train_dit.py show only their algorithm.

A week-long multi-GPU torchrun job must never lose work and must resume exactly:
  user errors       one line on stderr and exit status 2 (usage) or 1 (files, data); bugs keep their traceback
  distributed       torchrun env → process group (NCCL on CUDA, gloo on CPU); one plain process works too
  data              ADM center crop, an image folder that skips unreadable files, synthetic images for the tiny
                    presets, flips decided by (seed, epoch, index), a sampler that restarts mid-epoch
  checkpoints       atomic writes, a `latest` pointer, keep-K pruning, fallback past an unreadable newest file
  RNG               the torch, CUDA, python and numpy generators of every rank, saved and restored
  Run               progress, resume, batches and micro-batches (--grad-accum), one agreement across ranks per
                    optimizer step (non-finite losses or gradients, preemption, metrics), periodic log / sample /
                    checkpoint; SIGTERM, SIGUSR1 and SIGINT finish the step, checkpoint and stop

Exact resume: N steps straight equal N/2 steps + checkpoint + resume + N/2 steps bit for bit.
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
import time
import warnings
from contextlib import nullcontext
from datetime import datetime

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
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


def positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


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

    A plain process (no torchrun) gets (0, 1, device) and no process group. On CUDA, fp32 matmuls and convolutions use
    TF32 and cuDNN picks its fastest algorithms: bf16 autocast does the heavy work, and TF32 error on what stays in
    fp32 is below bf16's (fid.py switches TF32 off for its metrics).
    """
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
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


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if is_main():
        print(*args, flush=True, **kwargs)


def barrier():
    if is_distributed():
        dist.barrier()


def ddp(model, device):
    """DDP over the process group, or the model itself for one process. Gradients are views into DDP's buckets: one
    copy of the gradients less."""
    if not is_distributed() or dist.get_world_size() == 1:
        return model
    return DDP(model, device_ids=[device] if device.type == "cuda" else None, gradient_as_bucket_view=True)


def unwrap(model):
    return model.module if isinstance(model, DDP) else model


def autocast(device, precision="bf16"):
    """bf16 autocast on CUDA and CPU for precision 'bf16'; a no-op context for 'fp32'."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def grad_norm(parameters):
    """Global L2 norm of the gradients (one pass; non-finite when any gradient is)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def finite(*values):
    """A bool tensor on the values' device: all of them finite (no host synchronisation)."""
    return torch.stack([torch.isfinite(v).all() for v in values]).all()


# ---------------------------------------------------------------------------------------------------------------------
# Data

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def center_crop_arr(pil_image, image_size):
    """ADM center crop: BOX-halve while the short side ≥ 2·size, bicubic short side → size, center crop."""
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
            raise MissingFileError(f"image folder {root} does not exist")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if classes:
            per_class = [_image_files(os.path.join(root, c), recursive=True) for c in classes]
        else:
            per_class = [_image_files(root, recursive=False)]
        files = [os.path.relpath(f, root) for fs in per_class for f in fs]
        if not files:
            raise MissingFileError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
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
    """Collate (x, y) pairs, dropping the None of unreadable images → (x [B',3,H,W], y [B'], n_skipped); B' may be 0."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(batch)
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
    and the newest `keep` - 1 older ones. Files of later steps (left by a run that was resumed from an earlier
    checkpoint) are removed by the first save: the folder never mixes two histories.

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
        others = [p for p in self.checkpoints() if p != path]
        later = [p for p in others if os.path.basename(p) > name]
        for old in later + [p for p in others if p not in later][self.keep - 1:]:
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
                raise MissingFileError(f"checkpoint {path} does not exist")
            try:
                state = _load(path)
            except Exception as error:  # truncated or random bytes: any of many unpickler/zip errors
                raise DataError(f"checkpoint {path} is unreadable ({type(error).__name__})") from error
            self.loaded_path = path
            return state
        latest = self._latest_target()
        candidates = ([latest] if latest else []) + [p for p in self.checkpoints() if p != latest]
        for candidate in candidates:
            try:
                state = _load(candidate)
            except Exception as error:  # garbage bytes raise any of many types (IndexError, KeyError, ...) in the unpickler
                warnings.warn(f"checkpoint {candidate} is unreadable ({type(error).__name__}); falling back to the "
                              "previous one")
                continue
            self.loaded_path = candidate
            return state
        if candidates:
            raise DataError(f"no readable checkpoint in {self.directory}: all of {len(candidates)} files failed to load")
        return None


def _load(path):
    # mmap: tensors are read when touched, so 8 ranks of sample.py reading the EMA of an 11 GB DiT-XL checkpoint
    # (weights, EMA, Adam moments) share the page cache instead of each materialising it all.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)




def load_checkpoint(path, kind, what):
    """The checkpoint of `kind` at `path`, a file or a run folder (its newest readable file) -> (state, file path).
    `what` names the flag or role in the error messages."""
    if not os.path.exists(path):
        raise MissingFileError(f"{what} {path} does not exist")
    folder = os.path.isdir(path)
    manager = CheckpointManager(path if folder else os.path.dirname(path) or ".")
    state = manager.load("auto" if folder else path)
    if state is None:
        raise MissingFileError(f"{what} {path} holds no checkpoint (ckpt_*.pt)")
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = f"a {state['kind']!r} checkpoint" if isinstance(state, dict) and "kind" in state else "not one"
        raise DataError(f"{what} {manager.loaded_path} is {found}: expected a {kind!r} checkpoint")
    return state, manager.loaded_path


# ---------------------------------------------------------------------------------------------------------------------
# Random number generators

def seed_everything(seed):
    """Seed torch (CPU and CUDA), python `random` and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class SampleRNG:
    """The random numbers of one training step, drawn sample by sample: sample k of the global batch (its place in the
    sampler's order) draws from its own generator, seeded by (seed, step, k). A step then draws the same numbers
    whatever the number of ranks or --grad-accum micro-batches, as flips already follow (seed, epoch, index).
    rand / randn / randint(low, high, *shape) -> [B, *shape], the interface of model.BatchRandom."""

    def __init__(self, generators):
        self.generators = generators

    @classmethod
    def for_step(cls, seed, step, batch, rank, world_size, device):
        """This rank's samples: the sampler deals the global batch out in turn, so its j-th is k = j·world + rank."""
        keys = [((seed * 2 ** 24 + step) * 2 ** 24 + j * world_size + rank) % 2 ** 63 for j in range(batch)]
        return cls([torch.Generator(device).manual_seed(k) for k in keys])

    def rand(self, *shape):
        return torch.stack([torch.rand(shape, generator=g, device=g.device) for g in self.generators])

    def randn(self, *shape):
        return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in self.generators])

    def randint(self, low, high, *shape):
        return torch.stack([torch.randint(low, high, shape, generator=g, device=g.device) for g in self.generators])

    def chunk(self, n):
        """Split like torch.chunk splits the batch (micro-batches)."""
        return [SampleRNG([self.generators[i] for i in part.tolist()])
                for part in torch.arange(len(self.generators)).chunk(n)]


# ---------------------------------------------------------------------------------------------------------------------
# The run: progress, resume, batches, one agreement per optimizer step, log / sample / checkpoint

class PreemptionHandler:
    """SIGTERM, SIGUSR1 and SIGINT only set a flag; the run reads it once per optimizer step (in `Run.agree`), so the
    step finishes, every rank stops at the same step, a checkpoint is written and the trainer returns. A second SIGINT
    interrupts at once (Ctrl-C twice).

    With SLURM, have the signal sent to the training processes ahead of the kill, e.g. `#SBATCH --signal=USR1@120`;
    torchrun forwards SIGTERM to its workers.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def restore(self):
        """Reinstall the handlers that were in place before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class NonFiniteGuard:
    """Counts skipped steps of one optimizer; fails loudly once `max_in_a_row` consecutive steps were not finite (a
    diverged run should stop, not spin)."""

    def __init__(self, max_in_a_row=20):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0

    def step_ok(self, ok):
        """Record one step; returns ok (the trainer takes the optimizer step only when True)."""
        self.in_a_row = 0 if ok else self.in_a_row + 1
        if self.in_a_row >= self.max_in_a_row:
            raise RuntimeError(f"{self.in_a_row} consecutive steps had a non-finite loss or gradient: the run has "
                               "diverged; resume from an earlier checkpoint with a lower learning rate")
        return ok


class Run:
    """The bookkeeping of one training run (all ranks), so that a trainer's loop is its algorithm:

        run = Run(out_dir, args, device)
        run.plan(len(dataset), args.global_batch, epochs)       # fails on a too-small dataset before any model
        state = run.resume(check)                               # None, or the checkpoint to continue from
        ... build the models, load `state` ...
        for step, x, y in run.batches(dataset):                 # this rank's share of each global batch
            for x_m, y_m in run.micro_batches(model, x, y): ... # --grad-accum chunks, DDP sync on the last
            ok = run.agree({"G": finite(loss, norm)}, metrics)  # the step's one host synchronisation
            ... optimizer step where ok ...
            run.end_step(state_fn, sample_fn)                   # log / sample / checkpoint at their intervals

    `progress` (saved in every checkpoint) holds the step, the epoch and the position in it, and the run's totals:
    skipped images, non-finite steps, and the tallies passed to `agree` (sums and counts over all ranks and steps).
    """

    def __init__(self, out_dir, args, device):
        self.out_dir, self.args, self.device = out_dir, args, device
        self.rank = dist.get_rank() if is_distributed() else 0
        self.world = dist.get_world_size() if is_distributed() else 1
        self.ckpts = CheckpointManager(out_dir, keep=args.keep)
        self.logger = Logger(out_dir, is_main())
        self.progress = dict(step=0, epoch=0, step_in_epoch=0, skipped_images=0, nonfinite_steps=0, tallies={})
        self.guards, self.interval = {}, {}
        self.preempt, self.stopped, self.skipped_pending = None, None, 0
        self.last_log = (time.time(), 0)

    @property
    def step(self):
        return self.progress["step"]

    def plan(self, num_items, global_batch, epochs, max_steps=None):
        """Split the global batch over ranks and --grad-accum micro-batches; the run's length in optimizer steps."""
        accum = self.args.grad_accum
        if global_batch % (self.world * accum):
            raise UsageError(f"--global-batch {global_batch} must be a multiple of ranks × --grad-accum = "
                             f"{self.world} × {accum}")
        self.batch = global_batch // self.world
        self.steps_per_epoch = math.ceil(num_items / self.world) // self.batch
        if self.steps_per_epoch == 0:
            raise DataError(f"the data set has {num_items} images, fewer than one global batch of {global_batch}")
        self.total_steps = max_steps or epochs * self.steps_per_epoch

    def resume(self, check):
        """The checkpoint to continue from, or None: --resume auto takes the newest readable one of the run folder.
        `check(state, path)` refuses a checkpoint of another kind, stage or model. Metrics logged after its step (by
        the interrupted run) are dropped, so metrics.jsonl keeps one record per step."""
        state = None if self.args.resume == "none" else self.ckpts.load(self.args.resume)
        if state is not None:
            check(state, self.ckpts.loaded_path)
            self.progress.update(state["progress"])
            print0(f"resuming {self.ckpts.loaded_path} at step {self.step}")
        self.logger.truncate(self.step)
        return state

    def batches(self, dataset, desc=None):
        """(step, x, y, rng) for every optimizer step until the run's length or a signal: this rank's share of the
        global batch, in the sampler's order, restarting mid-epoch after a resume, and the SampleRNG of its samples."""
        sampler = ResumableSampler(len(dataset), self.rank, self.world, self.args.seed)
        data = endless_batches(dataset, sampler, self.batch, self.progress, self.args.num_workers)
        bar = progress_bar(self.total_steps, initial=self.step, desc=desc)
        self.preempt = PreemptionHandler()
        try:
            while self.step < self.total_steps and self.stopped is None:
                x, y, skipped = next(data)
                if len(x) == 0:
                    raise DataError(f"all {skipped} images of a batch were unreadable: check the data set and its disk")
                self.progress["step"] += 1
                self.progress["step_in_epoch"] += 1
                self.skipped_pending += skipped
                rng = SampleRNG.for_step(self.args.seed, self.step, len(x), self.rank, self.world, self.device)
                yield self.step, x, y, rng
                bar.update(1)
        finally:
            bar.close()
            self.preempt.restore()

    def micro_batches(self, model, *batch):
        """--grad-accum N: the N chunks of this rank's batch (tensors, moved to the device, and its SampleRNG). A DDP
        model synchronises its gradients only in the backward pass of the last chunk; the caller divides each chunk's
        loss by N."""
        chunks = [[p.to(self.device, non_blocking=True) if torch.is_tensor(p) else p for p in chunk]
                  for chunk in zip(*(part.chunk(self.args.grad_accum) for part in batch))]
        for chunk in self.accumulate(model, chunks):
            yield chunk if len(chunk) > 1 else chunk[0]

    def accumulate(self, model, items):
        """Yield the items; a DDP model synchronises its gradients only in the backward pass of the last one."""
        for i, item in enumerate(items):
            with model.no_sync() if isinstance(model, DDP) and i < len(items) - 1 else nullcontext():
                yield item

    def agree(self, checks, metrics, tallies=None):
        """The one host synchronisation of an optimizer step. One all-reduce sums over ranks: for each optimizer in
        `checks` (name -> bool tensor, its loss and gradients are finite) whether it failed anywhere, whether a
        signal arrived, the step's `metrics` (name -> number or tensor, averaged over ranks, logged as means over the
        log interval) and `tallies` (name -> (sum, count), accumulated over the whole run).
        -> {name: True when that optimizer may step}; every rank gets the same answer."""
        tallies = tallies or {}
        items = [~ok for ok in checks.values()] + list(metrics.values())
        items += [v for pair in tallies.values() for v in pair]
        items += [float(self.preempt.received is not None), float(self.skipped_pending)]
        values = self._sum_over_ranks(items)
        ok = {}
        for name, failed in zip(checks, values):
            guard = self.guards.setdefault(name, NonFiniteGuard(self.args.max_nonfinite))
            ok[name] = guard.step_ok(failed == 0)
        values = values[len(checks):]
        for name, value in zip(metrics, values):
            if math.isfinite(value):
                total = self.interval.setdefault(name, [0.0, 0])
                total[0], total[1] = total[0] + value / self.world, total[1] + 1
        values = values[len(metrics):]
        for i, name in enumerate(tallies):
            total = self.progress["tallies"].setdefault(name, [0.0, 0.0])
            total[0], total[1] = total[0] + values[2 * i], total[1] + values[2 * i + 1]
        signalled, skipped = values[2 * len(tallies):]
        self.progress["nonfinite_steps"] += not all(ok.values())
        self.progress["skipped_images"] += int(skipped)
        self.skipped_pending = 0
        if signalled:
            self.stopped = self.preempt.received or signal.SIGTERM  # the signal of this rank, or of another one
        return ok

    def _sum_over_ranks(self, items):
        """Sum each item (a tensor on the device, or a python number) over ranks in one all-reduce -> python floats.
        Python numbers travel through pinned memory: creating device tensors from them would synchronise the host."""
        tensors = [i for i, v in enumerate(items) if torch.is_tensor(v)]
        numbers = [i for i, v in enumerate(items) if not torch.is_tensor(v)]
        host = torch.tensor([float(items[i]) for i in numbers], dtype=torch.float64,
                            pin_memory=self.device.type == "cuda")
        parts = [torch.stack([items[i].detach().double().reshape(()) for i in tensors])] if tensors else []
        flat = torch.cat(parts + [host.to(self.device, non_blocking=True)])
        if self.world > 1:
            dist.all_reduce(flat)
        values = [0.0] * len(items)
        for slot, value in zip(tensors + numbers, flat.tolist()):
            values[slot] = value
        return values

    def tally(self, name):
        """Running mean of a tally over the whole run (None before the first step)."""
        total = self.progress["tallies"].get(name)
        return total[0] / total[1] if total and total[1] else None

    def end_step(self, state, sample=None):
        """After the optimizer step: a log line, `sample(step)` on rank 0 and a checkpoint at their intervals and at
        the last step; after a signal, the checkpoint now (batches() then ends). `state()` -> the trainer's part of
        the checkpoint (models, optimizers, config)."""
        step, args = self.step, self.args
        last = step == self.total_steps
        if step % args.log_every == 0 or last:
            self.log()
        if sample is not None and (step % args.sample_every == 0 or last) and is_main():
            sample(step)
        if step % args.ckpt_every == 0 or last or self.stopped:
            self.save(state)
        if self.stopped:
            print0(f"stopped by signal {signal.Signals(self.stopped).name}: checkpoint written at step {step}")

    def log(self):
        seconds, images = time.time() - self.last_log[0], (self.step - self.last_log[1]) * self.batch * self.world
        line = {name: total / count for name, (total, count) in self.interval.items() if count}
        line.update({name: self.tally(name) for name in self.progress["tallies"]})
        line.update(img_per_s=images / max(seconds, 1e-9), epoch=self.progress["epoch"],
                    skipped_images=self.progress["skipped_images"], nonfinite_steps=self.progress["nonfinite_steps"])
        self.logger.log(self.step, line)
        self.interval.clear()
        self.last_log = (time.time(), self.step)

    def save(self, state):
        if is_main():
            self.ckpts.save(dict(state(), progress=self.progress), self.step)
        barrier()


class Logger:
    """Metrics as JSON lines in out_dir/metrics.jsonl plus one printed line per call (rank 0: enabled=is_main()).
    The folder is made by the first record: a run that fails to start leaves nothing behind."""

    def __init__(self, out_dir, enabled):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")

    def log(self, step, metrics):
        if not self.enabled:
            return
        metrics = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": datetime.now().isoformat(timespec="seconds"), **metrics}) + "\n")
        tqdm.write(" | ".join([f"step {step}"] + [f"{k} {_format(v)}" for k, v in metrics.items()]))

    def truncate(self, step):
        """Drop the records after `step` (written by a run that was interrupted after its last checkpoint)."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(kept) < len(lines):
            with open(self.path + ".part", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".part", self.path)


def _format(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress_bar(total, initial=0, desc=None):
    """tqdm bar over steps, shown on rank 0 only."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not is_main(), dynamic_ncols=True)


def save_image_grid(images, path, nrow):
    """Save images in [-1, 1] [B,3,H,W] as one PNG grid (values clamped), creating parent folders."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torchvision.utils.save_image((images.detach().float().cpu().clamp(-1, 1) + 1) / 2, path, nrow=nrow)


def to_uint8(images):
    """[-1, 1] images [B,3,H,W] -> uint8 [B,H,W,3] on the CPU as the ADM evaluator's samples: clamp(127.5x + 128),
    truncated (exact for images read by the data sets here)."""
    return (127.5 * images.float() + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


# ---------------------------------------------------------------------------------------------------------------------
# Command line shared by train_ae.py and train_dit.py

def add_run_args(p):
    """The flags both trainers share: data, length, resume, loader, seed, memory, logging, checkpoints, numerics."""
    p.add_argument("--data", help="ImageFolder root (ImageNet train); synthetic images when omitted with --preset tiny")
    p.add_argument("--epochs", type=int, default=None, help="run length in epochs")
    p.add_argument("--max-steps", type=int, default=None, help="run length in optimizer steps (overrides --epochs)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="micro-batches per optimizer step: global batch = ranks × micro-batch × N (same update)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute block activations in backward: less memory, ~1/3 more compute, same gradients")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (in place: same checkpoints)")
    p.add_argument("--resume", default="auto", help="'auto' (newest readable checkpoint of the run), a path, or 'none'")
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--num-images", type=int, default=512, help="synthetic images of the tiny preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--max-nonfinite", type=int, default=20, help="stop after this many non-finite steps in a row")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast dtype of the forward")


def check_run_args(args):
    """Refuse flag values that would make a run do nothing or something else than asked, before any work."""
    positive = ["epochs", "max_steps", "grad_accum", "global_batch", "log_every", "ckpt_every", "sample_every", "keep",
                "max_nonfinite", "num_images"]
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be at least 0, got {args.num_workers}")


def apply_preset(parser, args, name, values):
    """Give the flags the user left at their parser default the preset's values, and say which ones changed."""
    changed = []
    for key, value in values.items():
        if getattr(args, key) == parser.get_default(key) and value != getattr(args, key):
            setattr(args, key, value)
            changed.append(f"--{key.replace('_', '-')} {value}")
    if changed:
        print0(f"{name}: {', '.join(changed)}")
