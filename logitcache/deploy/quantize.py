"""int8 post-training quantization of an ONNX model with ONNX Runtime.

Static (QDQ, per-channel int8 weights, uint8 activations) calibrated on replayed training
views from the cache: the inputs the teacher saw. Dynamic (weights only, activations
quantized at run time) where there is no calibration cache or static quantization
does not apply to the model's operators.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from logitcache.cache.reader import Cache
from logitcache.core.data import Split
from logitcache.core.preprocess import BoxInput
from logitcache.core.views import BoxRenderer, Normalizer, ViewRenderer, render_rows


class _Batches(CalibrationDataReader):
    def __init__(self, name: str, images: np.ndarray, batch: int = 32):
        self.batches = iter([{name: images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)


def calibration_images(cache_path: str, train: Split, count: int, seed: int, prepare=None,
                       box: BoxInput | None = None) -> np.ndarray:
    """`count` seeded (sample, view) pairs of the training cache, rendered (box views at the model's `box.size`)
    and normalised (float32) by `prepare` (default: the data's normalisation)."""
    with Cache(cache_path) as cache:
        cache.check_matches(train)
        views = cache.view_params()
        spec = cache.spec
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(train), size=min(count, len(train)), replace=False))
    chosen = rng.integers(0, views.shape[1], size=len(rows))
    renderer = BoxRenderer(spec, box.size if box else None, box.interpolation if box else "bilinear") \
        if spec.boxes else ViewRenderer(spec)
    images = render_rows(renderer, train, rows, views[rows, chosen])
    return (prepare or Normalizer(train.mean, train.std))(images).numpy()


def quantize(fp32: Path, int8: Path, input_name: str, calibration: np.ndarray | None) -> str:
    """Write the int8 model; returns the method used ("static" or "dynamic: <why>")."""
    prepared = int8.with_name(int8.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(prepared))
    try:
        if calibration is None:
            method = "dynamic: no calibration cache"
        else:
            try:
                quantize_static(str(prepared), str(int8), _Batches(input_name, calibration), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
                return "static"
            except Exception as e:  # an operator static QDQ cannot calibrate: fall back to weights-only int8
                method = f"dynamic: static quantization failed ({str(e).strip().splitlines()[0][:120]})"
        quantize_dynamic(str(prepared), str(int8), weight_type=QuantType.QInt8)
        return method
    finally:
        prepared.unlink(missing_ok=True)
