"""Hugging Face Hub repo ids as local folders, with one-line errors for network and cache problems.

:func:`local_snapshot` turns a repo id into the folder of its cached snapshot (config files
and safetensors weights only): from the cache with no network when it is there, else
downloaded.  With ``HF_HUB_OFFLINE=1`` and nothing cached it fails at once; with no
network it fails after one short connection probe (seconds, not the client's retries).
Every failure is a ``ValueError`` of one line that names the repo and how to get a
local folder (``hf download``).  diffusers is not needed here; huggingface_hub is.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

__all__ = ["looks_like_repo_id", "local_snapshot", "require_diffusers", "PROBE_TIMEOUT_S"]

PROBE_TIMEOUT_S = 5.0
_PATTERNS = ["*.json", "diffusion_pytorch_model*.safetensors", "*/diffusion_pytorch_model*.safetensors"]
_INSTALL = 'pip install "itdiffusion[diffusers]"'


def require_diffusers():
    """The diffusers module; ModuleNotFoundError (``name="diffusers"``) saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise ModuleNotFoundError(f"diffusers is not installed; install it with {_INSTALL}",
                                  name="diffusers") from None
    return diffusers


def looks_like_repo_id(text: str) -> bool:
    """``owner/name`` with no path-like start (``.``, ``/``, ``~``)."""
    parts = str(text).split("/")
    return len(parts) == 2 and all(parts) and not str(text).startswith((".", "/", "~"))


def _how(repo_id: str) -> str:
    return (f"download it where there is network with `hf download {repo_id} --local-dir DIR` and pass the folder "
            f"DIR, or run once online to fill the cache")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def probe_hub(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """``None`` if a TCP connection to the Hub's endpoint opens within ``timeout`` s, else why not."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{type(err).__name__}: {err}"


def local_snapshot(repo_id: str, subfolder: str | None = None) -> str:
    """The local folder of ``repo_id``'s snapshot (configs and safetensors weights)."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ModuleNotFoundError(f"huggingface_hub is not installed; install it with {_INSTALL}",
                                  name="huggingface_hub") from None
    patterns = _PATTERNS if subfolder is None else ["*.json", f"{subfolder}/*"]
    try:
        return snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns)
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if _offline():
        raise ValueError(f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {_how(repo_id)}")
    problem = probe_hub(constants.ENDPOINT)
    if problem is not None:
        raise ValueError(f"{repo_id}: not in the local Hugging Face cache and the Hub ({constants.ENDPOINT}) is "
                         f"unreachable, no network? ({problem}); {_how(repo_id)}, or set HF_HUB_OFFLINE=1 to "
                         "use only the cache")
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=PROBE_TIMEOUT_S)
    except (HfHubHTTPError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{repo_id}: could not download it from the Hub ({type(err).__name__}: {first}); "
                         f"{_how(repo_id)}") from None
