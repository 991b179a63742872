"""LR sweeps: a crash-safe SQLite run store and a resumable, multi-process runner."""
