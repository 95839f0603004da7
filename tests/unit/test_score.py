"""`lmforge score` places the reward model like the other inference commands (`inference_device`): on the GPU
when there is one."""

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model.adapters import inference_device


def test_score_runs_on_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_device("auto") == inference_device("cuda") == "cuda"
    assert inference_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_device("auto") == "cpu"
    with pytest.raises(LmforgeError, match="device cuda: no CUDA GPU is visible"):
        inference_device("cuda")
