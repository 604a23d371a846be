"""Small helpers shared by the experiment scripts: one-line errors, dtype/device flags."""

from __future__ import annotations

import sys
from typing import Callable

import torch

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, ImportError, RuntimeError)


def run_main(main: Callable[[], object]) -> None:
    """Run ``main``; a user error prints one line (``error: ...``) and exits with status 2."""
    try:
        main()
    except USER_ERRORS as error:
        message = error.args[0] if error.args else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished cells are saved; run the same command again to resume", file=sys.stderr)
        sys.exit(130)


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in names:
        raise ValueError(f"unknown --dtype {name!r}; use float32, bfloat16 or float16")
    return names[name]


def default_device(name: str | None) -> str:
    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"
