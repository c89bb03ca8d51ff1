"""Commands a user runs end to end: demo, say, eval."""
