"""Compile every invariant Triton kernel for a GPU without a GPU, and report what the compiler made of it.

Triton compiles ahead of time to PTX and, with the ptxas it ships, to a cubin for any NVIDIA
target; no driver or device is involved. So on a CPU-only machine this checks what the
interpreter cannot: that each kernel compiles at its pinned configuration for sm_90 (H100/H200)
and sm_80 (the default tiles) with real model shapes, whether the matmul reached Hopper's
warpgroup MMA (`wgmma`) or fell back to `mma.sync`, and each kernel's registers, spills and
shared memory. Arguments are specialised as a real launch specialises them (unit strides become
constants, integers divisible by 16 carry that fact, pointers are 16-byte aligned) with the values
an 8B-shape step passes, so the binaries are the ones a launch would build. That matters: without
the divisibility of K the compiler cannot vectorize the K-masked loads, and the matmul then shows
255 registers and spills that a real launch never has.

Run it with TRITON_INTERPRET unset (the interpreter replaces the kernels with Python functions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Pointers that are not in the activation dtype.
_POINTER_DTYPES = {"part_ptr": "fp32", "part_o_ptr": "fp32", "part_ml_ptr": "fp32", "tables_ptr": "i32",
                   "items_ptr": "i32", "programs_ptr": "i32", "arrivals_ptr": "i32", "logits_ptr": "fp32",
                   "tokens_ptr": "i64", "temperature_ptr": "fp64", "seed_ptr": "i64", "position_ptr": "i64",
                   "pos_ptr": "i64", "cos_sin_ptr": "fp32"}
_FLOAT_ARGS = {"eps", "qk_scale"}


@dataclass
class CompiledKernel:
    arch: str
    kernel: str
    variant: str
    dtype: str
    seconds: float
    registers: int
    stack_bytes: int  # per thread; nonzero = register spills
    shared_bytes: int
    mma: str  # "wgmma", "mma.sync" or "none"
    async_copy_bytes: list[int]  # distinct sizes of its global -> shared async copies (16 = vectorized)
    tma: bool  # loads tiles with Hopper's bulk tensor copies (cp.async.bulk.tensor)
    atomics: list[str]  # distinct global atomic instructions, with their scope and ordering


def _ast_source(fn: Any, dtype: str, constexprs: dict[str, Any], ints: dict[str, int]) -> Any:
    """The kernel as a launch with these integer arguments would specialise it (Triton's rule: an
    integer equal to 1 becomes a constant, one divisible by 16 is marked so, a pointer is marked
    16-byte aligned; never for parameters the kernel excludes from specialisation)."""
    from triton.compiler import ASTSource

    signature, constants, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constants[(i,)] = constexprs[name]
        elif name.endswith("_ptr"):
            signature[name] = "*" + _POINTER_DTYPES.get(name, dtype)
            if not (param.do_not_specialize or param.do_not_specialize_on_alignment):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        elif param.do_not_specialize:
            signature[name] = "i32"
        elif ints[name] == 1:
            signature[name] = "constexpr"
            constants[(i,)] = 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of the cubin, from the cuobjdump Triton ships.

    A stack frame in these kernels means register spills: they call no functions.
    """
    import triton.backends.nvidia as nvidia

    cuobjdump = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        result = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)],
                                capture_output=True, text=True, check=True)
    usage = re.search(r"REG:(\d+) STACK:(\d+)", result.stdout)
    if usage is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {result.stdout[-500:]}")
    return int(usage.group(1)), int(usage.group(2))


