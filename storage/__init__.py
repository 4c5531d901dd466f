"""m2cache.storage."""
