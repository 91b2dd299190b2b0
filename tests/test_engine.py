"""The generation engine on the tiny synthetic checkpoint (NumPy backend) and on scripted models that force
specific tokens: reproducibility, prefix reuse, cancellation, stop tokens, tool calls, malformed output, limits."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from harmony_helpers import ScriptedModel, harmony_tokens

import mlx_oss
from mlx_oss.engine import (
    AnswerDelta,
    CancelToken,
    ContextLimitError,
    Done,
    Engine,
    EngineBusyError,
    ReasoningDelta,
    SamplingParams,
    ToolCall,
)
from mlx_oss.errors import MlxOssError
from mlx_oss.generate import PREFILL_CHUNK, Completion, Decoder
from mlx_oss.harmony import Conversation, Message, Tool, encoding, render_prompt
from mlx_oss.loading import BACKENDS
from mlx_oss.sampling import make_sampler, sample_token

GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module", params=[b for b in BACKENDS if b != "auto"])
def tiny(request, tiny_checkpoint):
    """The tiny synthetic checkpoint on every backend there is."""
    return mlx_oss.load(tiny_checkpoint, backend=request.param)


def chat(*messages: Message) -> Conversation:
    return Conversation(list(messages), current_date="2026-11-25")


def run(engine: Engine, prompt, sampling=GREEDY, cancel=None) -> tuple[list, Done]:
    events = list(engine.generate(prompt, sampling, cancel))
    assert isinstance(events[-1], Done) and not any(isinstance(e, Done) for e in events[:-1])
    return events[:-1], events[-1]


def test_greedy_is_reproducible_and_follows_the_full_pass(tiny):
    prompt = render_prompt(chat(Message.user("Hello")))
    _, first = run(Engine(tiny), prompt)
    _, second = run(Engine(tiny), prompt)
    assert first.tokens == second.tokens and len(first.tokens) == 8
    full = tiny.logits(prompt + first.tokens[:-1])  # no cache: every position at once
    assert first.tokens == [int(t) for t in full[len(prompt) - 1 :].argmax(axis=1)]


def test_a_seed_gives_the_same_sample_twice(tiny):
    prompt = render_prompt(chat(Message.user("Tell me a story")))
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_tokens=8)
    _, a = run(Engine(tiny), prompt, sampling)
    _, b = run(Engine(tiny), prompt, sampling)
    _, other = run(Engine(tiny), prompt, SamplingParams(temperature=1.0, top_p=0.95, seed=8, max_tokens=8))
    assert a.tokens == b.tokens
    assert other.tokens != a.tokens


def test_prefix_reuse_gives_what_a_fresh_prefill_gives(tiny):
    engine = Engine(tiny)
    convo = chat(Message.user("Hello"))
    _, turn1 = run(engine, render_prompt(convo))
    convo.messages += [*turn1.messages, Message.user("And then?")]
    prompt2 = render_prompt(convo)
    _, reused = run(engine, prompt2)
    _, fresh = run(Engine(tiny), prompt2)
    assert reused.tokens == fresh.tokens
    first_prompt = render_prompt(chat(Message.user("Hello")))
    assert reused.stats.reused_tokens >= len(first_prompt) - 1  # the whole first turn's prompt came from the cache
    assert fresh.stats.reused_tokens == 0
    _, again = run(engine, prompt2)  # the same prompt again: all but its last token reused
    assert again.stats.reused_tokens == len(prompt2) - 1 and again.tokens == fresh.tokens


def test_the_token_loop_runs_without_harmony(tiny):
    """The engine's token loop on its own (as the bench runs it): the same tokens, logits processors applied
    before the draw, and several drafted tokens checked in one pass and the rejected ones dropped."""
    prompt = render_prompt(chat(Message.user("Hello")))
    _, done = run(Engine(tiny), prompt)
    assert done.stop_reason == "length"
    greedy = make_sampler(SamplingParams(temperature=0))
    completion = Completion(Decoder(tiny), prompt, greedy, max_tokens=8)
    assert list(completion) == done.tokens and completion.stop_reason == "length"

    def ban_first(tokens, logits):
        logits = logits.copy()
        logits[done.tokens[0]] = -np.inf
        return logits

    banned = Completion(Decoder(tiny), prompt, greedy, max_tokens=1, processors=[ban_first])
    assert list(banned) != done.tokens[:1]
    decoder = Decoder(tiny)
    decoder.prefill(prompt)
    rows = decoder.forward(done.tokens[:3])
    assert [int(row.argmax()) for row in rows[:2]] == done.tokens[1:3]
    assert decoder.truncate(len(prompt) + 1) == len(prompt) + 1 and decoder.fed == prompt + done.tokens[:1]


def test_stop_on_return_ends_the_turn():
    model = ScriptedModel()
    engine = Engine(model)
    prompt = render_prompt(chat(Message.user("Hi")))
    script = harmony_tokens(
        "<|channel|>analysis<|message|>Say hi.<|end|><|start|>assistant<|channel|>final<|message|>Hi!"
    )
    model.expect(prompt, [*script, 200002, *harmony_tokens("never shown")])
    events, done = run(engine, prompt, SamplingParams(temperature=0))
    assert done.stop_reason == "stop" and done.tokens[-1] == 200002 and len(done.tokens) == len(script) + 1
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "Say hi."
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == "Hi!"
    assert done.messages == [Message.reasoning("Say hi."), Message.answer("Hi!")]
    assert not done.malformed


def test_function_tool_round_trip():
    """The model calls a tool and stops on <|call|>; the caller adds the result; the model answers from it."""
    model = ScriptedModel()
    engine = Engine(model)
    weather = Tool("get_weather", "Weather of a city.", {"type": "object", "properties": {"city": {"type": "string"}}})
    convo = Conversation([Message.user("Weather in Paris?")], tools=[weather], current_date="2026-11-25")
    prompt = render_prompt(convo)
    model.expect(
        prompt,
        harmony_tokens(
            "<|channel|>analysis<|message|>Use the tool.<|end|><|start|>assistant<|channel|>commentary "
            'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
        ),
    )
    events, done = run(engine, prompt, SamplingParams(temperature=0))
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert calls == [ToolCall("functions.get_weather", '{"city":"Paris"}', "commentary", "<|constrain|>json")]
    assert calls[0].function_name == "get_weather"
    assert done.stop_reason == "tool_call"

    convo.messages += done.messages
    convo.messages.append(Message.tool_result(calls[0].recipient, '{"celsius":21}'))
    prompt2 = render_prompt(convo)
    assert (
        encoding()
        .decode(prompt2)
        .endswith(
            '{"city":"Paris"}<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
            '{"celsius":21}<|end|><|start|>assistant'
        )
    )
    assert "Use the tool." in encoding().decode(prompt2)  # reasoning before a pending call stays
    model.expect(prompt2, harmony_tokens("<|channel|>final<|message|>21 °C.<|return|>"))
    events, done = run(engine, prompt2, SamplingParams(temperature=0))
    assert done.stats.reused_tokens > len(prompt)  # the cached call was reused up to the tool result
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == "21 °C."
    assert done.stop_reason == "stop"


def test_malformed_output_ends_the_turn_cleanly():
    model = ScriptedModel()
    engine = Engine(model)
    prompt = render_prompt(chat(Message.user("Hi")))
    model.expect(prompt, harmony_tokens("garbled header<|message|>some text<|end|>more<|return|>"))
    events, done = run(engine, prompt, SamplingParams(temperature=0))
    assert done.stop_reason == "stop" and done.malformed
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == "garbled headersome textmore"
    assert [m.channel for m in done.messages] == ["final"]


def test_random_weights_never_crash(tiny):
    """Random weights write no harmony at all: their tokens are shown as text and the turn ends at max tokens."""
    engine = Engine(tiny)
    prompt = render_prompt(chat(Message.user("Hello")))
    events, done = run(engine, prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=70))
    assert done.stop_reason == "length" and len(done.tokens) == 70
    assert done.malformed
    shown = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    assert shown and shown == "".join(m.content for m in done.messages)


def test_max_tokens_and_context_limit():
    model = ScriptedModel(context=100)
    engine = Engine(model)
    prompt = list(range(1000, 1090))
    model.expect(prompt, harmony_tokens("<|channel|>final<|message|>" + "word " * 40))
    _, done = run(engine, prompt, SamplingParams(temperature=0, max_tokens=5))
    assert done.stop_reason == "length" and len(done.tokens) == 5
    _, done = run(engine, prompt, SamplingParams(temperature=0))
    assert done.stop_reason == "context_limit"
    assert engine._cache.length == 100 and len(done.tokens) == 11  # 90 + 10 fed; the 11th is sampled, never fed
    with pytest.raises(ContextLimitError, match="the conversation is 100 tokens long and the context holds 100"):
        run(engine, list(range(1000, 1100)))


def test_cancellation_from_another_thread_stops_within_one_step():
    model = ScriptedModel(step_delay=0.05)
    engine = Engine(model)
    prompt = render_prompt(chat(Message.user("Hi")))
    model.expect(prompt, harmony_tokens("<|channel|>final<|message|>" + "word " * 500))
    cancel = CancelToken()
    calls_at_cancel = []

    def cancel_soon():
        time.sleep(0.3)
        calls_at_cancel.append(model.forward_calls)
        cancel.cancel()

    thread = threading.Thread(target=cancel_soon)
    start = time.perf_counter()
    thread.start()
    _, done = run(engine, prompt, SamplingParams(temperature=0), cancel)
    thread.join()
    assert done.stop_reason == "cancelled"
    assert time.perf_counter() - start < 0.3 + 3 * 0.05 + 0.5
    assert model.forward_calls <= calls_at_cancel[0] + 1  # at most the step already under way
    assert engine._cache.length == len(engine._fed)  # the cache stays usable for the next turn


def test_one_generation_at_a_time():
    model = ScriptedModel()
    engine = Engine(model)
    prompt = render_prompt(chat(Message.user("Hi")))
    model.expect(prompt, harmony_tokens("<|channel|>final<|message|>a b c<|return|>"))
    first = engine.generate(prompt, SamplingParams(temperature=0))
    next(first)
    with pytest.raises(EngineBusyError):
        next(engine.generate(prompt))
    with pytest.raises(EngineBusyError):
        engine.reset()
    first.close()  # an abandoned generation frees the engine
    engine.reset()
    assert engine._cache.length == 0
    _, done = run(engine, prompt, SamplingParams(temperature=0))
    assert done.stop_reason == "stop"


def test_sample_token():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, np.log(3.0), -1e9, 1.0], np.float32)
    assert sample_token(logits, 0.0, 1.0, rng) == 1
    draws = [sample_token(logits[:2], 1.0, 1.0, rng) for _ in range(4000)]
    assert abs(np.mean(draws) - 0.75) < 0.03  # p(1) = 3 / (1 + 3)
    assert {sample_token(logits, 1.0, 0.4, rng) for _ in range(200)} == {1}  # p(1) = 0.45: the nucleus is token 1
    assert {sample_token(logits, 1.0, 0.9, rng) for _ in range(400)} == {0, 1, 3}
    hot = [sample_token(logits[:2], 100.0, 1.0, rng) for _ in range(4000)]
    assert abs(np.mean(hot) - 0.5) < 0.04  # a high temperature flattens the distribution


def test_bad_sampling_settings_are_clear_errors():
    with pytest.raises(MlxOssError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(MlxOssError, match="top-p"):
        SamplingParams(top_p=0)
    with pytest.raises(MlxOssError, match="max tokens"):
        SamplingParams(max_tokens=0)


def test_a_long_prefill_checks_for_cancellation_between_chunks():
    model = ScriptedModel(step_delay=0.05)
    engine = Engine(model)
    prompt = list(range(1000, 1000 + 3 * PREFILL_CHUNK))
    model.expect(prompt, harmony_tokens("<|channel|>final<|message|>x<|return|>"))
    cancel = CancelToken()
    thread = threading.Thread(target=lambda: (model.forward_started.wait(), cancel.cancel()))
    thread.start()
    events = list(engine.generate(prompt, SamplingParams(temperature=0), cancel))
    thread.join()
    assert len(events) == 1 and events[0].stop_reason == "cancelled" and events[0].tokens == []
    assert model.forward_calls <= 2  # the chunk under way when the cancel came, at most one more
    prefilled = engine._cache.length
    assert prefilled == model.forward_calls * PREFILL_CHUNK
    _, done = run(engine, prompt, SamplingParams(temperature=0))
    assert done.stats.reused_tokens == prefilled  # the next call goes on from what was prefilled
    assert done.stop_reason == "stop"
