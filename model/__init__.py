"""Llama 3 in plain PyTorch: config, layers, KV cache, checkpoint loading, tokenizer."""
