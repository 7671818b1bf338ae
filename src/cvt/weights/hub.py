"""Weights by name: the published tags (``cvt-13``, ... see `cvt.models.zoo`) and ``hf-hub:org/repo[@revision]``,
fetched into huggingface_hub's cache (``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` honoured).

Only ``config.json``, ``preprocessor_config.json`` and one weights file are fetched: ``model.safetensors``
when the repo has it, else ``pytorch_model.bin`` (read with ``weights_only=True``). huggingface_hub writes
each file under a temporary name and renames it when complete, so a download cut off leaves nothing
a later run would use.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

try:  # the HTTP client of huggingface_hub 2 (it raises that client's errors for a connection cut off)
    from httpx2 import HTTPError as TransportError
except ImportError:  # huggingface_hub 1
    from httpx import HTTPError as TransportError

from ..errors import UserError
from ..models.zoo import PublishedWeights, find_published, published_weights, repo_tag
from .hf_preprocessor import PREPROCESSOR_FILE

__all__ = ["HF_HUB_PREFIX", "HubWeights", "download", "is_hub_name", "provenance"]

HF_HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
_CONFIG = "config.json"
# A tag-like name (no folder, no file suffix): an unknown one is a mistaken tag, not a missing file.
_TAG_LIKE = re.compile(r"^cvt[-_][\w-]*$", re.IGNORECASE)
# The hub cache's folder of one snapshot: .../models--org--name/snapshots/<commit>
_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\][0-9a-f]+$")


@dataclass(frozen=True)
class HubWeights:
    """A hub repo fetched into the cache: its snapshot folder, and the published checkpoint it copies."""

    folder: Path
    published: PublishedWeights | None


def is_hub_name(source: str) -> bool:
    """A published tag, ``hf-hub:...``, or something shaped like a tag (named, so unknown ones are told so)."""
    return source.startswith(HF_HUB_PREFIX) or find_published(source) is not None or bool(_TAG_LIKE.match(source))


def _parse(source: str) -> tuple[str, str | None, PublishedWeights | None]:
    if not source.startswith(HF_HUB_PREFIX):
        published = published_weights(source)
        return published.repo, None, published
    repo, _, revision = source[len(HF_HUB_PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"{source!r}: a hub repo is named hf-hub:org/name (optionally @revision)")
    return repo, revision or None, repo_tag(repo)


def provenance(folder: Path) -> tuple[str, PublishedWeights | None] | None:
    """(repo, published checkpoint or None) when `folder` is a snapshot in the hub cache, else None."""
    match = _CACHE_SNAPSHOT.search(str(folder.resolve()))
    if not match:
        return None
    repo = f"{match['org']}/{match['name']}"
    return repo, repo_tag(repo)


def download(source: str) -> HubWeights:
    """Fetch a tag or ``hf-hub:org/repo[@revision]`` into the cache (or find it there) and check it is a CvT."""
    repo, revision, published = _parse(source)
    config_file = _fetch(repo, _CONFIG, revision, source)
    try:
        config = json.loads(Path(config_file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{source!r}: {repo}'s config.json is unreadable ({e}); is {repo} a transformers model?") from None
    if not isinstance(config, dict) or config.get("model_type") != "cvt":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise UserError(f"{source!r}: {repo} is not a CvT (its config.json says model_type {kind!r}); give a CvT repo")
    _fetch(repo, PREPROCESSOR_FILE, revision, source, optional=True)
    for index, filename in enumerate(WEIGHT_FILES):
        is_last = index == len(WEIGHT_FILES) - 1
        if _fetch(repo, filename, revision, source, optional=not is_last) is not None:
            break
    return HubWeights(Path(config_file).parent, published)


def _fetch(repo: str, filename: str, revision: str | None, source: str, optional: bool = False) -> str | None:
    """One file of `repo` from the cache or the hub; None when `optional` and the repo lacks it.

    Every failure is one UserError naming the repo and the fix."""
    at = f"@{revision}" if revision else ""
    command = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    try:
        return hf_hub_download(repo, filename, revision=revision)
    except (EntryNotFoundError, LocalEntryNotFoundError) as e:
        if optional:
            return None
        if not isinstance(e, LocalEntryNotFoundError):
            raise UserError(f"{source!r}: {repo}{at} has no {filename}; is it a transformers CvT repo?") from None
        if constants.HF_HUB_OFFLINE:
            raise UserError(
                f"{source!r}: {repo}{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; "
                f"download it once with `{command}`, or unset HF_HUB_OFFLINE"
            ) from None
        raise UserError(
            f"{source!r}: cannot reach the Hugging Face hub for {repo}{at} and it is not cached; check the connection "
            f"(or HF_ENDPOINT) and run again, or download it with `{command}`"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{source!r}: {repo} has no revision {revision!r}; give a branch, tag or commit it has") from None
    except GatedRepoError:
        raise UserError(f"{source!r}: {repo} is gated; accept its terms on huggingface.co and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{source!r}: no repo {repo} on the Hugging Face hub (or it is private: log in with `hf auth login`)"
        ) from None
    except (HfHubHTTPError, TransportError, OSError) as e:  # refused, cut off, disk full
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(
            f"{source!r}: downloading {filename} of {repo}{at} failed ({reason}); run again to resume it "
            "(an incomplete file is never used)"
        ) from None