def plans(hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int, head_dim: int) -> list[tuple]:
    """(kernel, variant, constexprs(config), launch options(config), integer arguments(config)) for
    every kernel an 8B-shape model runs; the integers are those of one decode step (the o_proj matmul,
    a q view of the fused qkv output, a 16-token page) and decide the launch's specialisation."""
    import triton

    from detserve.kernels import elementwise, matmul, paged_attention, rmsnorm, sampling

    def o_proj(config):
        return config.matmul_for(hidden, hidden)

    def mm(config, has_bias, tma=False, last_folds=False):
        tiles = o_proj(config)
        return dict(BM=tiles.block_m, BN=tiles.block_n, BK=tiles.block_k, PRECISION="tf32", HAS_BIAS=has_bias,
                    GROUP_M=tiles.group_m, TMA=tma, LAST_FOLDS=last_folds)

    def mm_opts(config):
        return dict(num_warps=o_proj(config).num_warps, num_stages=o_proj(config).num_stages)

    def mm_ints(config):
        splits = matmul.num_k_splits(hidden, hidden, o_proj(config))
        k_per_split = triton.cdiv(triton.cdiv(hidden, o_proj(config).block_k), splits) * o_proj(config).block_k
        return dict(N=hidden, K=hidden, S=splits, K_PER_SPLIT=k_per_split, stride_am=hidden, stride_ak=1,
                    stride_bn=hidden, stride_bk=1)

    def attn(config, last_merges=False):
        return dict(G=heads // kv_heads, BLOCK_M=config.attention.block_m, BLOCK_N=config.attention.block_n,
                    HEAD=triton.next_power_of_2(head_dim), PRECISION="tf32", LAST_MERGES=last_merges)

    def attn_opts(config):
        return dict(num_warps=config.attention.num_warps, num_stages=config.attention.num_stages)

    def attn_ints(config):
        return dict(stride_qt=(heads + 2 * kv_heads) * head_dim, stride_qh=head_dim, stride_ot=heads * head_dim,
                    stride_oh=head_dim, stride_slot=kv_heads * head_dim, stride_head=head_dim, page_size=16,
                    D=head_dim, H=heads)

    def rope_ints(config):
        q_width, k_width = heads * head_dim, kv_heads * head_dim
        return dict(H=heads, HKV=kv_heads, half=head_dim // 2, stride_qt=q_width + 2 * k_width, stride_qh=head_dim,
                    stride_kt=q_width + 2 * k_width, stride_kh=head_dim, stride_qot=q_width, stride_qoh=head_dim,
                    stride_kot=k_width, stride_koh=head_dim, stride_cs=head_dim)

    norm_block = triton.next_power_of_2(hidden)
    rows = dict(D=hidden, stride_x=hidden, stride_res=hidden, stride_out=hidden, stride_sum=hidden)
    return [
        (matmul._matmul_sequential_splits_kernel, "sequential splits", lambda c: mm(c, False), mm_opts, mm_ints),
        (matmul._matmul_parallel_splits_kernel, "parallel splits", lambda c: mm(c, False), mm_opts, mm_ints),
        (matmul._matmul_sequential_splits_kernel, "sequential, tma", lambda c: mm(c, False, True), mm_opts, mm_ints),
        (matmul._matmul_parallel_splits_kernel, "parallel, tma", lambda c: mm(c, False, True), mm_opts, mm_ints),
        (matmul._matmul_parallel_splits_kernel, "parallel, last split folds",
         lambda c: mm(c, False, last_folds=True), mm_opts, mm_ints),
        (matmul._fold_splits_kernel, "fold", lambda c: dict(HAS_BIAS=True, BLOCK=matmul._REDUCE_BLOCK),
         lambda c: dict(num_warps=4), mm_ints),
        (rmsnorm._rms_norm_kernel, "with residual", lambda c: dict(HAS_RESIDUAL=True, BLOCK=norm_block),
         lambda c: dict(num_warps=max(1, min(norm_block // 512, c.rows.norm_max_warps))), lambda c: rows),
        (sampling._log_softmax_kernel, "", lambda c: dict(BLOCK=c.rows.softmax_block),
         lambda c: dict(num_warps=c.rows.softmax_warps), lambda c: dict(V=vocab, stride_x=vocab, stride_out=vocab)),
        (sampling._sample_kernel, "", lambda c: dict(BLOCK=c.rows.softmax_block),
         lambda c: dict(num_warps=c.rows.softmax_warps), lambda c: dict(V=vocab, stride=vocab)),
        (elementwise._silu_mul_kernel, "", lambda c: dict(BLOCK=elementwise._SILU_BLOCK),
         lambda c: dict(num_warps=elementwise._SILU_WARPS),
         lambda c: dict(I=intermediate, stride_x=2 * intermediate, stride_out=intermediate)),
        (elementwise._rope_kernel, "", lambda c: dict(BLOCK_H=elementwise._ROPE_HEADS,
                                                      BLOCK_D=triton.next_power_of_2(head_dim // 2)),
         lambda c: dict(num_warps=elementwise._ROPE_WARPS), rope_ints),
        (paged_attention._attention_sequential_kernel, "sequential", attn, attn_opts, attn_ints),
        (paged_attention._attention_split_kernel, "split", attn, attn_opts, attn_ints),
        (paged_attention._attention_split_kernel, "split, last split merges", lambda c: attn(c, True), attn_opts,
         attn_ints),
        (paged_attention._attention_merge_kernel, "merge",
         lambda c: {k: v for k, v in attn(c).items() if k in ("G", "BLOCK_M", "HEAD")}, attn_opts, attn_ints),
    ]


def compile_all(capabilities: list[tuple[int, int]], dtype: str, shapes: dict[str, int]) -> list[CompiledKernel]:
    if os.environ.get("TRITON_INTERPRET"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter has no compiler to check")
    import triton
    from triton.backends.compiler import GPUTarget

    from detserve.kernels import configs

    results = []
    for major, minor in capabilities:
        config = configs.for_capability((major, minor))
        for fn, variant, constexprs, options, ints in plans(**shapes):
            started = time.perf_counter()
            compiled = triton.compile(
                _ast_source(fn, dtype, constexprs(config), ints(config)),
                target=GPUTarget("cuda", major * 10 + minor, 32),
                options={**options(config), **configs.LAUNCH_OPTIONS},
            )
            ptx = compiled.asm["ptx"]
            registers, stack = _resource_usage(compiled.asm["cubin"])
            mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
            copies = sorted({int(size, 0) for size in re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]+\], \[[^]]+\], (\w+)", ptx)})
            results.append(CompiledKernel(
                arch=f"sm_{major}{minor}", kernel=fn.__name__.strip("_"), variant=variant, dtype=dtype,
                seconds=round(time.perf_counter() - started, 2), registers=registers, stack_bytes=stack,
                shared_bytes=compiled.metadata.shared, mma=mma, async_copy_bytes=copies,
                tma="cp.async.bulk.tensor" in ptx, atomics=sorted(set(re.findall(r"\batom\.global\.[\w.]+", ptx))),
            ))
    return results


def table(results: list[CompiledKernel]) -> str:
    headers = ["arch", "kernel", "variant", "dtype", "regs", "stack B", "smem KiB", "mma", "async copy B", "tma",
               "atomics", "compile s"]
    rows = [[r.arch, r.kernel, r.variant, r.dtype, r.registers, r.stack_bytes, round(r.shared_bytes / 1024, 1),
             r.mma, ",".join(map(str, r.async_copy_bytes)) or "-", "yes" if r.tma else "-",
             ",".join(r.atomics) or "-", r.seconds] for r in results]
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90,80", help="compute capabilities, e.g. 90,80 (default: %(default)s)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="(default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    capabilities = [(int(a) // 10, int(a) % 10) for a in args.arch.split(",")]
    shapes = dict(hidden=4096, intermediate=14336, vocab=128256, heads=32, kv_heads=8, head_dim=128)  # Llama-3-8B
    results = compile_all(capabilities, args.dtype, shapes)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
