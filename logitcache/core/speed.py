"""How fast a model runs on this machine: the one timing implementation of students' runs and of `export`.

A runtime is a function from a float32 batch (numpy, N x C x H x W, normalised) to logits, so eager
PyTorch, a torch.export program and ONNX Runtime sessions are timed by the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

Runtime = Callable[[np.ndarray], np.ndarray]


def torch_runtime(model: nn.Module, device: torch.device | str = "cpu") -> Runtime:
    """An eval-mode model (on `device`), or a loaded torch.export program's module."""
    device = torch.device(device)

    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x).to(device)).float().cpu().numpy()  # .cpu() waits for a GPU to finish

    return run


def timings(run: Runtime, x: np.ndarray, runs: int, warmup: int) -> np.ndarray:
    """Seconds per call over `runs` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        run(x)
    out = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        run(x)
        out[i] = time.perf_counter() - start
    return out


def latency(run: Runtime, image: np.ndarray, runs: int, warmup: int) -> dict:
    """Batch 1: median and p90 latency (ms) of one image."""
    single = timings(run, image[None], runs, warmup)
    return {"latency_ms": float(np.median(single) * 1000), "latency_p90_ms": float(np.percentile(single, 90) * 1000)}


def throughput(run: Runtime, image: np.ndarray, runs: int, warmup: int, batch: int = 256) -> dict:
    """Images per second at batch `batch`, from the median batch time."""
    full = timings(run, np.repeat(image[None], batch, axis=0), runs, warmup)
    return {"throughput_img_s": float(batch / np.median(full))}
