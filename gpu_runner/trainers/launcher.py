"""Run an sd-scripts training script so that it reports exact losses as JSON lines.

Usage (under `accelerate launch`):
    python launcher.py [--sd-scripts-commit SHA] <sd-scripts dir>/<script>.py <script args>

It imports the script as a module, subclasses its NetworkTrainer (NetworkTrainer or
SdxlNetworkTrainer) with step_logging/epoch_logging that also print
`@@loratrain {"event": "step"|"epoch", "epoch": N, "step": N, "loss": x}` on stdout, and then does
what the script's `__main__` block does. sd-scripts calls those hooks only while tracking, i.e.
with a logging_dir. When the script lacks any of that, it runs the script unchanged and the
runner reads the tqdm bar instead.

With --sd-scripts-commit, sd-scripts names that commit in the LoRA's metadata
(ss_sd_scripts_commit_hash, modelspec.implementation_version) where it cannot ask git itself:
the image deletes its .git, and sd-scripts would write "(unknown)".

It runs in sd-scripts' Python environment: standard library only, nothing from gpu_runner.
"""

from __future__ import annotations

import importlib
import json
import math
import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EVENT_PREFIX = "@@loratrain "  # the same as gpu_runner.trainers.sd_scripts.EVENT_PREFIX
COMMIT_OPTION = "--sd-scripts-commit"
# Where sd-scripts asks git for its commit, and what it answers when git cannot tell.
_COMMIT_QUESTIONS = (
    ("library.train_util", "get_git_revision_hash", "(unknown)", "{commit}"),
    (
        "library.sai_model_spec",
        "get_implementation_version",
        "sd-scripts/unknown",
        "sd-scripts/{commit}",
    ),
)


def emit(event: dict[str, Any]) -> None:
    loss = event.get("loss")
    if isinstance(loss, float) and not math.isfinite(loss):
        event["loss"] = str(loss)  # "nan"/"inf": float() reads them back, JSON has no literal
    sys.stdout.write(EVENT_PREFIX + json.dumps(event) + "\n")
    sys.stdout.flush()


def _is_main_process(accelerator: Any) -> bool:
    return bool(getattr(accelerator, "is_main_process", True))


def reporting_trainer(trainer_class: type) -> type:
    """A subclass of sd-scripts' trainer class whose logging hooks also emit our events."""

    class ReportingTrainer(trainer_class):  # type: ignore[misc]
        def step_logging(
            self, accelerator: Any, logs: dict[str, Any], global_step: int, epoch: int
        ) -> Any:
            if "loss/current" in logs and _is_main_process(accelerator):
                loss = float(logs["loss/current"])
                emit({"event": "step", "epoch": epoch, "step": global_step, "loss": loss})
            return super().step_logging(accelerator, logs, global_step, epoch)

        def epoch_logging(
            self, accelerator: Any, logs: dict[str, Any], global_step: int, epoch: int
        ) -> Any:
            if "loss/epoch_average" in logs and _is_main_process(accelerator):
                loss = float(logs["loss/epoch_average"])
                emit({"event": "epoch", "epoch": epoch, "step": global_step, "loss": loss})
            return super().epoch_logging(accelerator, logs, global_step, epoch)

    return ReportingTrainer


def known_commit(ask_git: Callable[[], str], unknown: str, known: str) -> Callable[[], str]:
    """sd-scripts' question to git, answered with `known` where git's answer is `unknown`."""

    def answer() -> str:
        found = ask_git()
        return known if found == unknown else found

    return answer


def tell_commit(commit: str) -> None:
    """Make sd-scripts' own functions name `commit` when git cannot (see the module docstring)."""
    for module_name, function, unknown, known in _COMMIT_QUESTIONS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        ask_git = getattr(module, function, None)
        if callable(ask_git):
            setattr(module, function, known_commit(ask_git, unknown, known.format(commit=commit)))


def _load(script: Path) -> tuple[Any, Any, type] | None:
    """The script's module, sd-scripts' train_util and the trainer class, or None."""
    try:
        module = importlib.import_module(script.stem)
        base = importlib.import_module("train_network").NetworkTrainer
        train_util = importlib.import_module("library.train_util")
    except (ImportError, AttributeError) as e:
        print(f"loratrain launcher: running {script.name} as it is ({e})", file=sys.stderr)
        return None
    classes = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, base)
        and value.__module__ == module.__name__
    ]
    needed = (
        hasattr(module, "setup_parser")
        and hasattr(train_util, "verify_command_line_training_args")
        and hasattr(train_util, "read_config_from_file")
        and all(hasattr(base, hook) for hook in ("step_logging", "epoch_logging", "train"))
    )
    if len(classes) != 1 or not needed:
        print(
            f"loratrain launcher: running {script.name} as it is (no trainer hooks)",
            file=sys.stderr,
        )
        return None
    return module, train_util, classes[0]


def main(argv: list[str]) -> None:
    commit = None
    if argv[:1] == [COMMIT_OPTION]:
        commit, argv = (argv[1], argv[2:]) if len(argv) > 1 else ("", [])
    if not argv:
        sys.exit(f"usage: launcher.py [{COMMIT_OPTION} SHA] <sd-scripts script> [script args...]")
    script = Path(argv[0]).resolve()
    script_args = argv[1:]
    # Python put this file's folder first on the path; sd-scripts' folder belongs there.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(script.parent))
    sys.argv = [str(script), *script_args]
    loaded = _load(script)
    if commit:  # after the script's own imports, so they happen in its order
        tell_commit(commit)
    if loaded is None:
        runpy.run_path(str(script), run_name="__main__")
        return
    module, train_util, trainer_class = loaded
    print(f"loratrain launcher: {trainer_class.__name__} reports losses", file=sys.stderr)
    # What the script's `if __name__ == "__main__":` block does, with our trainer subclass.
    parser = module.setup_parser()
    args = parser.parse_args(script_args)
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    reporting_trainer(trainer_class)().train(args)


if __name__ == "__main__":
    main(sys.argv[1:])
