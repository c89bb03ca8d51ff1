"""`voicebus serve`: every browser its own conversation, placed across machines by Ray Core.

`front` is the front door (page, offers, status, the reaper); `conversation` is the Ray actor that
launches one conversation's stage set on the node Ray chose; `server` starts Ray (embedded or
joined), the shared offline simulator and the front door, and stops them all.
"""
