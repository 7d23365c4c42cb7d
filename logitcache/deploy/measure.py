"""What a deployed model costs on this CPU: latency at batch 1 and throughput at batch 256, per runtime.

The runtimes and their timing are `logitcache.core.speed`'s, shared with the students' runs; this module adds
ONNX Runtime sessions and whole-split predictions.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from logitcache.core.speed import Runtime, latency, throughput, torch_runtime

__all__ = ["Runtime", "onnx_runtime", "predict", "speed", "torch_runtime"]


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


def speed(run: Runtime, image: np.ndarray, latency_runs: int, throughput_runs: int, warmup: int) -> dict:
    """Batch 1: median and p90 latency (ms); batch 256: throughput (images/s) from the median batch time."""
    return {**latency(run, image, latency_runs, warmup),
            **throughput(run, image, throughput_runs, max(1, warmup // 10))}
