"""The peak FLOP/s table: each device name torch reports finds its own row (most specific match wins)."""

from __future__ import annotations

import pytest

from hf_gpt2_train.mfu import mfu, peak_row, peak_tflops


@pytest.mark.parametrize(("name", "bf16", "fp8", "tf32"), [
    ("NVIDIA H100 80GB HBM3", 989.0, 1979.0, 494.5),  # SXM
    ("NVIDIA H100 PCIe", 756.0, 1513.0, 378.0),
    ("NVIDIA H100 NVL", 835.5, 1670.5, 417.5),
    ("NVIDIA H200", 989.0, 1979.0, 494.5),
    ("NVIDIA H200 NVL", 835.5, 1670.5, 417.5),  # not the H200 SXM row
    ("NVIDIA GH200 480GB", 989.0, 1979.0, 494.5),  # "GH200" is not the token "H200"
    ("NVIDIA A100-SXM4-80GB", 312.0, None, 156.0),
    ("NVIDIA A100 80GB PCIe", 312.0, None, 156.0),
    ("NVIDIA L40S", 362.05, 733.0, 183.0),
    ("NVIDIA L40", 181.05, 362.0, 90.5),  # not "L4", not "L40S"
    ("NVIDIA L4", 121.0, 242.5, 60.0),
])
def test_each_device_name_finds_its_own_row(name, bf16, fp8, tf32):
    assert peak_row(name) == (bf16, fp8, tf32)
    assert peak_tflops("bf16", name) == peak_tflops("fp16", name) == bf16
    assert peak_tflops("fp8-ao", name) == peak_tflops("fp8-te", name) == fp8
    assert peak_tflops("fp8-ao-emulated", name) == bf16  # emulation runs bf16 GEMMs
    assert peak_tflops("no", name) == tf32


def test_unknown_devices_get_no_peak_unless_given_one():
    for name in ("cpu", "AMD EPYC 7B13", "NVIDIA GeForce RTX 3090", "NVIDIA L4X", ""):
        assert peak_row(name) is None and peak_tflops("bf16", name) is None
    assert peak_tflops("no", "cpu", override=1.5) == 1.5
    assert peak_tflops("bf16", "NVIDIA H100 80GB HBM3", override=500.0) == 500.0  # the flag wins over the table
    assert mfu(1000.0, 1e9, None) is None
    assert mfu(1e5, 1e9, 200.0) == pytest.approx(0.5)
