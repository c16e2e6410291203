"""Judging: score each prompt's candidates and pick the best and worst (rule verifier or an LLM judge)."""
