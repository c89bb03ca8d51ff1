"""Developer tools on the bus: tap, capture, replay, inspect, doctor."""
