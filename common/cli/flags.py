"""Small helpers shared by the experiment scripts: one-line errors, dtype/device flags."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable

import torch

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, ImportError, RuntimeError, ConnectionError)


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


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """An explicit dtype name, or None for 'auto' (see ``choose_dtype``)."""
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown --dtype {name!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def cpu_has_native_bfloat16() -> bool:
    """True on CPUs with bfloat16 arithmetic in hardware (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(name: str | None, device: str) -> tuple[torch.dtype, str]:
    """(dtype, why): an explicit --dtype always wins; 'auto' is bfloat16 on GPUs and on CPUs with
    native bfloat16, float32 on other CPUs (where bfloat16 matmuls are emulated and ~6x slower)."""
    explicit = parse_dtype(name)
    if explicit is not None:
        return explicit, "as asked"
    kind = torch.device(device).type
    if kind == "cpu":
        if cpu_has_native_bfloat16():
            return torch.bfloat16, "auto: this CPU has native bfloat16"
        return torch.float32, "auto: this CPU has no native bfloat16 (bfloat16 would be emulated, several times slower)"
    return torch.bfloat16, f"auto: {kind} device"


def threads_flag(text: str) -> str | int:
    """--threads: a positive integer or 'auto'."""
    text = str(text)
    if text == "auto" or (text.isdigit() and int(text) > 0):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"invalid --threads {text!r}: a positive integer or auto")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has one, as under Slurm
    or taskset; else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_threads(threads: str | int, device: str, shards: int, cores: int | None = None,
                   environ=os.environ) -> tuple[int | None, str]:
    """(CPU threads to set, or None to keep torch's own choice, why). A number always wins. 'auto'
    gives each of N ``--shard`` processes on one CPU machine its share of the cores: N processes
    that each start a thread per core oversubscribe them (two on two cores: 2.3-2.5x slower,
    ``benchmarks/bench_shard_threads.py``). OMP_NUM_THREADS, when set, is kept; shards on separate
    machines take --threads."""
    if threads != "auto":
        return int(threads), "as asked"
    if torch.device(device).type != "cpu":
        return None, f"auto: torch's default on {torch.device(device).type}"
    if environ.get("OMP_NUM_THREADS"):
        return None, f"auto: OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}"
    if shards == 1:
        return None, "auto: torch's default, one per core"
    cores = cores or usable_cores()
    return max(1, cores // shards), f"auto: {cores} cores shared by {shards} shards on this machine"


def check_device(name: str | None) -> str:
    """The device to use; a one-line error for a device this machine does not have."""
    if not name:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown --device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return name


def limit_device_memory(fraction: float, device: str) -> None:
    """Hold this process to ``fraction`` of the GPU's memory (of every visible GPU for 'auto'), so
    shard processes sharing a GPU cannot take each other's memory; refused off CUDA."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--memory-fraction must be in (0, 1], got {fraction:g}")
    if device != "auto" and torch.device(device).type != "cuda":
        raise ValueError(f"--memory-fraction limits GPU memory; the device is {device} (drop the flag or use --device cuda)")
    indices = range(torch.cuda.device_count()) if device == "auto" else [torch.device(device).index or 0]
    for index in indices:
        torch.cuda.set_per_process_memory_fraction(fraction, index)


def check_output_folder(path: Path) -> Path:
    """Create the results folder now (not after hours of computing) and check it is writable."""
    try:
        if path.exists() and not path.is_dir():
            raise ValueError(f"--output {path} is a file; give a folder")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        shown = str(path) if len(str(path)) <= 80 else f"{str(path)[:40]}...{str(path)[-30:]}"
        raise ValueError(f"cannot create the results folder {shown}: {error.strerror}; choose a shorter or "
                         "writable --output") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"the results folder {path} is not writable; choose another --output")
    return path


def batch_size(text: str) -> str | int:
    """lm-eval's --batch-size: a positive integer, 'auto' or 'auto:N'."""
    text = str(text)
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit() and int(text[5:]) > 0):
        return text
    raise argparse.ArgumentTypeError(f"invalid --batch-size {text!r}: a positive integer, auto or auto:N")


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected 1 or more, got 0")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


