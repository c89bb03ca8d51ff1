"""Under `serve`, a stage set's web stage answers only its node host (which relays the front door's offer).

The host makes a secret per stage set, hands it to the stages in their environment (never an argument,
a log line or a bus message) and sends it with each offer it relays; the web stage refuses any request
without it (403), touching no session. A caller who finds a stage set's port cannot take it over.
Kept apart from the web stage so the node host reads these two names without importing aiortc.
"""

OFFER_SECRET_ENV = "VOICEBUS_OFFER_SECRET"
OFFER_SECRET_HEADER = "X-Voicebus-Offer-Secret"
