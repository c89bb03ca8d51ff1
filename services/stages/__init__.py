"""The pipeline's stages: each its own process on the bus (mic, resample, gateway, tools, player, logger, web)."""
