"""The HTTP APIs' JSON, and nothing else: one module per API parses its requests into our types (a harmony
`Conversation`, `SamplingParams`, `TurnConstraints`) and formats a generated `Turn` back into its answers and
streaming events.

No web framework and no engine here, so each API can be read, tested and added without the server: `fields`
reads typed fields and raises `ApiError`, `conversation` builds what every API's request shares, `tools` reads the
tools every API offers (and the grammars their calls must match), `formats` the structured output formats,
`logprobs` and `wire` what answers carry (ids, server-sent events, reasoning tokens); `chat_completions` and
`responses` (with `response_input`) are OpenAI's two APIs, `messages` Anthropic's.
"""
