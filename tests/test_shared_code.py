"""A worker builds each workflow module's code once, whatever the number of runs whose
sandboxes import it (worker.shared_code)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Imports workflows.training twice as two runs' sandboxes do (each with the module gone from
# sys.modules), then says whether the two modules are distinct and their code is the same.
TWO_IMPORTS = """
import importlib
import sys
from worker.shared_code import share_workflow_code

if sys.argv[1] == "shared":
    share_workflow_code()

def fresh_import():
    for name in [n for n in sys.modules if n == "workflows.training"]:
        del sys.modules[name]
    return importlib.import_module("workflows.training")

first, second = fresh_import(), fresh_import()
run_first = first.TrainingWorkflow.run.__code__
run_second = second.TrainingWorkflow.run.__code__
print(first is not second, first.TrainingWorkflow is not second.TrainingWorkflow,
      run_first is run_second, first.__dict__ is not second.__dict__)
"""


def two_imports(mode: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", TWO_IMPORTS, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.split()


def test_each_import_makes_its_own_module_from_one_copy_of_the_code() -> None:
    # Two modules, two classes, two namespaces (a run's module state stays its own) ...
    distinct_modules, distinct_classes, same_code, distinct_namespaces = two_imports("shared")
    assert distinct_modules == distinct_classes == distinct_namespaces == "True"
    # ... running the same code objects, built once.
    assert same_code == "True"
    # Without the finder every import builds the code again: what it is for.
    assert two_imports("default")[2] == "False"
