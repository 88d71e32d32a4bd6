"""Hugging Face Hub access through the local cache, with errors that say what to do offline."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from .errors import InputError


class HubError(InputError):
    """A checkpoint that is neither in the local cache nor downloadable now."""


def fetch(repo: str, filename: str, revision: str | None = None) -> Path:
    """Path of ``filename`` from ``repo`` at ``revision``, from the cache or downloaded.

    Honours ``HF_HUB_OFFLINE=1`` (cache only) and ``HF_HOME`` / ``HF_HUB_CACHE``.
    """
    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as e:
        rev = f" --revision {revision}" if revision else ""
        raise HubError(
            f"{repo}/{filename}{'@' + revision if revision else ''} is not in the local Hugging Face "
            f"cache and cannot be downloaded now ({type(e).__name__}). On a connected machine run "
            f"`hf download {repo} {filename}{rev}` (or `mlx-aim convert` there and copy the "
            "output directory), then try again."
        ) from None