class Once(argparse.Action):
    """A list flag given at most once: a second ``--sites`` would silently replace the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, f"_{self.dest}_given", False):
            parser.error(f"{option_string} is given twice; give it once, with every value after it")
        setattr(namespace, f"_{self.dest}_given", True)
        setattr(namespace, self.dest, values)


def check_thread_environment(environ=os.environ) -> None:
    """OMP_NUM_THREADS, when set, must be a whole number of at least 1 (libgomp ignores anything else
    with a warning, and the run would then quietly use its own choice)."""
    text = environ.get("OMP_NUM_THREADS")
    if text is not None and text != "" and not (text.strip().isdigit() and int(text) > 0):
        raise ValueError(f"OMP_NUM_THREADS={text!r} is not a whole number of threads (1 or more); unset it or set e.g. "
                         "OMP_NUM_THREADS=2 (or use --threads)")


DEFAULT_TARGETS = [0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.8, 0.9]


def criterion_grids(args, grid: list[float], announce: bool = False) -> list[tuple]:
    """(criterion, its sites, its values) per ``--criterion``, validated before any model loads:
    the values are ``grid`` (``--grid``) for the magnitude rule and per-token top-p or max-p,
    ``--targets`` for a calibrated threshold and 1 - target for top-k. A criterion runs at the
    ``--sites`` where it applies (with ``announce``, the others are named in one printed line); one
    that applies at none of them is refused in one line."""
    from common.core.criteria import parse_criterion

    criteria = [parse_criterion(name, args.rule) for name in args.criterion]
    repeated = sorted({c.name for c in criteria if criteria.count(c) > 1})
    if repeated:
        raise ValueError(f"--criterion names {', '.join(repeated)} more than once; name each criterion once")
    sites = check_sites(args.sites)
    targets = args.targets if args.targets is not None else DEFAULT_TARGETS
    out = []
    for criterion in criteria:
        fits, refusals = [], []
        for site in sites:
            try:
                criterion.check_sites(site)
                fits.append(site)
            except ValueError as refusal:
                refusals.append(str(refusal))
        if not fits:
            raise ValueError(refusals[0])
        if refusals and announce:
            print(f"criterion {criterion.name} runs at {', '.join(fits)} only (not at "
                  f"{', '.join(s for s in sites if s not in fits)}: the {criterion.score} score does not apply there)")
        if criterion.is_rule or criterion.selection in ("topp", "maxp"):
            values = list(grid)
        elif criterion.selection == "threshold":
            values = list(targets)
        else:  # top-k keeps a share 1 - target of each token's entries
            values = [round(1.0 - t, 6) for t in targets]
        for value in values:
            criterion.check_value(value, args.power if criterion.score == "magnitude" else 1.0)
        out.append((criterion, fits, values))
    if (args.search or getattr(args, "target_halfwidth", None) is not None) and any(not c.is_rule for c in criteria):
        raise ValueError("--search and --target-halfwidth choose rule values of the magnitude criterion; sweep other "
                         "criteria on their grid (drop --search / --target-halfwidth)")
    return out


def add_sweep_arguments(parser, study: str, default_limit: int, bootstrap: int = 1000,
                        item_planning: bool = True) -> None:
    """Flags shared by the sweep scripts (dense and MoE); ``item_planning``: the item-planned sweep's
    flags (the MoE expert study reads the grid's critical value, so it has none)."""
    from common.core.sites import SITES

    parser.add_argument("--sites", nargs="+", default=["intermediate"], action=Once,
                        help=f"any of {', '.join(SITES)}, or all (alone)")
    parser.add_argument("--rule", default="topp", choices=["topp", "maxp", "topk"])
    parser.add_argument("--power", type=finite_float, default=1.0)
    parser.add_argument("--grid", type=finite_float, nargs="+", default=None,
                        help="rule values (default: the paper's grid)")
    parser.add_argument("--criterion", nargs="+", default=["magnitude"], action=Once,
                        help="criteria (common.core.criteria): magnitude (default: the magnitude score with --rule), "
                             "teal, cats, scap, wina, larosa, a score (magnitude, weighted, centred, rotated, gate) "
                             "with --rule, or score-selection (selections topp, topk, maxp, threshold); each runs at "
                             "the --sites where it applies")
    parser.add_argument("--targets", type=finite_float, nargs="+", default=None,
                        help="target sparsities of the criteria that aim at one: a calibrated threshold's value, "
                             "top-k's kept share 1 - target (default: " + " ".join(f"{t:g}" for t in DEFAULT_TARGETS)
                             + "); per-token top-p and max-p take --grid")
    parser.add_argument("--search", action="store_true",
                        help="noise-aware search for the critical sparsity instead of the grid (common.analysis.search)")
    parser.add_argument("--resolution", type=float, default=0.05,
                        help="--search stops when its 95%% interval (in measured sparsity) is this narrow")
    parser.add_argument("--budget", type=int, default=8, help="--search: at most this many new rule values per site and criterion")
    parser.add_argument("--spread", type=float, default=0.0,
                        help="--search: share of the placement spread evenly over the range of the interval and the "
                             "band (default 0: placed by the bootstrap crossings; scripts/search_calibration.py)")
    if item_planning:
        _add_item_planning_arguments(parser)
    parser.add_argument("--stop-below", type=finite_float, default=None,
                        help="grid: skip a site's lower values once its task-average normalized score has stayed "
                             "below this for --stop-after values in a row (e.g. 0.9; default: the full grid)")
    parser.add_argument("--stop-after", type=positive_int, default=2,
                        help="grid values in a row below --stop-below that end a site (default 2)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="lm-eval task names or suites: 'offline' or 'small' (default, 769 items), 'full' "
                             "(10,492 items), 'paper' = the paper's nine")
    parser.add_argument("--metric", default=None,
                        help="score of every multiple-choice task (acc or acc_norm; default: each task's own)")
    parser.add_argument("--limit", type=non_negative_int, default=default_limit,
                        help="first N items of every task (0 = all)")
    parser.add_argument("--threshold", type=finite_float, default=0.99, help="normalized score kept at critical sparsity")
    parser.add_argument("--bootstrap", type=positive_int, default=bootstrap, help="paired bootstrap resamples")
    parser.add_argument("--batch-size", type=batch_size, default=16, help="a positive integer, auto or auto:N")
    parser.add_argument("--dtype", default="auto",
                        help="auto (default: bfloat16 on GPUs and CPUs with native bfloat16, else float32), "
                             "float32, bfloat16 or float16")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, or 'auto' (device_map=auto)")
    parser.add_argument("--output", default=None, help=f"results folder (default results/{study}/<model>)")
    parser.add_argument("--shard", default=None, help="K/N: this process evaluates the K-th of N cell shards")
    parser.add_argument("--threads", type=threads_flag, default="auto",
                        help="CPU threads of this process (default auto: the machine's cores divided among the "
                             "--shard processes, assumed to run on this machine; OMP_NUM_THREADS is kept if set)")
    parser.add_argument("--memory-fraction", type=finite_float, default=None,
                        help="CUDA: this process uses at most this share of each GPU's memory (e.g. 0.19 for five "
                             "shard processes on one GPU); the scoring sizes its batches within it")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="resume a store written with other torch / transformers / lm-eval versions")


