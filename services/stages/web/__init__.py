"""`voicebus web`: the browser stage (aiohttp page + aiortc WebRTC)."""
