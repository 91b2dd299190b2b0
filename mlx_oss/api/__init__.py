"""The HTTP APIs' JSON, and nothing else: one module per API parses its requests into our types (a harmony
`Conversation`, `SamplingParams`) and formats a generated `Turn` back into its answers and streaming events.

No web framework and no engine here, so each API can be read, tested and added (the Anthropic messages API
next) without the server: `fields` reads typed fields and raises `ApiError`, `conversation` builds what every
API's request shares, `wire` holds the ids and server-sent events all answers use, and `chat_completions` and
`responses` are OpenAI's two APIs.
"""
