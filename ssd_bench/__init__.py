"""Benchmarks: every decoding mode side by side on the same prompts, models and hardware."""
