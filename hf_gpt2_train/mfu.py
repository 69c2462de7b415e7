"""Peak dense TFLOP/s of known GPUs and model FLOPs utilisation (MFU).

The table holds NVIDIA's published datasheet figures, halved where the datasheet quotes them "with sparsity"
(2:4 structured sparsity doubles the dense figure; training matmuls are dense). Sources:

* H100 SXM / H100 NVL: https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM: BF16 1,979*, FP8 3,958*,
  TF32 989*; H100 NVL: BF16 1,671*, FP8 3,341*, TF32 835*). H100 PCIe: the H100 PCIe datasheet
  (BF16 1,513*, FP8 3,026*, TF32 756*).
* H200 SXM / H200 NVL: https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM as H100 SXM; H200 NVL:
  BF16 1,671*, FP8 3,341*, TF32 835*). GH200: https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/
  (the H100 SXM figures).
* A100: https://www.nvidia.com/en-us/data-center/a100/ (BF16 312 dense, TF32 156 dense; no fp8).
* L40S: https://www.nvidia.com/en-us/data-center/l40s/ (BF16 362.05 | 733*, FP8 733 | 1,466*, TF32 183 | 366*).
  L40: the L40 datasheet (BF16 181.05 | 362.1*, FP8 362 | 724*, TF32 90.5 | 181*).
* L4: https://www.nvidia.com/en-us/data-center/l4/ (BF16 242*, FP8 485*, TF32 120*).

(* = with sparsity.) The datasheets' dense H100 SXM bf16 figure, 989 TFLOP/s, is the issue's MFU reference.
"""

from __future__ import annotations

import re

import torch

# Device-name tokens -> dense (bf16/fp16, fp8 or None, tf32) TFLOP/s. A row matches when all its tokens are whole
# tokens of the name (split at anything not a letter or digit, case-insensitive), and the row with the most
# tokens wins: "NVIDIA H200 NVL" is the NVL row, not the H200 SXM row; "NVIDIA L40" is not "L4" or "L40S";
# "NVIDIA GH200 480GB" is not "H200". torch reports e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
# "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S", "NVIDIA L4".
PEAK_TFLOPS: dict[tuple[str, ...], tuple[float, float | None, float]] = {
    ("H100",): (989.0, 1979.0, 494.5),  # SXM (and any H100 name without PCIe/NVL)
    ("H100", "PCIE"): (756.0, 1513.0, 378.0),
    ("H100", "NVL"): (835.5, 1670.5, 417.5),
    ("H200",): (989.0, 1979.0, 494.5),  # SXM
    ("H200", "NVL"): (835.5, 1670.5, 417.5),
    ("GH200",): (989.0, 1979.0, 494.5),
    ("A100",): (312.0, None, 156.0),
    ("L40S",): (362.05, 733.0, 183.0),
    ("L40",): (181.05, 362.0, 90.5),
    ("L4",): (121.0, 242.5, 60.0),
}


def peak_row(device_name: str) -> tuple[float, float | None, float] | None:
    """The PEAK_TFLOPS row of a device name (most specific match), or None for an unknown device."""
    tokens = set(re.split(r"[^0-9A-Z]+", device_name.upper()))
    matches = [key for key in PEAK_TFLOPS if all(t in tokens for t in key)]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def peak_tflops(effective: str, device_name: str | None = None, override: float = 0.0) -> float | None:
    """Peak dense TFLOP/s the MFU of a run with ``effective`` precision is measured against.

    ``override`` (RunConfig.device_peak_tflops) wins. Otherwise the table above by device name: fp8 runs
    (real, not emulated) against the fp8 peak, bf16/fp16 against the bf16 peak, fp32 ('no') against TF32. Unknown
    devices (CPUs included) give None: no MFU rather than a made-up one.
    """
    if override > 0:
        return override
    if device_name is None:
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    row = peak_row(device_name)
    if row is None:
        return None
    bf16, fp8, tf32 = row
    if effective in ("fp8-te", "fp8-ao"):
        return fp8
    return tf32 if effective in ("no", "fp32") else bf16


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: tokens/s * training FLOPs per token / peak FLOP/s (None without a peak)."""
    if not peak:
        return None
    return tokens_per_sec * flops_per_token / (peak * 1e12)
