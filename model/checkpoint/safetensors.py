"""Hugging Face safetensors checkpoints: a single model.safetensors or the shards its index lists, read one
tensor at a time from memory-mapped files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a directory: a single model.safetensors or the shards its index lists."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{index.name} lists shards that are missing from {directory}: {', '.join(absent)}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"no model.safetensors or model.safetensors.index.json in {directory}")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"cannot read {path}: {e}") from None
