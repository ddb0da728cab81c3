"""Pinned Triton tile configurations per GPU architecture; part of the system fingerprint.

Why pinned: a reduction's bits follow from its tiling (the tile shapes fix the MMA instruction,
the split-K count fixes the fold order), so invariant mode never autotunes. Changing a number here
changes `kernels.config_digest()` and therefore the fingerprint, exactly as it changes the bits.
Pure Python on purpose: the digest can be computed without importing triton or touching a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass


# Every invariant launch compiles with FMA contraction off: each multiply and add rounds on its own,
# as in the torch reference, whatever the compiler would fuse per kernel (and whatever Triton's
# default, which TRITON_DEFAULT_FP_FUSION and Triton 3.10 change). Part of the digest.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@dataclass(frozen=True)
class MatmulConfig:
    """One tiling for every M, and the rule's inputs that pin the split-K count S per (N, K)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int  # tile order for L2 reuse: changes which program runs when, never the bits
    num_warps: int
    num_stages: int
    target_programs: int  # about one wave of programs: caps S, and picks the parallel-split launch
    max_splits: int
    min_k_tiles_per_split: int  # a split shorter than this pays more in pipeline restarts than it gains
    tma: bool = False  # load tiles with Hopper's bulk tensor copies (TMA) instead of per-thread copies
    last_split_folds: bool = False  # parallel splits: a tile's last program folds them (no second launch)


@dataclass(frozen=True)
class AttentionConfig:
    """Fixed query-row and key tiles; the KV split size itself is contract.KV_SPLIT_SIZE."""

    block_m: int  # rows per program: query tokens x the query heads of one KV head
    block_n: int  # keys per tile; must divide KV_SPLIT_SIZE so tiles never straddle a split
    num_warps: int
    num_stages: int
    last_split_merges: bool = False  # decode splits: an item's last split program merges them (no second launch)


@dataclass(frozen=True)
class RowConfig:
    """Row-wise reductions: one row per program, a block size fixed by the row length alone."""

    softmax_block: int  # vocab entries per step of the log-softmax loop
    softmax_warps: int
    norm_max_warps: int  # RMSNorm warps = min(next_pow2(hidden) // 512, this), at least 1


@dataclass(frozen=True)
class ArchConfig:
    matmul: MatmulConfig  # for every weight shape without an entry below
    attention: AttentionConfig
    rows: RowConfig
    matmul_by_shape: tuple[tuple[tuple[int, int], MatmulConfig], ...] = ()  # ((N, K), config): tuned per weight

    def matmul_for(self, n: int, k: int) -> MatmulConfig:
        """The one tiling for a weight [N, K]: a function of the weight's shape, never of M."""
        return dict(self.matmul_by_shape).get((n, k), self.matmul)


PINNED: dict[tuple[int, int], ArchConfig] = {
    # sm_90 (H100/H200): 128x128x64 tiles let Triton issue wgmma on a warpgroup pair (8 warps);
    # 132 SMs, so S is capped where N-tiles x S first fills about one wave.
    (9, 0): ArchConfig(
        matmul=MatmulConfig(
            block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3,
            target_programs=132, max_splits=16, min_k_tiles_per_split=8,
        ),
        attention=AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
        rows=RowConfig(softmax_block=4096, softmax_warps=8, norm_max_warps=8),
        # From `bench.kernels --sweep` on an H200 (2026-11-30, torch 2.11, triton 3.6), then checked by
        # the `gpu` tests and timed by `bench.kernels` there: geomean over M = 1..8192 of invariant /
        # cuBLAS time, 1.24x in CUDA graphs and 1.23x eager (the default tiling: 1.33x and 1.33x).
        matmul_by_shape=(
            ((14336, 4096), MatmulConfig(
                block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=4,
                target_programs=132, max_splits=16, min_k_tiles_per_split=8,
            )),
        ),
    ),
}

DEFAULT = ArchConfig(
    # Small tiles that fit the shared memory of any CUDA GPU Triton supports (sm_80 and later).
    matmul=MatmulConfig(
        block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=3,
        target_programs=108, max_splits=16, min_k_tiles_per_split=8,
    ),
    attention=AttentionConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),
    rows=RowConfig(softmax_block=2048, softmax_warps=8, norm_max_warps=8),
)


def for_capability(capability: tuple[int, int]) -> ArchConfig:
    """The pinned configuration for a CUDA compute capability, or the safe default."""
    return PINNED.get(tuple(capability), DEFAULT)


def digest(capability: tuple[int, int], triton_version: str) -> str:
    """The pinned configuration in effect on `capability`, as a string for the fingerprint."""
    major, minor = capability
    return f"triton-{triton_version}:sm{major}{minor}:{LAUNCH_OPTIONS}:{for_capability(capability)!r}"
