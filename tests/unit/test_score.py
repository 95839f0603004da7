"""`lmforge score` places the reward model like the other inference commands: on the GPU when there is one."""

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.serve.score import scoring_device


def test_score_runs_on_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert scoring_device("auto") == scoring_device("cuda") == "cuda"
    assert scoring_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert scoring_device("auto") == "cpu"
    with pytest.raises(LmforgeError, match="device cuda: no CUDA GPU is visible"):
        scoring_device("cuda")
