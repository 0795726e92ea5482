"""Classical stain normalisers (filled in by the baselines issue)."""
