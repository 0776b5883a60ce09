"""Text: tokenizers (tiktoken over any BPE vocabulary), chat templates and incremental detokenisation."""
