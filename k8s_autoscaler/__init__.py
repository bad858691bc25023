"""Draft-pool autoscaler: scrape the targets' /metrics, decide a replica count, patch the scale subresource."""
