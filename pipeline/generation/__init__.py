"""Generation: N candidates per prompt (transformers or vLLM), resumable in chunks."""
