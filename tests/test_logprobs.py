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


def test_scores_are_the_models_distribution_at_the_temperature(tiny_checkpoint):
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
