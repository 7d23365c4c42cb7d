"""What a deployed model costs on this CPU: latency at batch 1 and throughput at batch 256, per runtime.

A runtime is a function from a float32 batch (numpy, N x C x H x W, normalised) to logits,
so eager PyTorch, a torch.export program and ONNX Runtime sessions are measured and
checked by the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

Runtime = Callable[[np.ndarray], np.ndarray]


def torch_runtime(model: nn.Module) -> Runtime:
    """An eval-mode model, or a loaded torch.export program's module."""

    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).float().numpy()

    return run


def onnx_runtime(path, threads: int) -> Runtime:
    """An ONNX Runtime CPU session with `threads` intra-op threads (one inter-op thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def predict(run: Runtime, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """Logits of every image, in batches."""
    return np.concatenate([run(images[i:i + batch]) for i in range(0, len(images), batch)])


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


def speed(run: Runtime, image: np.ndarray, latency_runs: int, throughput_runs: int, warmup: int) -> dict:
    """Batch 1: median and p90 latency (ms); batch 256: throughput (images/s) from the median batch time."""
    single = timings(run, image[None], latency_runs, warmup)
    full = timings(run, np.repeat(image[None], 256, axis=0), throughput_runs, max(1, warmup // 10))
    return {"latency_ms": float(np.median(single) * 1000), "latency_p90_ms": float(np.percentile(single, 90) * 1000),
            "throughput_img_s": float(256 / np.median(full))}
