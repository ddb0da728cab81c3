"""The processes of a tensor-parallel group: rank 0 runs the scheduler (and the server), the other
ranks run `serve_as_worker`, following each step rank 0 broadcasts.

Started two ways. Alone, `detserve serve --tensor-parallel-size N` spawns ranks 1..N-1 on this
host and watches them: a worker that exits sets `TensorParallel.failure`, so the server reports
unhealthy at once, and rank 0's next collective fails instead of waiting. Under a launcher
(torchrun, a Kubernetes LeaderWorkerSet) every rank is a `detserve serve` of its own, placed by
the torchrun variables RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK for the GPU);
there a rank's death reaches rank 0 as a failed collective, at the latest by its next keepalive.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from detserve.engine.config import EngineConfig, ModelConfig
from detserve.engine.model_runner import ModelRunner, model_facts
from detserve.engine.models.llama import check_shardable
from detserve.engine.parallel import COLLECTIVE_TIMEOUT, Control, Layout, TensorParallel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of a group meet, and which one this process is."""

    rank: int
    size: int
    address: str
    port: int
    local_rank: int
    launched: bool = False  # by a launcher, whose variables say where (torchrun's agent store may serve)

    @classmethod
    def from_environment(cls) -> "Rendezvous | None":
        """The torchrun variables' rendezvous, or None when no launcher set them."""
        if "WORLD_SIZE" not in os.environ:
            return None
        rank = int(os.environ.get("RANK", "0"))
        return cls(rank, int(os.environ["WORLD_SIZE"]), os.environ.get("MASTER_ADDR", "127.0.0.1"),
                   int(os.environ.get("MASTER_PORT", "29500")), int(os.environ.get("LOCAL_RANK", rank)), True)


def launch(config: EngineConfig) -> TensorParallel:
    """Rank 0's group: alone for one rank; else joined with the launcher's ranks, or with workers it
    spawns on this host (watched from then on)."""
    size, splits = config.tensor_parallel_size, config.invariant_splits
    if size == 1:
        return TensorParallel(Layout(splits=splits))
    check_shardable(model_facts(config)[1], Layout(0, size, splits))  # before any process starts
    rendezvous = Rendezvous.from_environment()
    processes: list[multiprocessing.process.BaseProcess] = []
    if rendezvous is None:
        rendezvous = Rendezvous(0, size, "127.0.0.1", _free_port(), 0)
        processes = _spawn_workers(config, rendezvous)
    _check_rendezvous(config, rendezvous)
    if rendezvous.rank != 0:
        raise ValueError("only rank 0 runs the engine; the other ranks run serve_as_worker")
    tp = _join(config, rendezvous, processes)
    tp.processes = processes
    if processes:
        threading.Thread(target=_watch, args=(tp, processes), name="detserve-tp-watch", daemon=True).start()
    return tp


def rank_config(config: EngineConfig, local_rank: int) -> EngineConfig:
    """The config of one rank: on a GPU host, its own device (local rank r takes cuda:r)."""
    if config.tensor_parallel_size == 1 or config.torch_device().type != "cuda":
        return config
    return dataclasses.replace(config, device=f"cuda:{local_rank}")


def build_runner(config: EngineConfig, model_config: ModelConfig, model_dir: Path, max_model_len: int,
                 tp: TensorParallel) -> ModelRunner:
    """This rank's runner, once every rank has loaded its shard: a rank that failed raises its own
    error, the others a RuntimeError naming it, so no rank waits on one that is gone."""
    error: Exception | None = None
    try:
        runner = ModelRunner(config, model_config, model_dir, max_model_len, tp)
    except Exception as exc:
        error = exc
    try:
        tp.agree_loaded(None if error is None else f"{type(error).__name__}: {error}")
    except RuntimeError:
        tp.close()
        if error is not None:
            raise error
        raise
    return runner