def _add_item_planning_arguments(parser) -> None:
    """The item-planned sweep (common.analysis.item_sweep): its cells are item ranges, --limit does not apply."""
    parser.add_argument("--target-halfwidth", type=finite_float, default=None,
                        help="item-planned sweep: score --start-items items per task at every grid value, then more "
                             "items only around the crossing until its 95%% interval is this narrow (in sparsity, "
                             "each side; e.g. 0.05) or --max-items evaluations are spent")
    parser.add_argument("--max-items", type=positive_int, default=200_000,
                        help="item-planned sweep: at most this many (item, value) evaluations per site, dense included")
    parser.add_argument("--start-items", type=positive_int, default=100,
                        help="item-planned sweep: items per task scored at every grid value before planning")


def sweep_settings(args, default_grid: list[float]):
    """Validated (sites, tasks, shard, grid, device, dtype, device_map) from the shared flags; prints
    the dtype chosen and why."""
    from common.core.rules import validate_rule
    from common.core.sites import SITES, expand_sites
    from common.evaluation.store import parse_shard
    from common.evaluation.tasks import check_tasks, resolve_task_names

    sites = check_sites(args.sites)
    tasks = resolve_task_names(args.tasks)
    check_tasks(tasks)
    check_metric(getattr(args, "metric", None), tasks)
    check_thread_environment()
    grid = args.grid or list(default_grid)
    for value in grid:
        validate_rule(args.rule, value, args.power)
    if args.targets is not None and any(not 0.0 <= t < 1.0 for t in args.targets):
        raise ValueError(f"--targets are target sparsities in [0, 1), got {' '.join(f'{t:g}' for t in args.targets)}")
    if not 0 < args.threshold <= 1:
        raise ValueError(f"--threshold must be in (0, 1], got {args.threshold}")
    if getattr(args, "target_halfwidth", None) is not None:
        if args.search:
            raise ValueError("--target-halfwidth plans items over the grid; --search plans values (drop one of them)")
        if not 0 < args.target_halfwidth < 1:
            raise ValueError(f"--target-halfwidth is a half-width in sparsity, in (0, 1), got {args.target_halfwidth:g}")
    if args.stop_below is not None:
        if args.search:
            raise ValueError("--stop-below ends a grid sweep early; --search chooses its own values (drop one of them)")
        if not 0 < args.stop_below < args.threshold:
            raise ValueError(f"--stop-below must be in (0, --threshold = {args.threshold:g}) so the crossing itself is "
                             f"never skipped, got {args.stop_below:g}")
    if args.search:
        from common.analysis.search import check_search_settings

        check_search_settings(args.threshold, args.resolution, args.budget, getattr(args, "ppl_percent", 1.0),
                              args.spread)
    device = check_device(None if args.device == "auto" else args.device)
    if getattr(args, "memory_fraction", None) is not None:
        limit_device_memory(args.memory_fraction, "auto" if args.device == "auto" else device)
    dtype, why = choose_dtype(args.dtype, device)
    criterion_grids(args, grid, announce=True)
    shard = parse_shard(args.shard)
    threads, threads_why = choose_threads(args.threads, device, shard[1])
    if threads is not None:
        torch.set_num_threads(threads)
    print(f"dtype {str(dtype).replace('torch.', '')} ({why}); device {args.device or device}; "
          f"threads {torch.get_num_threads()} ({threads_why})")
    return sites, tasks, shard, grid, device, dtype, "auto" if args.device == "auto" else None


