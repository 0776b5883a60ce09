"""Resolve a Hugging Face Hub repo id to a local snapshot, downloading only what serving needs.

`huggingface_hub` itself honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE; the token comes from HF_TOKEN.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SNAPSHOT_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "original/tokenizer.model",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not Path(source).exists()


def resolve_repo(repo_id: str, revision: str | None = None) -> Path:
    """The local directory of `repo_id`'s snapshot (downloaded if needed and allowed)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=SNAPSHOT_PATTERNS,
                                 token=os.environ.get("HF_TOKEN") or None)
    except LocalEntryNotFoundError as e:
        raise ValueError(f"model {repo_id!r} is not in the local Hugging Face cache and cannot be downloaded "
                         f"(offline, or the Hub is unreachable): {e}") from None
    except RepositoryNotFoundError:
        raise ValueError(f"Hugging Face repo {repo_id!r} was not found, or it is gated and HF_TOKEN "
                         "does not grant access") from None
    except HfHubHTTPError as e:
        raise ValueError(f"downloading {repo_id!r} from the Hugging Face Hub failed: {e}") from None
    return Path(path)
