"""Tensor parallelism whose bits do not depend on the number of ranks: the layout and the collectives.

A model on `size` ranks splits as Megatron and vLLM split it: q|k|v and gate|up by output columns
(each rank its heads and its share of the MLP's columns), o and down by inputs (row-parallel: each
rank the inputs its heads and columns produced), the embedding and the LM head by vocabulary.
Column pieces are exact: the integer kernels compute an output column the same way whatever the
columns per call (tests/engine/test_tensor_parallel.py proves it), so a rank's columns are those
columns at TP 1.

The row-parallel sum is where the TP size would leak in: an all-reduce adds the ranks' partials in
an order of its algorithm and world size. So every row-parallel matmul reduces over K in `splits`
(S) fixed K-splits whatever the TP size: each split's partial is one kernel call over its inputs,
kept in float32, and the S partials are summed in order 0..S-1 after an all-gather. TP 1 computes
all S partials itself, TP N S/N per rank: the same partials, the same fold, the same bits at every
TP size that divides S. Fast mode folds a rank's own partials and all-reduces them.

`TensorParallel` alone (size 1, no process group) makes every collective the identity, so the one
model code serves both. The processes behind a group are `workers.py`'s.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing.process
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from detserve import kernels
from detserve.kernels import PackedWeight

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
"""The longest a rank waits in one collective: a live rank that stops answering fails the engine
after this, while an idle server keeps the ranks talking (`KEEPALIVE_SECONDS`)."""

KEEPALIVE_SECONDS = 60.0
"""How often an idle rank 0 tells the workers it is alive, well inside `COLLECTIVE_TIMEOUT`."""

VOCAB_ALIGN = 16
"""A vocabulary shard's rows are a multiple of this: the 4-bit kernel packs outputs 16 at a time."""


