"""Hugging Face Hub access through the local cache, with errors that say what to do offline."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import (
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from ..errors import InputError


class HubError(InputError):
    """A checkpoint that is neither in the local cache nor downloadable now."""


def fetch(repo: str, filename: str, revision: str | None = None) -> Path:
    """Path of ``filename`` from ``repo`` at ``revision``, from the cache or downloaded.

    Honours ``HF_HUB_OFFLINE=1`` (cache only) and ``HF_HOME`` / ``HF_HUB_CACHE``. A file that is
    not cached is downloaded only after one request shows the Hub answers, so an unreachable Hub
    fails at once instead of after huggingface_hub's retries.
    """
    if not isinstance(try_to_load_from_cache(repo, filename, revision=revision), str):
        _check_reachable(repo, filename, revision)
    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as e:
        raise _missing(repo, filename, revision, type(e).__name__) from None


def _check_reachable(repo: str, filename: str, revision: str | None) -> None:
    """Fail at once unless one request for the file's metadata succeeds (no retries)."""
    if constants.HF_HUB_OFFLINE:
        raise _missing(repo, filename, revision, "HF_HUB_OFFLINE is set")
    try:
        get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision))
    except Exception as e:  # any failure of the request; the HTTP library varies by version
        raise _missing(repo, filename, revision, type(e).__name__) from None


def _missing(repo: str, filename: str, revision: str | None, reason: str) -> HubError:
    at = f"@{revision}" if revision else ""
    option = f" --revision {revision}" if revision else ""
    return HubError(
        f"{repo}/{filename}{at} is not in the local Hugging Face cache and cannot be downloaded "
        f"now ({reason}). On a connected machine run `hf download {repo} {filename}{option}` (or "
        "`mlx-aim convert` there and copy the output directory), then try again; with "
        "HF_HUB_OFFLINE=1 mlx-aim reads the cache only and never waits for the network."
    )
