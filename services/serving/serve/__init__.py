"""`voicebus serve`: every browser its own conversation, placed across machines by Ray Core.

`front` is the front door (page, offers, status, the reaper); `node_host` is the one Ray actor per
node that runs the conversations Ray placed there; `conversation` launches one conversation's stage
set; `server` starts Ray (embedded or
joined), the shared offline simulator and the front door, and stops them all.
"""
