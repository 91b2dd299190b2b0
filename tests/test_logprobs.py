"""Log-probabilities: each answer token's score is the one the model's distribution gives it (checked against a
full pass of the model), paired with the text it produced, and shown in OpenAI's shape."""

from __future__ import annotations

import math

import numpy as np
import pytest
from harmony_helpers import ScriptedModel, harmony_tokens

import mlx_oss
from mlx_oss.api import logprobs
from mlx_oss.api.fields import ApiError
from mlx_oss.engine import AnswerDelta, Done, Engine, SamplingParams
from mlx_oss.harmony import Conversation, Message, encoding, render_prompt
from mlx_oss.sampling import token_logprob


def log_softmax(row: np.ndarray, temperature: float) -> np.ndarray:
    scaled = row.astype(np.float64) / temperature
    return scaled - scaled.max() - np.log(np.exp(scaled - scaled.max()).sum())


def test_scores_are_the_models_distribution_at_the_temperature(tiny_checkpoint, float32_activations):
    model = mlx_oss.load(tiny_checkpoint, backend="numpy")
    prompt = render_prompt(Conversation([Message.user("Hello")]))
    events = list(Engine(model).generate(prompt, SamplingParams(temperature=0.7, seed=3, max_tokens=80, logprobs=5)))
    done = events[-1]
    assert isinstance(done, Done)
    scored = [s for e in events if isinstance(e, AnswerDelta) for s in e.logprobs]
    assert scored, "random weights break the format, so the output is answer text with scores"
    rows = np.asarray(model.logits(prompt + done.tokens[:-1]))[len(prompt) - 1 :]
    for score in scored:
        step = done.tokens.index(score.token)
        expected = log_softmax(rows[step], 0.7)
        assert score.logprob == pytest.approx(expected[score.token], abs=1e-4)
        assert [t for t, _ in score.top] == list(np.argsort(-expected, kind="stable")[:5])
        assert [lp for _, lp in score.top] == pytest.approx(sorted(expected, reverse=True)[:5], abs=1e-4)
    text = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    assert encoding().decode([s.token for s in scored]) == text  # every answer token scored once, in order


def test_only_answer_tokens_are_scored_and_nothing_when_not_asked():
    model = ScriptedModel()
    prompt = render_prompt(Conversation([Message.user("Hi")]))
    script = harmony_tokens(
        "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Hi there"
    )
    model.expect(prompt, [*script, 200002])
    events = list(Engine(model).generate(prompt, SamplingParams(temperature=0, logprobs=0)))
    answer = [e for e in events if isinstance(e, AnswerDelta)]
    assert [s.token for e in answer for s in e.logprobs] == harmony_tokens("Hi there")
    assert all(s.top == () and s.logprob == pytest.approx(0, abs=1e-6) for e in answer for s in e.logprobs)
    model.expect(prompt, [*script, 200002])
    plain = list(Engine(model).generate(prompt, SamplingParams(temperature=0)))
    assert all(e.logprobs == () for e in plain if isinstance(e, AnswerDelta))


def test_wire_entries_and_request_fields():
    score = token_logprob(np.array([0.0, 1.0, -np.inf, 2.0]), 1, 1.0, 3)
    assert [t for t, _ in score.top] == [3, 1, 0]
    (shown,) = logprobs.content([score])
    assert shown["token"] == encoding().decode([1]) and shown["bytes"] == list(encoding().decode([1]).encode())
    assert math.isclose(shown["logprob"], score.logprob)
    ruled_out = logprobs.entry(2, -math.inf)
    assert ruled_out["logprob"] == logprobs.IMPOSSIBLE  # JSON has no -Infinity
    assert logprobs.chat_request({}) is None and logprobs.chat_request({"logprobs": True}) == 0
    assert logprobs.chat_request({"logprobs": True, "top_logprobs": 20}) == 20
    for body, param in (
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
    ):
        with pytest.raises(ApiError) as caught:
            logprobs.chat_request(body)
        assert caught.value.param == param


def test_the_openai_client_reads_scores_in_chat_and_responses():
    """Chat's `logprobs`/`top_logprobs` and the Responses API's `include` give the answer tokens' entries, whole
    and streamed, and none when not asked for."""
    openai = pytest.importorskip("openai")
    from serving import serving

    from mlx_oss.api.chat_completions import parse_chat
    from mlx_oss.server import Server

    model = ScriptedModel()
    messages = [{"role": "user", "content": "Hi"}]
    prompt = render_prompt(parse_chat({"model": "scripted", "messages": messages}, "scripted").conversation)
    answer = harmony_tokens("Hello there, friend")
    script = [*harmony_tokens("<|channel|>final<|message|>"), *answer, 200002]
    with serving(Server(Engine(model), "scripted", max_waiting=1)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def ask(**options):
            model.expect(prompt, script)
            return client.chat.completions.create(model="scripted", messages=messages, temperature=0, **options)

        scored = ask(logprobs=True, top_logprobs=2).choices[0].logprobs.content
        assert [e.token for e in scored] == [encoding().decode([t]) for t in answer]
        assert all(e.logprob == pytest.approx(0, abs=1e-6) and len(e.top_logprobs) == 2 for e in scored)
        assert scored[0].top_logprobs[0].token == scored[0].token and scored[0].top_logprobs[1].logprob < -20
        assert ask().choices[0].logprobs is None
        chunks = [c for c in ask(logprobs=True, stream=True) if c.choices]
        streamed = [e.token for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert streamed == [e.token for e in scored]

        def respond(**options):
            model.expect(prompt, script)
            return client.responses.create(model="scripted", input="Hi", temperature=0, **options)

        text = respond(include=["message.output_text.logprobs"], top_logprobs=1).output[0].content[0]
        assert [e.token for e in text.logprobs] == [e.token for e in scored] and len(text.logprobs[0].top_logprobs) == 1
        assert not respond().output[0].content[0].logprobs
        events = list(respond(include=["message.output_text.logprobs"], stream=True))
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        assert [e.token for d in deltas for e in d.logprobs] == [e.token for e in scored]
