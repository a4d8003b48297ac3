"""Device selection: auto falls back to the CPU here, and an absent device is one clear error."""
import pytest
import torch

from mmsearch.towers.devices import resolve_device
from mmsearch.errors import DeviceError


def test_auto_picks_cuda_then_mps_then_cpu():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_asked_for_but_absent_is_a_clear_error(name):
    with pytest.raises(DeviceError, match=r"--device cuda.*(no CUDA|CUDA support).*auto or cpu"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu:0"])
def test_unknown_device_names_are_refused(name):
    with pytest.raises(DeviceError):
        resolve_device(name)
