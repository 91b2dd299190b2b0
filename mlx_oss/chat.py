"""`python -m mlx_oss.chat`: talk to gpt-oss in the terminal.

Answers stream as they are generated, the reasoning set apart (dimmed) above the answer. Ctrl-C stops the
current answer and keeps the chat; /reset, /effort, /reasoning, /quit and /help are the commands. With stdin
not a terminal the chat answers what was piped in (answer on stdout, reasoning and figures on stderr) and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

from .cli import format_count, non_negative_int, number_from, positive_int, run
from .engine import CancelToken, ContextLimitError, Done, Engine, SamplingParams
from .errors import MlxOssError
from .harmony import REASONING_EFFORTS, AnswerDelta, Conversation, Message, ReasoningDelta, ToolCall
from .layouts import parameter_count
from .loading import BACKENDS
from .render_limits import MAX_RUN, longest_run

PROG = "python -m mlx_oss.chat"
COMMANDS = """commands:
  /reset                   start a new conversation
  /effort low|medium|high  set the reasoning effort
  /reasoning show|hide     show or hide the model's reasoning
  /quit                    leave the chat (Ctrl-D works too)
  /help                    this list
Ctrl-C stops the current answer."""
STOP_NOTES = {
    "length": "stopped at --max-tokens",
    "context_limit": "the context is full: /reset to start over",
    "cancelled": "stopped",
    "tool_call": "the model called a tool; this chat has none",
}
DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"


class UnreadableText(MlxOssError):
    """A message the tokenizer could not take in reasonable time, or at all."""


def format_stats(done: Done) -> str:
    s = done.stats
    text = (
        f"{s.generated_tokens} tokens, {s.decode_tokens_per_s:.1f} tokens/s; "
        f"prompt {s.prompt_tokens} tokens ({s.reused_tokens} cached) at {s.prefill_tokens_per_s:.0f} tokens/s, "
        f"first token after {s.time_to_first_token_s:.2f} s"
    )
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
        elif isinstance(event, Done):
            self._switch(None)
            self.side_stream.write(self._style(DIM, format_stats(event)) + "\n")
            self.side_stream.flush()

    def _switch(self, section: str | None) -> None:
        """End the section written last (with a blank line after reasoning) before `section` begins."""
        if self._section == "reasoning":
            self.side_stream.write("\n\n" if section == "answer" else "\n")
        elif self._section == "answer":
            self.answer_stream.write("\n")
        self.answer_stream.flush()
        self.side_stream.flush()
        self._section = section


@dataclass
class ChatSettings:
    sampling: SamplingParams
    show_reasoning: bool


class ChatSession:
    """One conversation with one engine: send a user message, stream the answer, keep the history."""

    def __init__(self, engine: Engine, conversation: Conversation, settings: ChatSettings):
        self.engine, self.settings = engine, settings
        self.conversation = conversation

    def reset(self) -> None:
        self.conversation.messages.clear()

    def send(self, text: str, display: Display, cancel: CancelToken) -> Done:
        if longest_run(text) > MAX_RUN:  # the tokenizer's time goes with its square; a million overflow it
            raise UnreadableText(
                f"the message has more than {MAX_RUN} letters, symbols or spaces in a row, which the tokenizer "
                "cannot take; break the run up"
            )
        self.conversation.current_date = datetime.date.today().isoformat()
        self.conversation.messages.append(Message.user(text))
        done = None
        try:
            for event in self.engine.respond(self.conversation, self.settings.sampling, cancel):
                display.event(event)
                if isinstance(event, Done):
                    done = event
        except BaseException:
            self.conversation.messages.pop()
            raise
        self.conversation.messages.extend(done.messages)
        return done


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory, or a hub name such as openai/gpt-oss-20b")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
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
        "--show-reasoning",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show the model's reasoning above the answer (default: shown)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.system is not None and not is_text(args.system):
        raise MlxOssError("--system is not text in this terminal's encoding")
    sampling = SamplingParams(args.temperature, args.top_p, args.seed, args.max_tokens)
    conversation = Conversation(reasoning_effort=args.reasoning, instructions=args.system)
    interactive = sys.stdin.isatty()
    path = model_directory(args.model, args.backend, interactive)
    piped = None if interactive else read_piped()  # before the load: a wrong input costs no waiting
    if interactive:
        print(f"loading {path} ...", flush=True)
    from .loading import load

    model = load(path, backend=args.backend)
    session = ChatSession(Engine(model), conversation, ChatSettings(sampling, args.show_reasoning))
    if piped is not None:
        return answer_piped(session, piped)
    print(
        f"mlx-oss chat: {path} ({format_count(parameter_count(model.config))} parameters, {model.backend} backend "
        f"({model.backend_reason}), reasoning {args.reasoning})\n"
        "/help lists the commands, /quit leaves, Ctrl-C stops an answer."
    )
    return chat_loop(session)


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
    elif name == "/help":
        print(COMMANDS)
    else:
        print(f"(unknown command {text!r})\n{COMMANDS}")
    return None


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]), PROG)
