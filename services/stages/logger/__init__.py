"""`voicebus logger`, `voicebus upload`, `voicebus report`: conversations stored locally first, then traced to Weave."""
