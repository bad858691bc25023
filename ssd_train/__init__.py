"""Training of the embedded target/draft Llama model pair from the Python standard library's sources."""
