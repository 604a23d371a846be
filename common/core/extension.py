"""Build a C++ CPU extension on first use, or say once why not: the one loader every kernel of
the toolkit uses (the fused top-p rule in ``common.core.fused_topp``, the sparse GEMV of
``common.execution``).

``torch.utils.cpp_extension.load`` compiles the source with the machine's C++ compiler and
``ninja`` (about 30 s once, then torch's extension cache loads it). A compiler without OpenMP
(Apple's clang) gets a one-thread build with a warning; where nothing can be built, one warning
says why and the caller keeps its pure-torch path. An environment switch (``0``, ``off``,
``false`` or ``no``) turns a kernel off, for side-by-side measurements or a broken toolchain.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from functools import lru_cache
from pathlib import Path

OPENMP = ("-fopenmp",)  # at::parallel_for runs on torch's threads only when compiled with OpenMP


@lru_cache(maxsize=None)
def _on(value: str) -> bool:
    return value.strip().lower() not in {"0", "off", "false", "no"}


def switched_on(switch: str) -> bool:
    """False when the environment variable ``switch`` is 0 / off / false / no. Read on every call
    (a switch may change at run time) at the cost of one lookup: a decode step asks once per product."""
    return _on(os.environ.get(switch, "1"))


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def build_extension(name: str, source: Path, what: str, switch: str, cflags: tuple[str, ...] = ("-O3",)):
    """The compiled module of ``source`` under ``name``, or None (with one warning naming ``what``
    and ``switch``) where it cannot be built. Callers cache the result (``functools.lru_cache``)."""
    start = time.perf_counter()
    path = os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the ninja wheel's binary, when its scripts folder is not on PATH
            try:
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
            except ImportError:
                pass
        try:
            # fresh lists: torch's load appends its own flags to them in place, and flags that differ
            # from the last build's make ninja rebuild the kernel (about 40 s) on every later load
            module = load(name=name, sources=[str(source)], extra_cflags=[*cflags, *OPENMP],
                          extra_ldflags=list(OPENMP), verbose=False)
        except Exception as error:  # a compiler without OpenMP (Apple's clang): build the one-thread kernel
            module = load(name=f"{name}_serial", sources=[str(source)], extra_cflags=list(cflags), verbose=False)
            warnings.warn(f"the {what} was built without OpenMP ({first_line(error)}), so it runs on one thread per "
                          f"process; it gives the same results (set {switch}=0 to use the multi-threaded pure-torch "
                          "path instead)", RuntimeWarning, stacklevel=4)
    except Exception as error:  # no compiler, no ninja, a failed build: the torch path still works
        warnings.warn(f"the {what} could not be built ({first_line(error)}); using the pure-torch path, which gives "
                      f"the same results more slowly (set {switch}=0 to silence this)", RuntimeWarning, stacklevel=4)
        return None
    finally:
        os.environ["PATH"] = path
    elapsed = time.perf_counter() - start
    if elapsed > 5:
        print(f"built the {what} in {elapsed:.0f} s (once; torch caches it)", file=sys.stderr)
    return module
