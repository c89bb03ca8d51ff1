"""The tools stage: functions the model may call, from Python modules and MCP servers."""
