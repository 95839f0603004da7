"""`lmforge train` with every loss of one optimizer step made NaN on one rank only (run under torchrun).

POISON_STEP and POISON_RANK (environment) choose the step and the rank; the loss keeps its graph, as a real NaN
would, so backward and DDP's gradient all-reduce still run on every rank.
"""

import os
import sys

import torch

from lmforge.cli import main
from lmforge.train import trainer as trainer_module

STEP, RANK = int(os.environ["POISON_STEP"]), int(os.environ["POISON_RANK"])


def poisoned(original):
    def model_loss(self, model, inputs, *args, **kwargs):
        result = original(self, model, inputs, *args, **kwargs)
        if model.training and self.state.global_step + 1 == STEP and self.args.process_index == RANK:
            return result * float("nan") if isinstance(result, torch.Tensor) else (result[0] * float("nan"), *result[1:])
        return result

    return model_loss


for cls in (trainer_module.EngineMixin, trainer_module.LmforgeTrainer):
    cls._model_loss = poisoned(cls.__dict__["_model_loss"])

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
