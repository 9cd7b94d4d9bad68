"""A separate environment that imports the real sd-scripts, for tests that parse its arguments.

sd-scripts pins transformers 4.54.1 and diffusers 0.32.1; the project's own environment has
transformers 5.x, so the vendored scripts (`../shared/vendor/sd-scripts`) cannot be imported
here. `sd_scripts_python` (a session fixture) builds a venv with sd-scripts' import-time
requirements ONCE under `.cache/sd-scripts-env/<key>`, the key being a hash of the pinned list
below and this Python's version, under a file lock so two pytest processes never build it at
once. `parse_sd_scripts_args` then runs a script's real `setup_parser()` and
`train_util.read_config_from_file()` there, as the script itself does at start.

PyPI's torchvision wheel does not load its C++ ops with torch 2.13.0+cpu (it links CUDA's
libtorch), and its fake-kernel registrations then fail the import (`operator torchvision::nms
does not exist`). sd-scripts only needs `torchvision.transforms`, so the env gets torchvision
without its dependencies (which would pull a CUDA torch), and the parse script first runs
TORCHVISION_PRELUDE, which defines the two ops that torchvision registers unguarded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SD_SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "shared" / "vendor" / "sd-scripts"
CACHE_DIR = REPO / ".cache" / "sd-scripts-env"

# What `import train_network / sdxl_train_network / flux_train_network / sd3_train_network`
# needs, pinned as in sd-scripts' requirements.txt at the vendored commit (torch: the one on
# these machines' disk, /opt/wheels). opencv headless: the same cv2 without the GUI libraries.
# Run before `import torchvision` in that env: where its C++ ops cannot load (PyPI's wheel
# links CUDA's libtorch, the env has torch+cpu), define the two ops whose fake kernels
# torchvision registers unguarded, so the import succeeds; calling them fails loudly.
TORCHVISION_PRELUDE = """
import importlib.util, os, torch
try:
    torch.ops.load_library(
        os.path.join(os.path.dirname(importlib.util.find_spec("torchvision").origin), "_C.so")
    )
except OSError:
    _torchvision_ops = torch.library.Library("torchvision", "DEF")
    _torchvision_ops.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_ops.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
"""

REQUIREMENTS = (
    "torch==2.13.0",
    "transformers==4.54.1",
    "diffusers==0.32.1",
    "accelerate==1.6.0",
    "einops==0.7.0",
    "safetensors==0.4.5",
    "huggingface-hub==0.34.3",
    "toml==0.10.2",
    "voluptuous==0.15.2",
    "imagesize==1.4.1",
    "opencv-python-headless==4.10.0.84",
    "sentencepiece==0.2.1",
    "ftfy==6.3.1",
    "rich==14.1.0",
    "numpy<2.3",
    "pillow",
)
# Installed with --no-deps: its own dependency would replace torch with a CUDA build.
TORCHVISION = "torchvision==0.28.0"


def _key() -> str:
    pins = [*REQUIREMENTS, TORCHVISION, f"python {sys.version_info[:3]}"]
    return hashlib.sha256("\n".join(pins).encode()).hexdigest()[:16]


def env_python(env: Path) -> Path:
    return env / "bin" / "python"


def build_env(cache_dir: Path = CACHE_DIR) -> tuple[Path, float]:
    """The env's python, built if missing; and the seconds spent building it (0 when cached)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    env = cache_dir / _key()
    ready = env / "loratrain-ready"
    with open(cache_dir / f"{env.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest process may be building it
        if ready.is_file():
            return env_python(env), 0.0
        started = time.monotonic()
        shutil.rmtree(env, ignore_errors=True)  # an earlier build that did not finish
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        python = str(env_python(env))
        pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, *REQUIREMENTS], check=True)
        subprocess.run([*pip, "--no-deps", TORCHVISION], check=True)
        subprocess.run(
            [python, "-c", TORCHVISION_PRELUDE + "import torchvision.transforms"], check=True
        )
        ready.write_text(json.dumps({"requirements": [*REQUIREMENTS, TORCHVISION]}))
        return env_python(env), time.monotonic() - started


@pytest.fixture(scope="session")
def sd_scripts_python() -> Iterator[Path]:
    """The python of an env that imports the vendored sd-scripts (built once, then cached)."""
    if not SD_SCRIPTS_DIR.is_dir():
        pytest.skip(f"sd-scripts' sources are not at {SD_SCRIPTS_DIR} (../shared/vendor)")
    python, seconds = build_env()
    if seconds:
        print(f"\nbuilt the sd-scripts env {python.parent.parent} in {seconds:.0f} s")
    yield python


# Run in the sd-scripts env (cwd = sd-scripts): for each (script, argv) read on stdin, parse argv
# exactly as the script's __main__ does, check the arguments as NetworkTrainer.train does first,
# and build the dataset's blueprint from the dataset TOML with sd-scripts' own schema. Prints
# one JSON line per case: the arguments as read (before train() converts any).
_PARSE = """
import importlib, json, sys
sys.path.insert(0, ".")
from library import config_util, train_util
for script, argv in json.load(sys.stdin):
    module = importlib.import_module(script)
    parser = module.setup_parser()
    sys.argv = [script + ".py", *argv]  # read_config_from_file parses sys.argv again
    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    read = dict(vars(args))
    # What NetworkTrainer.train does first, before it builds the dataset from its config.
    train_util.verify_training_args(args)
    train_util.prepare_dataset_args(args, True)
    dataset = None
    if getattr(args, "dataset_config", None):
        sanitizer = config_util.ConfigSanitizer(True, True, False, True)
        user_config = config_util.load_user_config(args.dataset_config)
        blueprint = config_util.BlueprintGenerator(sanitizer).generate(user_config, args)
        dataset = [
            {
                "params": {k: v for k, v in vars(d.params).items()},
                "subsets": [vars(s.params) for s in d.subsets],
            }
            for d in blueprint.dataset_group.datasets
        ]
    dests = sorted({action.dest for action in parser._actions})
    prompts = None
    if getattr(args, "sample_prompts", None):
        # What sample_images reads of each line of the prompt file.
        with open(args.sample_prompts, encoding="utf-8") as f:
            prompts = [train_util.line_to_prompt_dict(line) for line in f if line.strip()]
    result = {"args": read, "dests": dests, "dataset": dataset, "prompts": prompts}
    print("@@ARGS " + json.dumps(result, default=repr), flush=True)
"""


def parse_sd_scripts_args(python: Path, cases: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
    """For each (script, argv), e.g. ("flux_train_network", [...]): `vars(args)` as the real
    script reads them (command line, then `--config_file`'s TOML), its parser's dests, and the
    dataset config as sd-scripts' schema sanitizes it. One process for all cases."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORA_", "ACCELERATE_"))}
    env["HF_HUB_OFFLINE"] = "1"
    payload = [(script.removesuffix(".py"), argv) for script, argv in cases]
    done = subprocess.run(
        [str(python), "-c", TORCHVISION_PRELUDE + _PARSE],
        cwd=SD_SCRIPTS_DIR,
        env=env,
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = [
        json.loads(line.removeprefix("@@ARGS "))
        for line in done.stdout.splitlines()
        if line.startswith("@@ARGS ")
    ]
    if done.returncode != 0 or len(results) != len(cases):
        failed = cases[len(results)] if len(results) < len(cases) else None
        raise AssertionError(
            f"sd-scripts did not parse {failed} (exit {done.returncode}):\n"
            f"{done.stdout[-5000:]}\n{done.stderr[-5000:]}"
        )
    return results
