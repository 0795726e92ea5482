"""Applying a trained layer: normalising folders and slides, exporting it, reporting what it learned."""
