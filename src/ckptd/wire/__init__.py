"""Rules shared across the engine/catalog seam (standard library only: the catalog client imports them)."""
