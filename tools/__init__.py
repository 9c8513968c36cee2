"""Developer tools run from a checkout (not installed with vlm_prune; nothing in it imports them)."""
