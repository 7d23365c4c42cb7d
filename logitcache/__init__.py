"""logitcache: run the teacher once, distil many students from an HDF5 cache."""

__version__ = "0.1.0"
