"""Hub ids without surprises offline: a cached snapshot, the hub itself, or one line saying what to do.

Without this, an uncached hub id on a machine that cannot reach the hub goes through several
retries and ends in a long traceback. ``hub_source`` decides before any load: when the hub is
reachable the id is returned unchanged (transformers downloads as usual); when it is not (or
``HF_HUB_OFFLINE`` is set) a cached snapshot directory is returned, so nothing touches the
network, and an uncached id raises one ``FileNotFoundError`` line within seconds.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from pathlib import Path

PROBE_TIMEOUT_S = 3.0


def hub_offline_flag() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@functools.lru_cache(maxsize=4)
def _endpoint_answers(endpoint: str, timeout: float) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # an HTTP answer, even an error status, means the hub is there
    except (OSError, ValueError):  # DNS failure, refused, timeout, no route
        return False
    return True


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """False under HF_HUB_OFFLINE; otherwise whether the hub endpoint answers within ``timeout`` (probed once)."""
    if hub_offline_flag():
        return False
    from huggingface_hub import constants

    return _endpoint_answers(constants.ENDPOINT, timeout)


def cached_file(repo_id: str, filename: str) -> Path | None:
    """The cached copy of one file of a hub repository, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None


def offline_message(repo_id: str) -> str:
    from huggingface_hub import constants

    reason = "HF_HUB_OFFLINE is set" if hub_offline_flag() else f"the hub ({constants.ENDPOINT}) cannot be reached"
    return (f"{repo_id} is not in the local hub cache ({constants.HF_HUB_CACHE}) and {reason}: download it where "
            f"the hub is reachable (`hf download {repo_id}`) and copy that cache here (or point HF_HOME at it), "
            "or pass a local checkpoint directory")


def hub_source(repo_id: str) -> str:
    """What to hand to from_pretrained for a hub id: the id when the hub is reachable, else the cached
    snapshot directory; one-line FileNotFoundError when neither works."""
    if hub_reachable():
        return repo_id
    config = cached_file(repo_id, "config.json")
    if config is None:
        raise FileNotFoundError(offline_message(repo_id))
    return str(config.parent)
