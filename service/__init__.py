"""The BentoML service (never imports torch or training)."""
