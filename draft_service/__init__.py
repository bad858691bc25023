"""Draft endpoint: serves the shared draft model to every target replica over ssd.v1 Speculator."""
