"""host_allocator: which allocator a CPU training process is re-executed with (tests/integration/test_allocator_train.py
shows it really runs with it)."""

from pathlib import Path

import pytest

from lmforge import allocator
from lmforge.errors import LmforgeError

CPU = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture()
def installed(monkeypatch):
    """Pretend exactly the allocators in the returned set are installed."""
    present: set[str] = {"jemalloc", "tcmalloc"}
    monkeypatch.setattr(allocator, "find_library", lambda name: f"/lib/lib{name}.so" if name in present else None)
    return present


def test_auto_on_cpu_takes_tcmalloc_and_jemalloc_only_when_asked(installed):
    assert allocator.choose({}, CPU) == ("tcmalloc", "/lib/libtcmalloc.so")
    assert allocator.choose({"host_allocator": "jemalloc"}, CPU) == ("jemalloc", "/lib/libjemalloc.so")
    installed.discard("tcmalloc")
    assert allocator.choose({}, CPU) is None  # jemalloc kept the memory but lost a quarter of the speed
    installed.clear()
    assert allocator.choose({}, CPU) is None  # nothing installed: glibc, no error


def test_nothing_is_preloaded_when_the_user_or_a_gpu_says_otherwise(installed, monkeypatch):
    assert allocator.choose({"host_allocator": "system"}, CPU) is None
    assert allocator.choose({"release_host_memory": "true"}, CPU) is None  # a glibc setting: keep glibc
    assert allocator.choose({}, {**CPU, "LD_PRELOAD": "/opt/libtcmalloc.so.4"}) is None  # the user's own
    assert allocator.choose({}, {**CPU, allocator.MARKER: "jemalloc"}) is None  # already re-executed
    assert allocator.choose({"host_allocator": "jemaloc"}, CPU) is None  # the typed config names the typo
    monkeypatch.setattr(allocator, "_uses_gpu", lambda raw, environ: True)
    assert allocator.choose({}, {}) is None
    assert allocator.choose({"host_allocator": "tcmalloc"}, {}) == ("tcmalloc", "/lib/libtcmalloc.so")


def test_use_cpu_or_hidden_gpus_mean_cpu(monkeypatch):
    monkeypatch.setattr(Path, "exists", lambda self: str(self) == "/dev/nvidiactl")
    assert allocator._uses_gpu({}, {}) is True
    assert allocator._uses_gpu({"use_cpu": "true"}, {}) is False
    assert allocator._uses_gpu({}, {"CUDA_VISIBLE_DEVICES": "-1"}) is False


def test_an_explicit_allocator_that_is_missing_stops_the_run(installed):
    installed.clear()
    with pytest.raises(LmforgeError, match="host_allocator: jemalloc, but its library is not installed"):
        allocator.report("jemalloc", release_host_memory=False)
    allocator.report("auto", release_host_memory=False)  # auto without one is fine
