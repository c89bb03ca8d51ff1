"""Serving many callers: `voicebus serve` (the front door, Ray placement, node hosts) and `voicebus call`."""
