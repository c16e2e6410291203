"""The language model: loading (builtin GGUF, local folders), tokenised layout and per-sequence log-probs."""