@dataclass(frozen=True)
class Layout:
    """Which rank of how many this is, and the K-splits S of every row-parallel matmul."""

    rank: int = 0
    size: int = 1
    splits: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in a group of {self.size}")
        if self.splits % self.size:
            raise ValueError(f"--tp-invariant-splits {self.splits} must be a multiple of "
                             f"--tensor-parallel-size {self.size}")

    def part(self, total: int, what: str) -> tuple[int, int]:
        """This rank's [start, end) of `total` things (heads, columns) cut in `size` equal parts."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) do not split over --tensor-parallel-size {self.size}")
        n = total // self.size
        return self.rank * n, (self.rank + 1) * n

    def input_splits(self, total: int, what: str) -> list[tuple[int, int]]:
        """[start, end) of this rank's K-splits of a row-parallel weight with `total` inputs, in
        split order: S equal splits whatever the size, S / size of them per rank."""
        if total % self.splits:
            raise ValueError(f"{what} ({total} inputs) do not cut into --tp-invariant-splits {self.splits}")
        width, per_rank = total // self.splits, self.splits // self.size
        first = self.rank * per_rank
        return [(s * width, (s + 1) * width) for s in range(first, first + per_rank)]

    def vocab_part(self, vocab: int) -> tuple[int, int]:
        """[start, end) of this rank's vocabulary rows: the whole vocabulary alone, else equal shards
        of a multiple of VOCAB_ALIGN rows, the last one padded past the vocabulary."""
        if self.size == 1:
            return 0, vocab
        rows = -(-vocab // self.size)
        rows = -(-rows // VOCAB_ALIGN) * VOCAB_ALIGN
        return self.rank * rows, (self.rank + 1) * rows


class RankLostError(RuntimeError):
    """A collective failed: another rank of the group is gone (or stopped answering)."""


@dataclass(frozen=True)
class Control:
    """What rank 0 broadcasts between steps: keep waiting, or stop."""

    kind: str  # "keepalive" | "stop"


class TensorParallel:
    """The collectives of one sharded forward pass, on `group`; alone, each is the identity.

    `failure` is set (by `workers.py`'s watcher) when a local worker process exits: the engine is
    dead from then on, whether or not a collective has noticed yet. `broken` is set when a step
    stopped half way (a collective failed, or rank 0 raised within it): the ranks may then wait in
    different collectives, so closing tells them nothing more.
    """

    def __init__(self, layout: Layout, group: dist.ProcessGroup | None = None) -> None:
        if (group is None) != (layout.size == 1):
            raise ValueError("a process group is needed exactly when there are several ranks")
        self.layout = layout
        self.group = group
        self.failure: str | None = None
        self.broken = False
        self.closing = False
        self.processes: list[multiprocessing.process.BaseProcess] = []  # workers this rank started
        # Held while a worker is reaped: two threads waiting on one child (close() and the watcher)
        # race in waitpid, and the loser reads ECHILD as "still running".
        self.reaping = threading.Lock()
        self._last_message = time.monotonic()

    @property
    def is_first(self) -> bool:
        return self.layout.rank == 0

    @contextlib.contextmanager
    def _collective(self) -> Iterator[None]:
        """Say which failure a failed collective is (gloo's own message speaks of pairs and sockets)."""
        try:
            yield
        except RuntimeError as exc:
            self.broken = True
            raise RankLostError(f"a tensor-parallel worker is gone ({str(exc).splitlines()[0][:300]})") from exc

    def row_linear(self, x: torch.Tensor, splits: list[torch.Tensor | PackedWeight]) -> torch.Tensor:
        """x [T, K_rank] @ W.T for a row-parallel weight given as this rank's K-splits -> [T, N], equal
        at every TP size that divides S in invariant mode (see the module docstring)."""
        if len(splits) == 1 and self.group is None:
            return kernels.linear(x, splits[0])
        return self._reduce(kernels.linear_partials(x, splits), x.dtype)

    def row_input_dtype(self, splits: list[torch.Tensor | PackedWeight]) -> torch.dtype | None:
        """The dtype `row_linear(x, splits)` should get x in (`kernels.matmul_input_dtype`): where it
        is one plain matmul; K-splits slice x and fold float32 partials, so x keeps its dtype there."""
        if len(splits) == 1 and self.group is None:
            return kernels.matmul_input_dtype(splits[0])
        return None

    def row_grouped_linear(self, x: torch.Tensor, splits: list, counts: list[int]) -> torch.Tensor:
        """`row_linear` for a mixture of experts' down projection (`kernels.grouped_linear`): x's rows
        sorted by expert, `counts[e]` of expert e, and each split a K-split of every expert."""
        if len(splits) == 1 and self.group is None:
            return kernels.grouped_linear(x, splits[0], counts)
        return self._reduce(kernels.linear_partials(x, splits, counts), x.dtype)

    def _reduce(self, partials: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """This rank's S / size float32 partials [T, N] -> the sum over every rank's, in `dtype`."""
        if kernels.current_mode() == "invariant":
            total = kernels.fold_partials(self._all_gather(partials))
        else:
            total = kernels.fold_partials(partials)
            if self.group is not None:
                with self._collective():
                    dist.all_reduce(total, group=self.group)
        return total.to(dtype)

    def _all_gather(self, partials: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Every rank's partials, in rank (hence split) order: S planes [T, N]."""
        if self.group is None:
            return partials
        mine = torch.stack(partials)
        gathered = [torch.empty_like(mine) for _ in range(self.layout.size)]
        with self._collective():
            dist.all_gather(gathered, mine, group=self.group)
        return torch.cat(gathered)

    def embed(self, ids: torch.Tensor, lookup: Callable[[torch.Tensor], torch.Tensor], start: int, end: int
              ) -> torch.Tensor:
        """[T] token ids -> [T, hidden] from a vocabulary-parallel table holding rows start..end-1:
        each rank looks up its own tokens and writes -0.0 elsewhere, and the sum over ranks is exact
        in any order, since -0.0 + x == x for every x (even +-0.0)."""
        if self.group is None:
            return lookup(ids)
        mine = (ids >= start) & (ids < end)
        rows = lookup(torch.where(mine, ids - start, 0))
        rows = torch.where(mine[:, None], rows, torch.tensor(-0.0, dtype=rows.dtype, device=rows.device))
        with self._collective():
            dist.all_reduce(rows, group=self.group)
        return rows

    def gather_logits(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """This rank's vocabulary columns of the logits [S, V_rank] -> the whole [S, V] on rank 0
        (which samples), None elsewhere."""
        if self.group is None:
            return logits
        logits = logits.contiguous()
        parts = [torch.empty_like(logits) for _ in range(self.layout.size)] if self.is_first else None
        with self._collective():
            dist.gather(logits, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=1)[:, :vocab_size] if parts is not None else None

    def broadcast(self, message: Any = None) -> Any:
        """Rank 0's `message` (a step's inputs or a `Control`) on every rank."""
        if self.group is None:
            return message
        if self.failure is not None:
            raise RankLostError(self.failure)
        box = [message]
        with self._collective():
            dist.broadcast_object_list(box, src=0, group=self.group)
        self._last_message = time.monotonic()
        return box[0]

    def keepalive(self) -> None:
        """Rank 0, idle: tell the workers it is alive once KEEPALIVE_SECONDS have passed since the
        last message (they would time out otherwise), and find out whether they are."""
        if self.group is not None and time.monotonic() - self._last_message >= KEEPALIVE_SECONDS:
            self.broadcast(Control("keepalive"))

    def close(self) -> None:
        """Leave the group; rank 0 first tells the workers to stop and then waits for those it started."""
        if self.group is None:
            return
        self.closing = True
        if self.is_first and self.failure is None and not self.broken:
            try:
                self.broadcast(Control("stop"))
            except RankLostError:  # a worker is gone already: nothing to tell it
                pass
        dist.destroy_process_group()
        self.group = None
        with self.reaping:
            for process in self.processes:
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
                    process.join(timeout=10)  # reaped, so it no longer counts among the live children

    def agree_loaded(self, error: str | None) -> None:
        """Every rank says whether it loaded its shard; raises on each if any did not."""
        if self.group is None:
            if error:
                raise RuntimeError(error)
            return
        errors: list[str | None] = [None] * self.layout.size
        with self._collective():
            dist.all_gather_object(errors, error, group=self.group)
        failed = [f"rank {rank}: {e}" for rank, e in enumerate(errors) if e]
        if failed:
            raise RuntimeError("tensor-parallel ranks failed to load: " + "; ".join(failed))
