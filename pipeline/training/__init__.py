"""Training: the DPO-family losses, the preference trainer (single process, DDP, FSDP2) and its diagnostics."""
