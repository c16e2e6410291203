"""Data: prompt sets from files or reasoning-gym, preference pairs, and their tags (edit distance, scenario)."""
