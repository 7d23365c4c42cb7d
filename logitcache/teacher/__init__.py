"""Phase one: train the teacher and dump its outputs into the cache."""
