"""The built wheel, installed into a fresh venv beside Hugging Face's `kernels` package, imports and serves.

detserve ships its layers under one `detserve` namespace: a wheel that installed a top-level
`kernels` would shadow that package (which transformers probes for) or be shadowed by it. The fresh
venv takes its third-party packages from the test venv (a .pth line, so nothing downloads), but
detserve itself only from the wheel.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from detserve.server.bench.common import free_port
from tests.server.conftest import _healthy

ROOT = Path(__file__).parents[2]

pytestmark = pytest.mark.slow


def _fresh_venv(tmp_path: Path) -> Path:
    """A venv with the detserve wheel installed and the test venv's third-party packages on its path."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, cwd=tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    [wheel] = wheels.glob("detserve-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     check=True, capture_output=True, text=True).stdout.strip())
    (fresh_site / "test-venv-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv


def test_the_wheel_installs_beside_hugging_faces_kernels_package_and_serves_the_default_model(tmp_path: Path) -> None:
    venv = _fresh_venv(tmp_path)
    probe = ("import json, kernels, detserve.kernels, detserve.server.app; "
             "from detserve.kernels import cpu_native; "
             "print(json.dumps([kernels.__file__, hasattr(kernels, 'get_kernel'), detserve.kernels.__file__, "
             "all(source.exists() for source in cpu_native.SOURCES)]))")
    hf_kernels, is_hf, ours, c_source = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", probe], check=True,
                                                        capture_output=True, text=True, cwd=tmp_path).stdout)
    assert is_hf and "site-packages" in hf_kernels  # Hugging Face's package, not this checkout's folder
    assert ours.startswith(str(venv)), ours  # detserve from the wheel, not from the checkout
    assert c_source  # the CPU's C ops ship as source, compiled where they run
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETSERVE_")} | {"HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([str(venv / "bin" / "detserve"), "serve", "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while not _healthy(url):
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the wheel's server did not come up in 240 s"
            time.sleep(0.5)
        model = httpx2.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        answer = httpx2.post(url + "/v1/completions", json={"model": model, "prompt": "Paris is", "max_tokens": 4,
                                                             "temperature": 0}, timeout=120)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1, answer.text
    finally:
        server.terminate()
        server.wait(timeout=60)
