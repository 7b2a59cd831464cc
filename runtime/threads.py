"""Thread pools sized on purpose: torch's intra- and inter-op pools, and onnxruntime's intra-op count.

Both libraries default to one thread per core, in every process. On a machine whose cores are shared
by a hub, several sites and the tests, that oversubscribes the cores many times over and the pools
thrash (see `size_pools`). Torch-free: the edge calls this too, and it never imports torch there.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

log = logging.getLogger(__name__)

# One thread per pool. Measured on a 2-core machine shared by 4 to 15 CPU-bound processes
# (../shared/field-notes.md, "Threads on a shared machine"): with torch's default pools `make test`
# took 37 min 45 s with 4 timeouts and `make demo` missed its 300 s limit 4 times in 4; with
# OMP_NUM_THREADS=1 the same tests passed in 7 min 25 s and the demo in 1 min 33 s. A hub on a
# machine of its own should raise this to the cores it owns.
DEFAULT_THREADS = 1


def size_pools(threads: int = DEFAULT_THREADS, *, import_torch: bool = False) -> int:
    """Size torch's thread pools to `threads` where this process has torch; the onnxruntime intra-op count to use.

    Args:
        threads: threads per pool (at least 1).
        import_torch: import torch when it is installed but not yet imported (the hub). Without it, torch
            is sized only when something already imported it, so the edge never loads torch through here.

    Returns:
        The value for `onnxruntime.SessionOptions.intra_op_num_threads`.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch = sys.modules.get("torch")
    if torch is None and import_torch and importlib.util.find_spec("torch") is not None:
        import torch
    if torch is not None:
        torch.set_num_threads(threads)
        if torch.get_num_interop_threads() != threads:
            try:
                torch.set_num_interop_threads(threads)
            except RuntimeError as err:  # torch allows it once, and only before any inter-op work has run
                log.warning("torch's inter-op pool stays at %d threads: %s", torch.get_num_interop_threads(), err)
    return threads
