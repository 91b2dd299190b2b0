"""Shared by the harmony, engine and chat tests: harmony tokens from text, and models that say what we want."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np

from mlx_oss.harmony import encoding
from mlx_oss.tools import ToolOutput


def harmony_tokens(text: str) -> list[int]:
    """Tokens of `text`, harmony's special tokens (`<|start|>`, ...) included as such."""
    return encoding().encode(text, allowed_special="all")


class TokenCache:
    """A cache that only remembers which tokens it holds (what the engine asks of a cache)."""

    def __init__(self):
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> int:
        assert 0 <= n <= self.length
        del self.tokens[n:]
        return n

    def copy(self) -> TokenCache:
        new = TokenCache()
        new.tokens = list(self.tokens)
        return new

    def nbytes(self) -> int:
        return 8 * len(self.tokens)


class ScriptedModel:
    """A model whose logits favour, after the prompt, the tokens of `script` one by one (then token 0), so the
    stop, tool-call and malformed paths can be tested token for token.

    Call `expect(prompt)` before each generation. `step_delay` slows every forward pass down.
    """

    def __init__(self, vocab_size: int = 201088, context: int = 131072, step_delay: float = 0.0):
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=context)
        self.step_delay = step_delay
        self.script: list[int] = []
        self.prompt_length = 0
        self.forward_calls = 0
        self.forward_started = threading.Event()

    def expect(self, prompt: list[int], script: list[int]) -> None:
        self.prompt_length, self.script = len(prompt), script

    def new_cache(self) -> TokenCache:
        return TokenCache()

    def forward(self, token_ids, cache: TokenCache, last_only: bool = False) -> np.ndarray:
        self.forward_calls += 1
        self.forward_started.set()
        if self.step_delay:
            time.sleep(self.step_delay)
        cache.tokens.extend(int(t) for t in token_ids)
        step = cache.length - self.prompt_length
        logits = np.zeros((1, self.config.vocab_size), np.float32)
        logits[0, self.script[step] if 0 <= step < len(self.script) else 0] = 30.0
        return logits


class PromptScriptedModel(ScriptedModel):
    """A model whose next tokens depend on the prompt: at each generation it plays the harmony tokens of
    `respond(prompt text)` (a reply such as `<|channel|>final<|message|>Done.<|return|>`), so a client that
    drives several turns by itself (an agent running tools between them) gets the turn its conversation calls
    for. A long prompt is prefilled in chunks, so `respond` also sees its beginnings (their replies are never
    played). `prompts` keeps every prompt seen, as text.
    """

    def __init__(self, respond, **options):
        super().__init__(**options)
        self.respond = respond
        self.prompts: list[str] = []
        self._decoding_after: tuple[int, int] | None = None  # (cache length, token) a decode step continues
        self._prefilled = -1  # the cache length after the last prefill chunk (the next chunk continues there)

    def forward(self, token_ids, cache: TokenCache, last_only: bool = False) -> np.ndarray:
        fed = [int(t) for t in token_ids]
        if self._decoding_after is None or (cache.length, fed) != (self._decoding_after[0], [self._decoding_after[1]]):
            prompt = cache.tokens + fed  # a prompt (or its next chunk): what to say depends on all of it
            if cache.length == self._prefilled and self.prompts:
                self.prompts.pop()  # the prompt's earlier chunk
            self.prompts.append(encoding().decode(prompt))
            self.expect(prompt, harmony_tokens(self.respond(self.prompts[-1])))
            self._prefilled = len(prompt)
        else:
            self._prefilled = -1  # decoding: the next prompt is a new one, even where it starts
        logits = super().forward(token_ids, cache, last_only)
        self._decoding_after = (cache.length, int(np.argmax(logits[-1])))
        return logits


class FakeTool:
    """A built-in tool (the `BuiltinTool` contract) that answers `output`, records its calls, and can wait to be
    cancelled; built like the real ones (`FakeTool(settings, work_dir)`) so the chat can import it in their place."""

    name = "python"

    def __init__(self, settings=None, work_dir=None, *, output="4\n", unavailable=None, wait_for_cancel=False):
        self.settings, self.work_dir = settings, work_dir
        self.output, self.reason, self.wait_for_cancel = output, unavailable, wait_for_cancel
        self.calls: list[tuple[str, str]] = []
        self.running = threading.Event()
        self.saw_cancel = False
        self.closed = False

    def unavailable(self):
        return self.reason

    def run(self, recipient, content, cancel):
        self.calls.append((recipient, content))
        if self.wait_for_cancel:
            self.running.set()
            self.saw_cancel = cancel.wait(30)
            return ToolOutput("KeyboardInterrupt", error=True)
        return ToolOutput(self.output, display=f"full: {self.output}")

    def close(self):
        self.closed = True


class UnavailableBrowser(FakeTool):
    """A browser that cannot run here, as BrowserTool(settings) is built."""

    name = "browser"

    def __init__(self, settings=None):
        super().__init__(settings, unavailable="offline (no network)")
