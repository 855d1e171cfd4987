"""mergekit-bico: streaming model merging and BiCo task-vector transfer."""

__version__ = "0.1.0"
