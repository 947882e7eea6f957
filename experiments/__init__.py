"""Study drivers and benchmarks; no library code."""
