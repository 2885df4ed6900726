"""The gradient projection's dtype: fixed choices, 'auto' by the device's native bf16, and bad values named."""

import pytest
import torch

from crispedit_easyedit import precision
from crispedit_easyedit.precision import gradient_projection_dtype, native_bf16


def test_fixed_choices_ignore_the_device(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert gradient_projection_dtype("basis", "cpu") is None
    assert gradient_projection_dtype("bfloat16", "cpu") is torch.bfloat16


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, None)])
def test_auto_follows_the_devices_native_bf16(monkeypatch, native, expected):
    seen = []
    monkeypatch.setattr(precision, "native_bf16", lambda device: seen.append(device) or native)
    assert gradient_projection_dtype("auto", "cpu") is expected
    assert seen == ["cpu"]


def test_native_bf16_on_cpu_is_torchs_cpuid_check():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bf16("cpu") is expected
    assert native_bf16(torch.device("cpu")) is expected


def test_native_bf16_is_false_where_there_is_no_hardware():
    assert native_bf16("meta") is False
    if not torch.cuda.is_available():
        assert native_bf16("cuda") is False


def test_a_bad_choice_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"must be one of 'basis', 'bfloat16', 'auto'; got 'fp8'"):
        gradient_projection_dtype("fp8", "cpu")
