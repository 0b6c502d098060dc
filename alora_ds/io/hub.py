"""Whether the Hugging Face hub can be reached, asked once and quickly before a hub id is loaded.

Without this, a hub id on a machine that cannot reach the hub (a cluster node without internet,
a firewall, a typo in HF_ENDPOINT) goes through transformers' and huggingface_hub's retries for
about a minute, printing a warning per retry, before failing with a message about the
tokenizer. One request with a short timeout says it at once, with what to do instead: a local
directory, or HF_HUB_OFFLINE=1 to use a copy already in the hub cache.

The endpoint is huggingface_hub's: $HF_ENDPOINT, else https://huggingface.co (proxies from the
environment apply, as they do to huggingface_hub). With HF_HUB_OFFLINE set nothing is asked. A
model the hub cache already holds is not refused: huggingface_hub falls back to the cached copy,
and a caller that has not imported it yet can go offline at once (`check_hub_reachable` says).
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from pathlib import Path

from alora_ds.errors import InputError

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 5.0
_TRUE = ("1", "on", "yes", "true")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value, as huggingface_hub reads it."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUE
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_cache() -> Path:
    """The hub cache huggingface_hub uses: HF_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub or ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface"
    )
    return Path(home).expanduser() / "hub"


def in_hub_cache(repo_id: str) -> bool:
    """Whether the hub cache holds a downloaded copy of `repo_id` (a snapshot with its config)."""
    snapshots = hub_cache() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return any(snapshots.glob("*/config.json")) or any(snapshots.glob("*/tokenizer_config.json"))


@functools.cache
def _unreachable(url: str, timeout_s: float) -> str | None:
    """Why `url` cannot be reached, or None when it answers (any HTTP status is an answer)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: a 401 / 404 / 5xx is the hub's to explain
    except urllib.error.URLError as exc:
        reason = exc.reason
        return getattr(reason, "strerror", None) or str(reason)
    except (TimeoutError, OSError) as exc:
        return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def check_hub_reachable(name_or_path: str, what: str = "model") -> str | None:
    """Raise a one-line InputError when `name_or_path` is a hub id (not a local path), the hub
    cannot be reached and the hub cache holds no copy of it; nothing is asked when it is local
    or HF_HUB_OFFLINE is set. Returns why the hub is out of reach when the cached copy will be
    used (the caller may set HF_HUB_OFFLINE=1 before huggingface_hub is imported), else None."""
    if Path(name_or_path).exists() or hub_offline():
        return None
    url = endpoint()
    reason = _unreachable(url, PROBE_TIMEOUT_S)
    if reason is None:
        return None
    if in_hub_cache(name_or_path):
        return f"the Hugging Face hub at {url} cannot be reached ({reason})"
    raise InputError(
        f"{what} {name_or_path!r} is not a local directory and the Hugging Face hub at {url} "
        f"cannot be reached ({reason}); give a local directory (a checkpoint downloaded where "
        "there is internet, or the alias smollm2), or set HF_HUB_OFFLINE=1 to use a copy "
        "already in the hub cache (HF_HOME)"
    )
