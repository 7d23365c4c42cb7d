"""Phase two: train students against the cache, never loading the teacher (except --online)."""
