"""StopOnSignal: a signal seen by one rank stops every rank at the same step."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, port: int, results: "mp.Queue") -> None:
    from lmforge.train.callbacks import StopOnSignal

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stop = StopOnSignal()
    if rank == 0:
        stop.signal = signal.SIGTERM  # only rank 0 was sent SIGTERM
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    stop.on_step_end(SimpleNamespace(device=torch.device("cpu")), None, control)
    results.put((rank, control.should_save, control.should_training_stop, stop.signal))
    dist.destroy_process_group()


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert got == [(0, True, True, signal.SIGTERM), (1, True, True, signal.SIGTERM)]
