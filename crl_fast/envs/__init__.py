"""Goal-conditioned vector environments."""
