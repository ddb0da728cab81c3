"""bench.gpu_wheels: which of detserve's packages travel to the GPU machine as wheels (no download here)."""

from __future__ import annotations

from importlib import metadata

from bench import gpu_wheels


def test_the_servers_packages_travel_and_what_the_gpu_image_holds_does_not() -> None:
    packages = gpu_wheels.missing_on_the_gpu()
    assert {"fastapi", "starlette", "uvicorn", "pydantic", "pydantic-core", "httpx2", "llguidance"} <= set(packages)
    assert not set(packages) & gpu_wheels.ON_THE_GPU_IMAGE and not any(p.startswith("nvidia-") for p in packages)
    assert all(version == metadata.version(name) for name, version in packages.items())  # the versions tested here


def test_requirements_are_read_for_the_gpu_images_python_3_12_on_linux() -> None:
    from packaging.requirements import Requirement

    assert Requirement("x; python_version < '3.13'").marker.evaluate(gpu_wheels.GPU_PYTHON)
    assert not Requirement("x; sys_platform == 'win32'").marker.evaluate(gpu_wheels.GPU_PYTHON)
