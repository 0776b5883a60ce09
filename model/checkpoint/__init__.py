"""Checkpoint formats: Hugging Face directories of safetensors, Hub repos, and GGUF files."""
