"""`python -m mlx_oss.chat`: talk to gpt-oss in the terminal.

Answers stream as they are generated, the reasoning set apart (dimmed) above the answer. With `--tools
python,browser` gpt-oss may run Python and browse before it answers: each call and its output are shown dimmed.
Ctrl-C stops the current turn (a running tool included) and keeps the chat; /reset, /effort, /reasoning, /tools,
/quit and /help are the commands. With stdin not a terminal the chat answers what was piped in (answer on
stdout, reasoning, tool calls and figures on stderr) and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from . import prompt_cache
from .agent import STEP_LIMIT, ToolFinished, ToolStarted, run_turn
from .cli import add_kv_bits_argument, context_length, format_count, non_negative_int, number_from, positive_int, run
from .drafting import add_draft_arguments
from .engine import CancelToken, ContextLimitError, Done, Engine, SamplingParams
from .errors import MlxOssError
from .harmony import REASONING_EFFORTS, AnswerDelta, Conversation, Message, ReasoningDelta, ToolCall
from .layouts import parameter_count
from .loading import BACKENDS
from .memory_estimate import context_for_load
from .render_limits import MAX_RUN, longest_run
from .tools import BUILTIN_TOOLS, PYTHON, BuiltinTool, ToolSettings

PROG = "python -m mlx_oss.chat"
COMMANDS = """commands:
  /reset                   start a new conversation
  /effort low|medium|high  set the reasoning effort
  /reasoning show|hide     show or hide the model's reasoning
  /tools                   list the built-in tools (python, browser) and whether each is on
  /tools NAME on|off       let the model use a tool, or stop it
  /quit                    leave the chat (Ctrl-D works too)
  /help                    this list
