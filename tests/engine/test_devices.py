"""resolve_device: the one reading of the tools' `device=` option."""
from __future__ import annotations

import pytest
import torch

from detkit.utils.comm import resolve_device


def test_auto_picks_cuda_only_when_present():
    assert resolve_device("auto") == (torch.device("cuda", torch.cuda.current_device())
                                      if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", ""])
def test_unknown_devices_are_refused_by_name(name):
    with pytest.raises(ValueError, match=r"device must be auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_cuda_without_cuda_says_what_to_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also where a GPU is present
    with pytest.raises(ValueError, match=r"device=cuda:1 but CUDA is not available \(use device=cpu or device=auto\)"):
        resolve_device("cuda:1")
