"""What a result's bits depend on besides the code and the params: recorded in every metrics.json.

On one machine kind (the same CPU capability), one torch build and one thread count, a run is repeatable to
the bit. Elsewhere the CPU kernels torch dispatches to (`cpu_capability`: AVX512, AVX2, DEFAULT...) may round
differently, so results agree only statistically (mean ± std over seeds). The environment variables of
`PINS`, set before torch starts, pin the instruction sets of torch's own kernels, of oneDNN (convolutions) and
of MKL (matrix products); docs/reproducibility.md says how and what it costs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import torchvision

KEY = "environment"  # the metrics.json key that holds it
PINS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")  # the variables that choose the CPU kernels


@dataclass(frozen=True)
class Environment:
    torch: str
    torchvision: str
    cpu_capability: str  # torch.backends.cpu.get_cpu_capability(): the kernels this process dispatches to
    threads: int  # torch.get_num_threads()
    device: str
    pins: dict[str, str]  # those of PINS that are set

    def as_dict(self) -> dict:
        return asdict(self)


def environment(device: torch.device | str = "cpu") -> Environment:
    """The torch and torchvision versions, CPU kernels, thread count and device this process computes with."""
    return Environment(torch=torch.__version__, torchvision=torchvision.__version__,
                       cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
                       device=str(device), pins={name: os.environ[name] for name in PINS if name in os.environ})
