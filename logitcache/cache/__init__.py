"""The HDF5 cache format and its reader (the writer belongs to phase one, in logitcache.teacher)."""