def serve_as_worker(config: EngineConfig, rendezvous: Rendezvous) -> None:
    """A worker rank's life: join the group, load its shard, follow rank 0's steps until told to stop
    (or until rank 0 is gone, which fails the next collective)."""
    _check_rendezvous(config, rendezvous)
    config = rank_config(config, rendezvous.local_rank)
    tp = _join(config, rendezvous)
    model_dir, model_config, max_model_len = model_facts(config)
    runner = build_runner(config, model_config, model_dir, max_model_len, tp)
    try:
        while not isinstance(message := tp.broadcast(), Control) or message.kind != "stop":
            if not isinstance(message, Control):
                runner.follow(message)
    finally:
        tp.close()


def _check_rendezvous(config: EngineConfig, rendezvous: Rendezvous) -> None:
    if rendezvous.size != config.tensor_parallel_size:
        raise ValueError(f"WORLD_SIZE {rendezvous.size} is not --tensor-parallel-size "
                         f"{config.tensor_parallel_size}")


def _join(config: EngineConfig, rendezvous: Rendezvous,
          processes: list[multiprocessing.process.BaseProcess] | None = None) -> TensorParallel:
    """Join the group (gloo on CPU, NCCL on CUDA), each collective bounded by COLLECTIVE_TIMEOUT.

    Under a launcher, through env:// (which honours torchrun's agent store on MASTER_PORT). Spawned
    here, through a store rank 0 opens, where it first waits for its `processes` to check in, so
    a worker that dies before joining fails the start at once instead of after the timeout."""
    backend = "nccl" if config.torch_device().type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank_config(config, rendezvous.local_rank).torch_device())
    common = dict(rank=rendezvous.rank, world_size=rendezvous.size, timeout=COLLECTIVE_TIMEOUT)
    if rendezvous.launched:
        dist.init_process_group(backend, init_method="env://", **common)
    else:
        first = rendezvous.rank == 0
        store = dist.TCPStore(rendezvous.address, rendezvous.port, rendezvous.size, is_master=first,
                              timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
        if first:
            _await_check_ins(store, processes or [])
        else:
            store.add(_CHECKED_IN, 1)
        dist.init_process_group(backend, store=store, **common)
    layout = Layout(rendezvous.rank, rendezvous.size, config.invariant_splits)
    return TensorParallel(layout, dist.group.WORLD)


_CHECKED_IN = "detserve/checked-in"


def _await_check_ins(store: dist.TCPStore, processes: list[multiprocessing.process.BaseProcess]) -> None:
    """Until every spawned worker has checked in; a worker that exits first stops them all."""
    while store.add(_CHECKED_IN, 0) < len(processes):
        dead = [p for p in processes if p.exitcode is not None]
        if dead:
            for process in processes:
                process.kill()
            raise RuntimeError(f"tensor-parallel worker {dead[0].name} exited with status {dead[0].exitcode} "
                               "before it joined the group")
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_workers(config: EngineConfig, rendezvous: Rendezvous) -> list[multiprocessing.process.BaseProcess]:
    """Ranks 1..size-1 as fresh processes (spawned: a forked copy of a threaded server is unsafe),
    with rank 0's thread count."""
    context = multiprocessing.get_context("spawn")
    processes = []
    for rank in range(1, rendezvous.size):
        worker = dataclasses.replace(rendezvous, rank=rank, local_rank=rank)
        process = context.Process(target=_worker_main, args=(config, worker, torch.get_num_threads()),
                                  name=f"detserve-tp-rank{rank}", daemon=True)
        process.start()
        processes.append(process)
    return processes


def _worker_main(config: EngineConfig, rendezvous: Rendezvous, num_threads: int) -> None:
    torch.set_num_threads(num_threads)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rendezvous.rank} %(levelname)s %(message)s")
    serve_as_worker(config, rendezvous)


def _watch(tp: TensorParallel, processes: list[multiprocessing.process.BaseProcess]) -> None:
    """Wait for any worker to exit; unless the group is closing, that is the engine's failure."""
    ready = multiprocessing.connection.wait([p.sentinel for p in processes])  # exited; not yet reaped
    process = next(p for p in processes if p.sentinel in ready)
    with tp.reaping:  # close() may be reaping it now: one waitpid at a time
        process.join()
    if not tp.closing:
        tp.failure = f"tensor-parallel worker {process.name} exited with status {process.exitcode}"
        logger.error("%s: the engine is dead", tp.failure)
