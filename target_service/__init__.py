"""Target replica: the Generation API, scheduler over engine lanes, draft registry and draft pool."""