Ctrl-C stops the current answer."""
STOP_NOTES = {
    "length": "stopped at --max-tokens",
    "context_limit": "the context is full: /reset to start over",
    "cancelled": "stopped",
    "tool_call": "the model called a tool this chat does not have",
    STEP_LIMIT: "stopped: too many tool calls in one turn",
}
# Where each built-in tool's class lives (imported when the tool is first turned on: the tools are written
# separately and may be missing from an install, which then costs one line, not the chat).
TOOL_CLASSES = {"python": ("mlx_oss.tools.python", "PythonTool"), "browser": ("mlx_oss.tools.browser", "BrowserTool")}
DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"


class UnreadableText(MlxOssError):
    """A message the tokenizer could not take in reasonable time, or at all."""


def format_stats(done: Done) -> str:
    s = done.stats
    where = " on disk" if s.reused_from == "disk" else ""
    text = (
        f"{s.generated_tokens} tokens, {s.decode_tokens_per_s:.1f} tokens/s; "
        f"prompt {s.prompt_tokens} tokens ({s.reused_tokens} cached{where}) at {s.prefill_tokens_per_s:.0f} tokens/s, "
        f"first token after {s.time_to_first_token_s:.2f} s"
    )
    if s.acceptance_rate is not None:
        text += f"; {s.accepted_tokens} of {s.drafted_tokens} drafted accepted ({s.acceptance_rate:.0%})"
    notes = [STOP_NOTES[done.stop_reason]] if done.stop_reason in STOP_NOTES else []
    if done.malformed:
        notes.append("output broke the harmony format and is shown as text")
    return f"[{text}{''.join('; ' + n for n in notes)}]"


class Display:
    """Writes one turn's events: reasoning dimmed under its own label, then the answer, then the figures."""

    def __init__(self, answer: TextIO, side: TextIO, color: bool, show_reasoning: bool):
        self.answer_stream, self.side_stream = answer, side
        self.color, self.show_reasoning = color, show_reasoning
        self._section: str | None = None  # "reasoning" or "answer": what was written last

    def _style(self, code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if self.color else text

    def event(self, event) -> None:
        if isinstance(event, ReasoningDelta) and self.show_reasoning:
            if self._section != "reasoning":
                self._switch("reasoning")
                self.side_stream.write(self._style(BOLD, "reasoning:") + "\n")
            self.side_stream.write(self._style(DIM, event.text))
            self.side_stream.flush()
        elif isinstance(event, AnswerDelta):
            if self._section != "answer":
                self._switch("answer")
            self.answer_stream.write(event.text)
            self.answer_stream.flush()
        elif isinstance(event, ToolCall):
            self._switch("tool")
            self.side_stream.write(f"[tool call {event.recipient}: {event.arguments}]\n")
        elif isinstance(event, ToolStarted):
            self._tool_block(f"{event.recipient} call:", event.content)
        elif isinstance(event, ToolFinished):
            output = event.output
            shown = output.display or output.text
            shown += "".join(f"\n[file: {path}]" for path in output.files)
            error = "error, " if output.error else ""
            self._tool_block(f"{event.recipient} output ({error}{event.seconds:.1f} s):", shown)
        elif isinstance(event, Done):
            self._switch(None)
            self.side_stream.write(self._style(DIM, format_stats(event)) + "\n")
            self.side_stream.flush()

    def _tool_block(self, label: str, text: str) -> None:
        """A tool call or its output, dimmed like reasoning (it is part of the model's working), shown whatever
        /reasoning says: what ran on the user's computer is never hidden."""
        self._switch("tool")
        self.side_stream.write(self._style(BOLD, label) + "\n" + self._style(DIM, text.rstrip("\n")) + "\n")
        self.side_stream.flush()

    def _switch(self, section: str | None) -> None:
        """End the section written last (with a blank line after reasoning) before `section` begins."""
        if self._section == "reasoning":
            self.side_stream.write("\n\n" if section == "answer" else "\n")
        elif self._section == "tool" and section == "answer":
            self.side_stream.write("\n")
        elif self._section == "answer":
            self.answer_stream.write("\n")
        self.answer_stream.flush()
        self.side_stream.flush()
        self._section = section


@dataclass
class ChatSettings:
    sampling: SamplingParams
    show_reasoning: bool


def session_work_dir() -> Path:
    """python's working folder for one chat session: its own folder under the user data dir, named by when the
    chat started, so files from earlier chats stay where they were."""
    import platformdirs

    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return platformdirs.user_data_path("mlx-oss") / "python" / f"chat_{stamp}_{os.getpid()}"


class ChatTools:
    """The built-in tools of one chat session: each built when first turned on (its module imported then), kept
    while the chat runs (python's variables survive being turned off and on), closed when the chat ends."""

    def __init__(self, settings: ToolSettings, say=print):
        self.settings, self.say = settings, say
        self.built: dict[str, BuiltinTool] = {}
        self.enabled: list[str] = []
        self.problems: dict[str, str] = {}  # why a tool cannot be turned on
        self.announced = False  # python's working folder was printed

    def turn_on(self, name: str) -> bool:
        """Turns `name` on, or says in one line why it cannot be."""
        tool = self.built.get(name) or self._build(name)
        if tool is None:
            return False
        problem = tool.unavailable()
        if problem:
            self.problems[name] = problem
            self.say(f"({name} is not available: {problem})")
            return False
        self.problems.pop(name, None)
        if name not in self.enabled:
            self.enabled.append(name)
        return True

    def reset(self) -> None:
        """A new conversation: the tools on start afresh (python forgets its variables); the working folder stays."""
        enabled = list(self.enabled)
        self.close()
        self.built.clear()
        self.enabled.clear()
        for name in enabled:
            self.turn_on(name)

    def turn_off(self, name: str) -> None:
        if name in self.enabled:
            self.enabled.remove(name)

    def running(self) -> dict[str, BuiltinTool]:
        return {name: self.built[name] for name in self.enabled}

    def close(self) -> None:
        for tool in self.built.values():
            with contextlib.suppress(Exception):
                tool.close()

    def _build(self, name: str) -> BuiltinTool | None:
        module_name, class_name = TOOL_CLASSES[name]
        try:
            tool_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            self.problems[name] = f"its module cannot be loaded ({e})"
            self.say(f"({name} is not available: {self.problems[name]})")
            return None
        if name == PYTHON:
            if self.settings.work_dir is None:
                self.settings.work_dir = session_work_dir()
            self.settings.work_dir.mkdir(parents=True, exist_ok=True)
            tool = tool_class(self.settings, self.settings.work_dir)
            if not self.announced:
                self.say(f"(python's working folder: {self.settings.work_dir})")
                self.announced = True
        else:
            tool = tool_class(self.settings)
        self.built[name] = tool
        return tool


class ChatSession:
    """One conversation with one engine: send a user message, stream the turn (tool calls included), keep the
    history."""

    def __init__(
        self, engine: Engine, conversation: Conversation, settings: ChatSettings, tools: ChatTools | None = None
    ):
        self.engine, self.settings = engine, settings
        self.conversation = conversation
        self.tools = tools or ChatTools(ToolSettings(), say=lambda line: None)

    def reset(self) -> None:
        self.conversation.messages.clear()
        self.tools.reset()

    def send(self, text: str, display: Display, cancel: CancelToken) -> Done:
        if longest_run(text) > MAX_RUN:  # the tokenizer's time goes with its square; a million overflow it
            raise UnreadableText(
                f"the message has more than {MAX_RUN} letters, symbols or spaces in a row, which the tokenizer "
                "cannot take; break the run up"
            )
        self.conversation.current_date = datetime.date.today().isoformat()
        self.conversation.builtin_tools = tuple(self.tools.enabled)
        start = len(self.conversation.messages)
        self.conversation.messages.append(Message.user(text))
        done = None
        try:
            tools = self.tools.running()
            for event in run_turn(self.engine, self.conversation, tools, self.settings.sampling, cancel):
                display.event(event)
                if isinstance(event, Done):
                    done = event
        except BaseException:
            del self.conversation.messages[start:]  # the turn never happened: ask again
            raise
        return done


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory, or a hub name such as openai/gpt-oss-20b")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    add_kv_bits_argument(p)
    p.add_argument(
        "--context",
        type=context_length,
        default="auto",
        help="tokens of context (default auto: the longest that fits in this computer's memory, at most the model's)",
    )
    p.add_argument("--reasoning", choices=REASONING_EFFORTS, default="medium", help="reasoning effort")
    p.add_argument("--system", help="instructions for the model (the developer message)")
    p.add_argument("--temperature", type=number_from(0), default=1.0, help="0 picks the likeliest token (default 1.0)")
    p.add_argument(
        "--top-p", type=number_from(0, 1, low_open=True), default=1.0, help="above 0, at most 1 (default 1.0)"
    )
    p.add_argument("--seed", type=non_negative_int, help="makes sampling reproducible (0 or more)")
    p.add_argument(
        "--max-tokens", type=positive_int, help="most tokens per answer, reasoning included (default: no limit)"
    )
    p.add_argument(
        "--tools",
        type=tool_names,
        default=(),
        metavar="python,browser",
        help="built-in tools the model may use: python (sandboxed, in a working folder) and browser (web search)",
    )
    p.add_argument(
        "--show-reasoning",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show the model's reasoning above the answer (default: shown)",
    )
    prompt_cache.add_flags(p)
    add_draft_arguments(p)
    return p


def tool_names(text: str) -> tuple[str, ...]:
    """`--tools`: comma-separated built-in tool names."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in BUILTIN_TOOLS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown tool {unknown[0]!r}: the tools are {', '.join(BUILTIN_TOOLS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    write_what_the_terminal_can()
    if args.system is not None and not is_text(args.system):
        raise MlxOssError("--system is not text in this terminal's encoding")
    sampling = SamplingParams(args.temperature, args.top_p, args.seed, args.max_tokens)
    conversation = Conversation(reasoning_effort=args.reasoning, instructions=args.system)
    interactive = sys.stdin.isatty()
    path = model_directory(args.model, args.backend, interactive)
    piped = None if interactive else read_piped()  # before the load: a wrong input costs no waiting
    say = print if interactive else lambda line: print(line, file=sys.stderr)
    context = context_for_load(path, args.backend, args.context, args.kv_bits, say)  # one line, before any loading
    if interactive:
        print(f"loading {path} ...", flush=True)
    from .loading import load

    model = load(path, backend=args.backend)
    model.kv_bits = args.kv_bits
    tools = ChatTools(ToolSettings(enabled=args.tools), say)
    engine = Engine(
        model,
        context_length=context,
        draft_tokens=args.draft,
        prompt_cache=prompt_cache.PromptCacheSettings.from_args(args),
    )
    session = ChatSession(engine, conversation, ChatSettings(sampling, args.show_reasoning), tools)
    try:
        for name in args.tools:
            tools.turn_on(name)
        if piped is not None:
            return answer_piped(session, piped)
        print(
            f"mlx-oss chat: {path} ({format_count(parameter_count(model.config))} parameters, {model.backend} "
            f"backend ({model.backend_reason}), reasoning {args.reasoning}"
            f"{', tools ' + ', '.join(tools.enabled) if tools.enabled else ''})\n"
            "/help lists the commands, /quit leaves, Ctrl-C stops an answer."
        )
        return chat_loop(session)
    finally:
        tools.close()


def write_what_the_terminal_can() -> None:
    """Let stdout write an answer its encoding cannot hold with "?" in place of what it lacks, and stderr (the
    reasoning, when the answer is piped) with escapes, as Python's stderr does by default.

    A redirected stdout on Windows is cp1252, and a non-UTF-8 locale gives another 8-bit code page: the model
    writes any character, and the strict default stopped the chat mid-answer with a traceback.
    """
    for stream, errors in ((sys.stdout, "replace"), (sys.stderr, "backslashreplace")):
        reconfigure = getattr(stream, "reconfigure", None)  # absent where stdout was replaced (a test's capture)
        if reconfigure is not None and (stream is sys.stdout or stream.errors == "strict"):
            reconfigure(errors=errors)


def model_directory(arg: str, backend: str, interactive: bool) -> Path:
    """The directory `--model` names; a hub model not on this computer is offered for download in a terminal."""
    from .store import ModelStore, is_hub_name, resolve_model

    try:
        return resolve_model(arg, backend)
    except MlxOssError:
        if not (interactive and is_hub_name(arg) and not Path(arg).parent.is_dir()):
            raise
    answer = input(f"{arg} is not on this computer. Download it from the hub now? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise MlxOssError(f"{arg} is not on this computer; get it with: python -m mlx_oss.models download {arg}")
    from .models_cli import download_with_progress

    store = ModelStore()
    download_with_progress(arg, store)
    return store.resolve(arg, backend)


def read_piped() -> str:
    """What was piped in, as text in stdin's encoding (the locale's, UTF-8 nearly everywhere).

    Undecodable bytes are refused rather than replaced: they mean a binary file or another encoding was piped
    by mistake, and the model would answer a question with holes in it without saying so. The bytes are decoded
    here, strictly: in the C locale Python's stdin would turn them into lone surrogates, which fail later.
    """
    encoding = sys.stdin.encoding or "utf-8"
    try:
        text = sys.stdin.buffer.read().decode(encoding)
    except UnicodeDecodeError as e:
        raise MlxOssError(
            f"stdin is not {encoding} text (byte {e.start}: {e.reason}); "
            f"convert it first, e.g. with iconv -t {encoding}"
        ) from None
    if not text.strip():
        raise MlxOssError("nothing to answer: stdin was empty")
    return text


def is_text(text: str) -> bool:
    """Whether `text` is real text: undecodable input bytes arrive as lone surrogates (Python's
    surrogateescape), which the model's tokenizer refuses."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def answer_piped(session: ChatSession, text: str) -> int:
    display = Display(sys.stdout, sys.stderr, color=False, show_reasoning=session.settings.show_reasoning)
    session.send(text.strip(), display, CancelToken())
    return 0


