"""m2cache.model."""
