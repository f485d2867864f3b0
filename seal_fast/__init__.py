"""seal-fast: the SEAL method (Simulated annealing in EArly Layers, CVPR 2023) and its baselines, fast."""

__version__ = "0.1.0"
