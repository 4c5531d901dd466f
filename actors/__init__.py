"""m2cache.actors."""