def chat_loop(session: ChatSession) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    color = sys.stdout.isatty()
    prompt = ">>> "
    while True:
        try:
            line = input(prompt)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D leaves the chat)")
            continue
        except UnicodeDecodeError:
            line = "\udcff"  # as the C locale's stdin gives undecodable bytes: answered just below
        text = line.strip()
        if not is_text(text):
            print(f"(that line is not {sys.stdin.encoding} text; nothing was sent)")
            continue
        if not text:
            continue
        if text.startswith("/"):
            if run_command(session, text) == "quit":
                return 0
            continue
        display = Display(sys.stdout, sys.stdout, color, session.settings.show_reasoning)
        try:
            with cancel_on_ctrl_c() as cancel:
                session.send(text, display, cancel)
        except (ContextLimitError, UnreadableText) as e:
            print(f"error: {e}")


@contextlib.contextmanager
def cancel_on_ctrl_c() -> Iterator[CancelToken]:
    """A cancel token that Ctrl-C sets (instead of raising KeyboardInterrupt) while the block runs."""
    cancel = CancelToken()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.cancel())
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def run_command(session: ChatSession, text: str) -> str | None:
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return "quit"
    if name == "/reset":
        session.reset()
        print("(new conversation)")
    elif name == "/effort" and arg in REASONING_EFFORTS:
        session.conversation.reasoning_effort = arg
        print(f"(reasoning effort: {arg})")
    elif name == "/effort":
        print(f"(current effort: {session.conversation.reasoning_effort}; /effort {'|'.join(REASONING_EFFORTS)})")
    elif name == "/reasoning" and arg in ("show", "hide"):
        session.settings = replace(session.settings, show_reasoning=arg == "show")
        print(f"(reasoning {'shown' if arg == 'show' else 'hidden'})")
    elif name == "/tools":
        tools_command(session.tools, arg)
    elif name == "/help":
        print(COMMANDS)
    else:
        print(f"(unknown command {text!r})\n{COMMANDS}")
    return None


def tools_command(tools: ChatTools, arg: str) -> None:
    """`/tools` lists the tools; `/tools NAME on|off` turns one on or off (from the next message on)."""
    name, _, state = arg.partition(" ")
    state = state.strip()
    if not arg:
        for tool in BUILTIN_TOOLS:
            problem = tools.problems.get(tool)
            print(f"({tool}: {'on' if tool in tools.enabled else 'not available: ' + problem if problem else 'off'})")
    elif name in BUILTIN_TOOLS and state in ("on", "off"):
        if state == "off":
            tools.turn_off(name)
            print(f"({name} off)")
        elif tools.turn_on(name):
            print(f"({name} on)")
    else:
        print(f"(/tools NAME on|off, NAME one of {', '.join(BUILTIN_TOOLS)})")


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), PROG)
