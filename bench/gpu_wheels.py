"""Fetch, here, the wheels the lent GPU machine lacks to serve through HTTP, into `.whl/`.

The GPU image holds torch, triton, transformers and the rest the engine needs, but not the
server's packages (fastapi, uvicorn, pydantic, httpx2, llguidance, ...), and it reaches no
package index. This walks detserve's installed requirements (run it from the checkout's venv),
leaves out what the image is known to hold (`ON_THE_GPU_IMAGE`), and downloads the rest as
CPython 3.12 manylinux wheels at the versions installed here. `bench/gpu_check.sh` installs
`.whl/` into a temporary folder on the GPU machine when it is there; the device call carries it
(`.whl` is git-ignored).

    python -m bench.gpu_wheels            # then carry .whl with the gpu_check call
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ON_THE_GPU_IMAGE = frozenset({
    "torch", "triton", "numpy", "transformers", "tokenizers", "safetensors", "accelerate", "huggingface-hub",
    "hf-xet", "jinja2", "markupsafe", "tqdm", "psutil", "prometheus-client", "uvloop", "pyyaml", "requests",
    "urllib3", "certifi", "charset-normalizer", "filelock", "fsspec", "packaging", "regex", "sympy", "networkx",
    "mpmath", "setuptools",
})
"""Packages the lent GPU image holds (the device notes' package list, 2026-11-17), so none travels;
nvidia-* (CUDA's own) neither."""

GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
"""The GPU image's interpreter, for requirement markers."""

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64"]


def _name(text: str) -> str:
    return text.lower().replace("_", "-")


def missing_on_the_gpu(root: str = "detserve") -> dict[str, str]:
    """{package: version installed here} for every package `root` needs, directly or not, on the
    GPU image's Python, that the image does not hold."""
    needed: dict[str, str] = {}
    todo = [root]
    while todo:
        for text in metadata.distribution(todo.pop()).requires or []:
            requirement = Requirement(text)
            name = _name(requirement.name)
            if requirement.marker is not None and not requirement.marker.evaluate(GPU_PYTHON):
                continue
            if name in needed or name in ON_THE_GPU_IMAGE or name.startswith("nvidia-"):
                continue
            needed[name] = metadata.version(name)
            todo.append(name)
    return needed


def download(packages: dict[str, str], folder: Path) -> None:
    """Each package's CPython 3.12 manylinux wheel (or pure-Python one) at its version, into `folder`."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder),
                    *(f"{name}=={version}" for name, version in sorted(packages.items()))], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_wheels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=Path(".whl"), help="(default: %(default)s)")
    args = parser.parse_args(argv)
    packages = missing_on_the_gpu()
    shutil.rmtree(args.folder, ignore_errors=True)  # one version of each: two would stop the install there
    download(packages, args.folder)
    wheels = sorted(args.folder.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB, in {args.folder}: {' '.join(sorted(packages))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
