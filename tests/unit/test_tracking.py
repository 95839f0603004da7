"""check_trackers: a tracker named in report_to without its package is refused with the extra to install."""

import importlib.util

import pytest

from lmforge.errors import LmforgeError
from lmforge.train.tracking import check_trackers, requested_trackers

TRACKERS = ["tensorboard", "wandb", "swanlab"]


@pytest.fixture()
def installed(monkeypatch):
    """A dict of package name -> installed or not, that importlib.util.find_spec answers from first."""
    packages: dict[str, bool] = {}
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name in packages:
            return object() if packages[name] else None
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return packages


@pytest.mark.parametrize("report_to, names", [
    (None, []), ("none", []), (["none"], []), ("all", []), (["all"], []), ([], []),
    ("wandb", ["wandb"]), (["tensorboard", "swanlab"], ["tensorboard", "swanlab"]),
])
def test_requested_trackers(report_to, names):
    assert requested_trackers(report_to) == names


def test_installed_trackers_pass():
    check_trackers(TRACKERS)  # the dev extra installs all three


@pytest.mark.parametrize("tracker", TRACKERS)
def test_a_missing_tracker_names_its_extra(installed, tracker):
    installed.update({tracker: False, "tensorboardX": False})
    for report_to in (tracker, TRACKERS):
        with pytest.raises(LmforgeError) as err:
            check_trackers(report_to)
        assert str(err.value) == f"report_to {tracker} needs the {tracker} package: pip install 'lmforge[{tracker}]'"


def test_only_requested_trackers_are_checked(installed):
    installed.update(dict.fromkeys([*TRACKERS, "tensorboardX"], False))
    for report_to in ("none", ["none"], "all", None, [], ["mlflow"]):  # mlflow: left to transformers
        check_trackers(report_to)


def test_tensorboardx_serves_tensorboard(installed):
    """transformers' TensorBoardCallback falls back to tensorboardX's SummaryWriter without tensorboard."""
    installed.update({"tensorboard": False, "tensorboardX": True})
    check_trackers("tensorboard")
