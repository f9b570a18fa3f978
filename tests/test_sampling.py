import math

import pytest
import torch

from deepseek_ocr_server.sampling import NgramBlocker, Sampler, SamplingParams


def hf_banned(tokens: list[int], n: int) -> set[int]:
    """Straight transformers-style scan: every earlier (n-1)-gram equal to the tail bans its follower."""
    if len(tokens) + 1 < n:
        return set()
    tail = tuple(tokens[len(tokens) - n + 1 :])
    out = set()
    for i in range(len(tokens) - n + 1):
        if tuple(tokens[i : i + n - 1]) == tail:
            out.add(tokens[i + n - 1])
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_ngram_blocker_matches_full_scan(n):
    g = torch.Generator().manual_seed(n)
    seq = torch.randint(0, 4, (60,), generator=g).tolist()
    blocker = NgramBlocker(n, seq[:10])
    for i in range(10, len(seq)):
        assert blocker.banned() == hf_banned(seq[:i], n), i
        blocker.push(seq[i])


def test_no_repeat_ngram_bans_crafted_token():
    s = Sampler(SamplingParams(no_repeat_ngram_size=3), [5, 6, 7, 5, 6])
    logits = torch.zeros(10)
    logits[7] = 10.0
    out = s.process(logits)
    assert out[7] == -math.inf and s.choose(logits) != 7
    # size 0 disables it
    s0 = Sampler(SamplingParams(no_repeat_ngram_size=0), [5, 6, 7, 5, 6])
    assert s0.choose(logits) == 7


def test_repetition_penalty_hf_semantics():
    s = Sampler(SamplingParams(repetition_penalty=2.0, no_repeat_ngram_size=0), [1, 2])
    logits = torch.tensor([1.0, 4.0, -4.0, 3.0])
    out = s.process(logits)
    assert out.tolist() == [1.0, 2.0, -8.0, 3.0]
    assert s.choose(logits) == 3  # penalised 1 (4 -> 2) loses to 3


def test_seeded_sampling_reproducible_and_seed_sensitive():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(do_sample=True, temperature=1.0, seed=123, no_repeat_ngram_size=0)

    def draw(params):
        s = Sampler(params, [])
        return [s.choose(logits) for _ in range(30)]

    assert draw(p) == draw(p)
    assert draw(p) != draw(SamplingParams(do_sample=True, temperature=1.0, seed=124, no_repeat_ngram_size=0))


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0, -2.0])
    s = Sampler(SamplingParams(do_sample=True, temperature=1.0, top_k=2, seed=1, no_repeat_ngram_size=0), [])
    assert {s.choose(logits) for _ in range(200)} <= {0, 1}
    s = Sampler(SamplingParams(do_sample=True, temperature=1.0, top_p=0.5, seed=1, no_repeat_ngram_size=0), [])
    assert {s.choose(logits) for _ in range(200)} == {0}


def test_greedy_when_temperature_zero_even_with_do_sample():
    logits = torch.tensor([0.0, 3.0, 1.0])
    s = Sampler(SamplingParams(do_sample=True, temperature=0.0, no_repeat_ngram_size=0), [])
    assert s.choose(logits) == 1


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1), dict(top_p=1.5), dict(top_p=0.0), dict(top_k=0), dict(repetition_penalty=0),
     dict(no_repeat_ngram_size=-1)],
)
def test_validate_rejects(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs).validate()


def test_generate_caps_the_budget_at_the_context():
    """A budget beyond the model's context ends with 'length' at the context edge, never a cache error."""
    from deepseek_ocr_server.engine.generate import generate
    from deepseek_ocr_server.models.base import InputError
    from deepseek_ocr_server.testing.fake import FakeOcrModel

    m = FakeOcrModel()
    prepared = m.prepare("a b c d e f g h i j k l m n o p", [])
    assert m.answer_length(prepared) > 3  # the answer would be longer than the room left
    m.max_context = prepared.num_prompt_tokens + 3
    r = generate(m, prepared, SamplingParams(no_repeat_ngram_size=0), max_new_tokens=10_000)
    assert (r.completion_tokens, r.finish_reason) == (3, "length")
    assert r.token_ids == m.expected_greedy(prepared, 3)
    m.max_context = prepared.num_prompt_tokens
    with pytest.raises(InputError, match="context"):
        generate(m, prepared, max_new_tokens=5)
