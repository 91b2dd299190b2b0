"""Speculative decoding by prompt lookup: the drafts, the rule that keeps the sampler's distribution, and the token
loop that verifies drafts in one pass giving plain decoding's tokens and leaving the cache as plain decoding does."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_variant
from harmony_helpers import harmony_tokens

import mlx_oss
import mlx_oss.engine
from mlx_oss.bench_drafting import Replay
from mlx_oss.drafting import MAX_PAUSE, PROBE_AFTER, PromptLookup, best_draft_length, find_draft
from mlx_oss.engine import Done, Engine
from mlx_oss.errors import MlxOssError
from mlx_oss.generate import Completion, Decoder
from mlx_oss.sampling import (
    SamplingParams,
    accept_or_resample,
    clear_argmax,
    make_sampler,
    sampling_weights,
)

VOCAB = 500
SHAPE = dict(num_hidden_layers=3, sliding_window=5, vocab_size=VOCAB, seed=7)
GREEDY = SamplingParams(temperature=0)


def test_find_draft_takes_the_longest_latest_match():
    history = np.array([1, 2, 3, 9, 9, 7, 2, 3, 5, 6, 1, 2, 3])
    assert find_draft(history, 3, min_match=1, max_match=4) == [9, 9, 7]  # "1 2 3" matched, not the later "2 3"
    assert find_draft(np.array([5, 2, 3, 4, 8, 2, 3, 6, 2, 3]), 2) == [6, 2]  # the latest "2 3"
    assert find_draft(history, 0) == []
    assert find_draft(np.array([1, 2, 3, 4]), 4) == []  # nothing occurs twice
    assert find_draft(np.array([4, 5, 1, 4]), 4) == []  # a one-token match is not enough by default
    assert find_draft(np.array([4, 5, 1, 4]), 4, min_match=1) == [5, 1, 4]


def test_find_draft_prefers_an_occurrence_that_a_whole_draft_follows():
    run = np.array([7, 8, 0, 1, 2, 7, 8, 7, 8])
    assert find_draft(run, 3) == [0, 1, 2]  # the latest "7 8" has only one token after it
    assert find_draft(run, 1) == [7]


def test_prompt_lookup_drafts_from_the_output_too_and_adapts():
    lookup = PromptLookup([1, 2, 3, 4, 5], max_tokens=4)
    assert lookup.propose([9], limit=8) == []
    assert lookup.propose([9, 1, 2], limit=8) == [3, 4, 5, 9]
    assert lookup.propose([9, 1, 2], limit=2) == [3, 4]  # within the caller's limit
    lookup.update(4, 1, 0.0)
    assert lookup.length == 2  # one more than accepted
    lookup.update(2, 2, 0.0)
    assert lookup.length == 4  # doubled after a whole draft accepted
    pauses = []
    for _ in range(6):
        lookup.update(4, 0, 0.0)
        pause = 0
        while lookup.propose([9, 1, 2], limit=8) == []:
            pause += 1
        pauses.append(pause)
    assert pauses == [1, 2, 4, 8, MAX_PAUSE, MAX_PAUSE] and lookup.length == 1


def test_draft_length_weighs_acceptance_against_the_cost_of_a_pass():
    assert best_draft_length(0.5, {}, 4) == 4  # nothing timed yet
    assert best_draft_length(0.5, {1: 1.0, 5: 4.0}, 4) == 0  # a pass per token costs nearly as much: not worth it
    assert best_draft_length(0.9, {1: 1.0, 5: 1.2}, 4) == 4
    assert best_draft_length(1.0, {1: 1.0}, 6) == 6  # prior cost: 1 + k/2 one-token passes, for k + 1 tokens
    assert best_draft_length(0.6, {1: 1.0}, 6) == 1  # 1.6 tokens for 1.5 passes; a second draft gives 0.36 for 0.5
    assert best_draft_length(0.6, {1: 1.0, 2: 1.8}, 6) == 0


def test_prompt_lookup_stops_drafting_where_passes_cost_too_much_and_probes_later():
    lookup = PromptLookup([1, 2, 3, 4, 5, 1, 2], max_tokens=4)
    lookup.update(0, 0, 1.0)
    lookup.update(1, 0, 2.0)  # checking one drafted token cost two passes, and it was rejected
    skipped = 0
    while lookup.propose([], limit=8) == []:
        lookup.update(0, 0, 1.0)  # the plain steps taken instead
        skipped += 1
    assert skipped == 1 + PROBE_AFTER  # the pause after a rejection, then the probe: one token checked again


def test_accept_or_resample_keeps_the_distribution():
    logits = np.array([2.0, 1.5, 0.3, -1.0, 1.9, 0.0], dtype=np.float32)
    rng = np.random.default_rng(3)
    draws = 40_000
    for temperature, top_p, draft in [(1.0, 1.0, 0), (0.7, 1.0, 2), (1.3, 0.8, 1), (1.0, 0.6, 3)]:
        ids, weights = sampling_weights(logits, temperature, top_p)
        p = np.zeros(logits.size)
        p[ids if ids is not None else np.arange(logits.size)] = weights / weights.sum()
        picks = [accept_or_resample(logits, draft, temperature, top_p, rng) for _ in range(draws)]
        counts = np.bincount([t for t, _ in picks], minlength=logits.size) / draws
        assert np.all(np.abs(counts - p) <= 5 * np.sqrt(p * (1 - p) / draws) + 1e-9), (temperature, top_p, counts, p)
        accepted = np.mean([a for _, a in picks])
        assert abs(accepted - p[draft]) <= 5 * np.sqrt(p[draft] * (1 - p[draft]) / draws) + 1e-9
        assert all(a == (t == draft) for t, a in picks)


def test_clear_argmax_refuses_a_near_tie():
    assert clear_argmax(np.array([0.0, 3.0, 1.0])) == 1
    assert clear_argmax(np.array([0.0, 3.0, 3.0 + 1e-7], dtype=np.float32)) is None


@pytest.fixture(scope="module", params=["numpy", "numpy-plain", "mlx"])
def model(request, synthetic_checkpoint):
    return load_variant(synthetic_checkpoint(**SHAPE), request.param)


def prompts(count: int) -> list[list[int]]:
    """Random prompts, every other one made of a phrase said three times (lookup finds what follows)."""
    rng = np.random.default_rng(11)
    out = []
    for i in range(count):
        phrase = rng.integers(0, VOCAB, int(rng.integers(3, 8))).tolist()
        out.append(phrase * 3 if i % 2 else rng.integers(0, VOCAB, int(rng.integers(2, 20))).tolist())
    return out


def test_speculative_greedy_is_plain_greedy(model):
    """Drafts of every quality (the plain continuation replayed, half right, always wrong, and prompt lookup) give
    plain decoding's tokens, and the cache ends holding what plain decoding's does."""
    accepted = rejected = 0
    for prompt in prompts(8):
        decoder = Decoder(model)
        plain = list(Completion(decoder, prompt, make_sampler(GREEDY), max_tokens=20))
        assert decoder.fed == prompt + plain[:-1]
        drafters = [Replay(plain, rate, 4, VOCAB) for rate in (1.0, 0.5, 0.0)]
        drafters.append(PromptLookup(prompt, 4, min_match=1))
        for drafter in drafters:
            decoder = Decoder(model)
            completion = Completion(decoder, prompt, make_sampler(GREEDY), max_tokens=20, drafter=drafter)
            assert list(completion) == plain, type(drafter).__name__
            assert completion.stop_reason == "length" and decoder.fed == prompt + plain[:-1]
            assert decoder.cache.length == len(decoder.fed)
            stats = completion.stats()
            assert stats.drafted_tokens == completion.drafted and stats.accepted_tokens == completion.accepted
            accepted += completion.accepted
            rejected += completion.drafted - completion.accepted
    assert accepted > 100 and rejected > 100  # the drafts were really checked, both ways


def test_a_stop_token_ends_the_loop_and_leaves_no_draft_in_the_cache(model):
    prompt = prompts(1)[0]
    plain = list(Completion(Decoder(model), prompt, make_sampler(GREEDY), max_tokens=16))
    stop = plain[6]
    first = plain.index(stop)
    decoder = Decoder(model)
    completion = Completion(
        decoder, prompt, make_sampler(GREEDY), stop_tokens={stop}, drafter=Replay(plain, 1.0, 8, VOCAB)
    )
    assert list(completion) == plain[: first + 1] and completion.stop_reason == "stop"
    assert decoder.fed == prompt + plain[:first] and decoder.cache.length == len(decoder.fed)


def test_a_caller_that_stops_early_leaves_only_what_was_yielded(model):
    prompt = prompts(1)[0]
    plain = list(Completion(Decoder(model), prompt, make_sampler(GREEDY), max_tokens=12))
    decoder = Decoder(model)
    completion = Completion(decoder, prompt, make_sampler(GREEDY), drafter=Replay(plain, 1.0, 8, VOCAB))
    tokens = iter(completion)
    got = [next(tokens) for _ in range(3)]  # the pass after the first token checked 8 drafts
    assert got == plain[:3] and decoder.cache.length > len(prompt) + 2
    tokens.close()
    assert decoder.fed == prompt + plain[:2] and decoder.cache.length == len(decoder.fed)


def test_limits_and_logprobs_hold_with_drafts(model):
    prompt = prompts(2)[1]
    plain = Completion(Decoder(model), prompt, make_sampler(GREEDY), max_tokens=15, logprobs=2)
    tokens = list(plain)
    for max_tokens in (1, 2, 7):
        drafted = Completion(
            Decoder(model), prompt, make_sampler(GREEDY), max_tokens=max_tokens, drafter=Replay(tokens, 1.0, 4, VOCAB)
        )
        assert list(drafted) == tokens[:max_tokens] and drafted.stop_reason == "length"
    limit = len(prompt) + 9
    decoder = Decoder(model)
    drafted = Completion(
        decoder, prompt, make_sampler(GREEDY), context_length=limit, logprobs=2, drafter=Replay(tokens, 1.0, 4, VOCAB)
    )
    assert list(drafted) == tokens[:10] and drafted.stop_reason == "context_limit"
    assert decoder.cache.length == limit
    for mine, theirs in zip(drafted.logprobs, plain.logprobs, strict=False):
        assert mine.token == theirs.token and [t for t, _ in mine.top] == [t for t, _ in theirs.top]
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)


def test_seeded_sampling_with_drafts_is_reproducible(model):
    prompt = prompts(2)[1]
    sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=5)

    def sample() -> tuple[list[int], int]:
        completion = Completion(
            Decoder(model), prompt, make_sampler(sampling), max_tokens=24, drafter=PromptLookup(prompt, 4, min_match=1)
        )
        return list(completion), completion.drafted

    first, drafted = sample()
    assert drafted > 0 and sample() == (first, drafted)


def test_processors_turn_drafting_off(model):
    prompt = prompts(2)[1]
    calls = []

    def spy(tokens, logits):
        calls.append(len(tokens))
        return logits

    completion = Completion(
        Decoder(model), prompt, make_sampler(GREEDY), max_tokens=6, processors=[spy], drafter=PromptLookup(prompt)
    )
    list(completion)
    assert completion.drafted == 0 and calls == list(range(6))


def test_engine_turn_ends_at_a_stop_token_with_the_cache_as_yielded(tiny_checkpoint, monkeypatch):
    """The engine's next turn reuses its cache, so a turn that stops at harmony's stop token must leave exactly the
    tokens it yielded in it, whatever was drafted past the stop."""
    model = mlx_oss.load(tiny_checkpoint, backend="numpy")
    prompt = harmony_tokens("<|start|>user<|message|>Hi<|end|><|start|>assistant")
    plain = list(Completion(Decoder(model), prompt, make_sampler(GREEDY), max_tokens=12))
    stop = plain[5]
    monkeypatch.setattr(mlx_oss.engine, "STOP_TOKENS", frozenset({stop}))
    replay = Replay(plain, 1.0, 8, model.config.vocab_size)
    monkeypatch.setattr(mlx_oss.engine, "PromptLookup", lambda prompt, k: replay)
    engine = Engine(model, draft_tokens=8)
    done = list(engine.generate(prompt, GREEDY))[-1]
    assert isinstance(done, Done) and done.stop_reason == "stop"
    assert done.tokens == plain[: plain.index(stop) + 1] and done.stats.accepted_tokens > 0
    assert engine.decoder.fed == prompt + done.tokens[:-1] and engine.decoder.cache.length == len(engine.decoder.fed)
    again = list(engine.generate(prompt + done.tokens, GREEDY))[-1]
    assert again.stats.reused_tokens == len(prompt) + len(done.tokens) - 1


def test_engine_draft_setting_is_checked(tiny_checkpoint):
    model = mlx_oss.load(tiny_checkpoint, backend="numpy")
    with pytest.raises(MlxOssError, match="draft tokens must be from 0 to 16, not 17"):
        Engine(model, draft_tokens=17)
    assert Engine(model, draft_tokens=0)._drafts is False
