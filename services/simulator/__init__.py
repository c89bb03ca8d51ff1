"""`voicebus simulate`: a local server that speaks the OpenAI Realtime and chat-completions audio APIs.

It is the offline default and the tests' peer. It always says it is the local simulator.
"""
