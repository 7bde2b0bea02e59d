"""Data the project generates itself (embedded benchmarks); nothing here downloads."""
