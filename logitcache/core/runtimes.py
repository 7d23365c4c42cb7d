"""The deployment runtimes, one registry: `logitcache export` builds, checks and times each; the CLI, the summary
and benchmarks/deployment.py show each. Adding a runtime is one entry here.

`build` is the function (or its "module:function" name, imported when exporting) that writes the runtime's file
into the export folder, if it has one, and returns the runtime (`logitcache.core.speed.Runtime`); it receives a
`logitcache.deploy.export.ExportJob`. `check` says how its predictions are judged against eager PyTorch's: "reference"
(it is eager PyTorch), "exact" (within export.atol, or the export is refused) or "compared" (accuracy, agreement and
the accuracy drop are reported: quantized runtimes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal


@dataclass(frozen=True)
class RuntimeSpec:
    label: str  # how tables name it, e.g. "ONNX Runtime fp32"
    short: str  # its prefix in the summary's columns (<short>_bytes, <short>_latency_ms)
    file: str | None  # the file it runs from in the export folder; None: the checkpoint itself
    build: Callable[[Any], Any] | str
    check: Literal["reference", "exact", "compared"]
    timed: bool = True  # batch-1 latency and throughput measured


RUNTIMES: dict[str, RuntimeSpec] = {
    "pytorch": RuntimeSpec("PyTorch eager", "eager", None, "logitcache.deploy.export:eager_runtime", "reference"),
    "pt2": RuntimeSpec("torch.export", "pt2", "model.pt2", "logitcache.deploy.export:program_runtime", "exact",
                       timed=False),
    "onnx_fp32": RuntimeSpec("ONNX Runtime fp32", "onnx", "model.onnx", "logitcache.deploy.export:onnx_fp32_runtime",
                             "exact"),
    "onnx_int8": RuntimeSpec("ONNX Runtime int8", "int8", "model.int8.onnx",
                             "logitcache.deploy.export:onnx_int8_runtime", "compared"),
}
