"""Small helpers shared by the experiment scripts: one-line errors, dtype/device flags."""

from __future__ import annotations

import sys
from pathlib import Path
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


def add_sweep_arguments(parser, study: str, default_limit: int, bootstrap: int = 1000) -> None:
    """Flags shared by the sweep scripts (dense and MoE)."""
    from common.core.sites import SITES

    parser.add_argument("--sites", nargs="+", default=["intermediate"], help=f"any of {', '.join(SITES)}, or all")
    parser.add_argument("--rule", default="topp", choices=["topp", "maxp", "topk"])
    parser.add_argument("--power", type=float, default=1.0)
    parser.add_argument("--grid", type=float, nargs="+", default=None, help="rule values (default: the paper's grid)")
    parser.add_argument("--search", action="store_true", help="bisect for the critical value instead of the grid")
    parser.add_argument("--resolution", type=float, default=0.01, help="--search stops when the bracket is this narrow")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="lm-eval task names; 'offline' (default) = the shipped suite, 'paper' = the paper's nine")
    parser.add_argument("--metric", default=None,
                        help="score of every multiple-choice task (acc or acc_norm; default: each task's own)")
    parser.add_argument("--limit", type=int, default=default_limit, help="first N items of every task (0 = all)")
    parser.add_argument("--threshold", type=float, default=0.99, help="normalized score kept at critical sparsity")
    parser.add_argument("--bootstrap", type=int, default=bootstrap, help="paired bootstrap resamples")
    parser.add_argument("--batch-size", default="16")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default) | float16")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, or 'auto' (device_map=auto)")
    parser.add_argument("--output", default=None, help=f"results folder (default results/{study}/<model>)")
    parser.add_argument("--shard", default=None, help="K/N: this process evaluates the K-th of N cell shards")


def sweep_settings(args, default_grid: list[float]):
    """Validated (sites, tasks, shard, grid, device, dtype, device_map) from the shared flags."""
    from common.core.rules import validate_rule
    from common.core.sites import SITES, expand_sites
    from common.evaluation.store import parse_shard
    from common.evaluation.tasks import check_tasks, resolve_task_names

    sites = list(SITES) if args.sites == ["all"] else args.sites
    for site in sites:
        expand_sites(site)
    tasks = resolve_task_names(args.tasks)
    check_tasks(tasks)
    grid = args.grid or list(default_grid)
    for value in grid:
        validate_rule(args.rule, value, args.power)
    device = default_device(None if args.device == "auto" else args.device)
    dtype = parse_dtype(args.dtype) or torch.bfloat16
    return sites, tasks, parse_shard(args.shard), grid, device, dtype, "auto" if args.device == "auto" else None


def output_folder(args, study: str) -> Path:
    name = Path(args.model).name if Path(args.model).is_dir() else args.model.replace("/", "--")
    return Path(args.output or Path("results") / study / name)