def check_sites(names: list[str]) -> list[str]:
    """--sites: FFN site names, each once, or 'all' alone (every site)."""
    from common.core.sites import SITES, expand_sites

    if "all" in names:
        if names != ["all"]:
            raise ValueError(f"--sites all names every site ({', '.join(SITES)}); give it alone, not with "
                             f"{', '.join(n for n in names if n != 'all')}")
        return list(SITES)
    for site in names:
        expand_sites(site)
    repeated = sorted({site for site in names if names.count(site) > 1})
    if repeated:
        raise ValueError(f"--sites names {', '.join(repeated)} more than once; name each site once")
    return list(names)


def check_metric(metric: str | None, tasks: list[str]) -> None:
    """--metric: a metric every scored (non-perplexity) task reports, checked before any model loads."""
    if metric is None:
        return
    from common.evaluation.tasks import task_metrics

    missing = {task: metrics for task in tasks if (metrics := task_metrics(task)) is not None and metric not in metrics}
    if missing:
        task, metrics = next(iter(missing.items()))
        raise ValueError(f"--metric {metric} is not a metric of {', '.join(missing)}; {task} reports "
                         f"{', '.join(sorted(metrics))} (leave --metric out for each task's own)")


def output_folder(args, study: str) -> Path:
    """The results folder (created and checked for writing now, before any computing)."""
    name = Path(args.model).name if Path(args.model).is_dir() else args.model.replace("/", "--")
    return check_output_folder(Path(args.output or Path("results") / study / name))
