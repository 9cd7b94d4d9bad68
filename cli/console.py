"""Where `loratrain` writes: stdout for answers, stderr for notes and errors."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

# soft_wrap: messages and paths stay on one line whatever the terminal width.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """`error: <message>` on stderr, and exit with `code`."""
    err.print(f"error: {message}", style="red", markup=False, highlight=False)
    raise typer.Exit(code)
