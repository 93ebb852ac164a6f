"""Argument checks shared by the ``ltx2`` commands, cheap enough to run before anything is
built: argparse types for numbers and devices, whether a device exists here, whether an
output path can be written, and how much memory a device has free."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import torch

from .errors import GenerationInputError, InsufficientMemoryError

GIB = 2**30
#: Video containers ``encode_video`` writes (H.264 with an AAC track), by suffix.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv")


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def seed(text: str) -> int:
    """argparse type: a seed in [0, 2**63) (``torch.Generator.manual_seed`` takes it, and the tiny
    preset's per-component seeds above it)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {text!r}")
    return value


def device(text: str) -> torch.device:
    """argparse type: a torch device string (``cpu``, ``cuda``, ``cuda:1``); whether it exists
    here is :func:`check_device`'s call, made before anything is built."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: the pipeline runs on cpu, cuda[:N] or mps, "
                                         f"not on {parsed.type!r}")
    return parsed


def check_device(dev: torch.device, flag: str = "--device") -> None:
    """:class:`GenerationInputError` unless ``dev`` exists on this machine."""
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no GPU"
            raise GenerationInputError(f"{flag} {dev}: no CUDA device here ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise GenerationInputError(f"{flag} {dev}: this machine has {count} CUDA device(s), "
                                       f"cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise GenerationInputError(f"{flag} {dev}: no MPS device here; use --device cpu")


def check_output_path(flag: str, path: Path, suffixes: tuple[str, ...] | None = None,
                      missing_ok: bool = False) -> None:
    """:class:`GenerationInputError` unless ``path`` can be written as a file: its directory
    exists (``missing_ok``: or can be made in the nearest one that does), is a directory and
    takes a new file (probed with an anonymous temporary file), and the path itself is not a
    directory. Checked before the run, so a long run never ends in a failed write."""
    if path.is_dir():
        raise GenerationInputError(f"{flag} {str(path)!r} is a directory; give a file path inside it")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise GenerationInputError(f"{flag} {str(path)!r}: the video is written as H.264 + AAC; give a file "
                                   f"ending in {', '.join(suffixes)}")
    parent = path.parent
    for above in (parent, *parent.parents):
        if above.exists() and not above.is_dir():
            raise GenerationInputError(f"{flag} {str(path)!r}: {str(above)!r} is a file, not a directory")
    if not parent.exists() and not missing_ok:
        raise GenerationInputError(f"{flag} {str(path)!r}: the directory {str(parent)!r} does not exist; "
                                   "create it first")
    existing = next(d for d in (parent, *parent.parents) if d.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise GenerationInputError(f"{flag} {str(path)!r}: cannot write into {str(existing)!r} "
                                   f"({exc.strerror or exc}); pick a writable directory") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise GenerationInputError(f"{flag} {str(path)!r} exists and is not writable")


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_available() -> int | None:
    """What a cgroup v2 memory limit leaves (the limit the kernel's OOM killer enforces in a container)."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_memory(dev: torch.device) -> tuple[int, str] | None:
    """Bytes a run on ``dev`` can still allocate and where the figure comes from; ``None`` where
    it cannot be told. CUDA: the device's free memory. CPU: the host's available memory
    (``MemAvailable``, capped by a cgroup limit, else ``sysconf``)."""
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free), f"free on {dev}"
    if dev.type != "cpu":
        return None
    found = [(b, what) for b, what in ((_meminfo_available(), "available host memory"),
                                       (_cgroup_available(), "left under the cgroup memory limit"))
             if b is not None]
    if not found:
        try:
            found = [(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available host memory")]
        except (ValueError, OSError):
            return None
    return min(found)


def check_fits(what: str, need: int, dev: torch.device, breakdown: str, fix: str) -> None:
    """:class:`InsufficientMemoryError` when ``need`` bytes exceed what ``dev`` has free."""
    have = available_memory(dev)
    if have is not None and need > have[0]:
        raise InsufficientMemoryError(
            f"{what} needs at least {need / GIB:.1f} GiB on {dev} ({breakdown}), but {have[0] / GIB:.1f} GiB "
            f"are {have[1]}; {fix}")
