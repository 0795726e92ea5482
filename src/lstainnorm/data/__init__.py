"""Data: the synthetic multi-centre benchmark and loaders for real tile and segmentation folders."""
