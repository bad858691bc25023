"""logprobs / top_logprobs, echo (prompt scoring), n > 1, best_of and seed through the official
`openai` client against a real target (tiny random models, in process, port 0), checked against
the target alone (HF forward, no engine code) in AR, SD and SSD; and the same over gRPC."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from client import Client, InvalidArgument  # noqa: E402
from conftest import save_tiny_pair  # noqa: E402
from exactref import ALPHA, chi_square_pvalue, exact_joint  # noqa: E402
from openai_gateway import BackgroundServer, create_app  # noqa: E402
from ssd_core.models import load_model  # noqa: E402

TOL = 1e-4
PROMPT = "def f(x):"
MODES = ("ar", "sd", "ssd")


class Served:
    """A target server with one registered draft and the gateway beside it, over one model pair."""

    def __init__(self, root: Path, vocab: int) -> None:
        import target_service.server as server_mod
        from draft_service.config import DraftServerConfig
        from draft_service.server import create_server as create_draft
        from target_service.config import TargetConfig

        self.target_dir, draft_dir = save_tiny_pair(root, vocab=vocab)
        self.target = load_model(self.target_dir)
        self.tok = self.target.tokenizer
        self.server, self.port = server_mod.create_server(TargetConfig(model=str(self.target_dir), port=0),
                                                          target=self.target)
        self.drafts, _ = create_draft(DraftServerConfig(port=0, targets=(f"127.0.0.1:{self.port}",)),
                                      model=load_model(draft_dir))
        self.drafts.start()
        self.drafts.start_registration().wait_registered(1, 20)
        self.gateway = BackgroundServer(create_app([f"127.0.0.1:{self.port}"], None, self.target_dir)).start()
        self.oai = openai.OpenAI(base_url=self.gateway.url, api_key="none", max_retries=0, timeout=120)
        self.model = self.oai.models.list().data[0].id

    def close(self) -> None:
        self.gateway.stop()
        self.drafts.stop(0)
        self.server.stop(0)

    def ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def id_of(self, piece: str) -> int:
        return next(t for t in range(self.target.vocab_size) if self.piece(t) == piece)

    def piece(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    @torch.inference_mode()
    def log_softmax(self, ids: list[int]) -> torch.Tensor:
        """The target alone (HF forward over the whole sequence): [len(ids), V]; row j scores ids[j + 1]."""
        return torch.log_softmax(self.target.model(torch.tensor([ids])).logits[0].double(), dim=-1)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tmp_path_factory.mktemp("lp"), vocab=64)
    yield s
    s.close()


def check_against_hf(s: Served, lp, ids: list[int], start: int, n_top: int) -> None:
    """lp (the completions shape) lists ids[start:]; every logprob and top-n dict equals HF's."""
    ref = s.log_softmax(ids)
    assert lp.tokens == [s.piece(t) for t in ids[start:]]
    for j, (value, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs), start):
        if j == 0:
            assert value is None and top is None
            continue
        assert abs(value - float(ref[j - 1, ids[j]])) < TOL
        best = ref[j - 1].topk(n_top)
        expected = {s.piece(int(t)): float(v) for v, t in zip(best.values, best.indices)}
        expected.setdefault(s.piece(ids[j]), float(ref[j - 1, ids[j]]))  # the chosen token is always listed
        assert top.keys() == expected.keys()
        assert all(abs(top[k] - expected[k]) < TOL for k in expected)


@pytest.mark.parametrize("mode", MODES)
def test_greedy_logprobs_equal_the_target_alone(served: Served, mode: str) -> None:
    """Greedy, logprobs=5: every token's logprob and its top-5 equal HF's log-softmax on the target
    alone; streamed chunks carry the same numbers; the tokens are the greedy ones."""
    s = served
    out = s.oai.completions.create(model=s.model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=5,
                                   extra_body={"ssd_mode": mode, "ignore_eos": True, "lookahead": 3})
    choice = out.choices[0]
    prompt_ids = s.ids(PROMPT)
    new_ids = [s.id_of(t) for t in choice.logprobs.tokens]
    assert "".join(choice.logprobs.tokens) == choice.text and len(new_ids) == out.usage.completion_tokens == 12
    ref = s.log_softmax(prompt_ids + new_ids)
    assert new_ids == [int(ref[len(prompt_ids) - 1 + j].argmax()) for j in range(12)]  # greedy
    check_against_hf(s, choice.logprobs, prompt_ids + new_ids, len(prompt_ids), 5)
    assert choice.logprobs.text_offset == list(itertools.accumulate([0] + [len(t) for t in choice.logprobs.tokens[:-1]]))

    chunks = list(s.oai.completions.create(model=s.model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=5,
                                           stream=True, extra_body={"ssd_mode": mode, "ignore_eos": True}))
    streamed = [v for c in chunks for v in (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])]
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert len(streamed) == 12 and all(abs(a - b) < TOL for a, b in zip(streamed, choice.logprobs.token_logprobs))


def test_chat_logprobs_equal_the_completion_of_the_rendered_prompt(served: Served) -> None:
    """Chat logprobs=true, top_logprobs=3 (streamed and not): the same numbers as the completion
    of the rendered prompt, which test_greedy_logprobs_equal_the_target_alone pins to HF."""
    from openai_gateway.chat import plain_chat_prompt

    s = served
    messages = [{"role": "user", "content": "hi"}]
    chat = s.oai.chat.completions.create(model=s.model, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=3, extra_body={"ssd_mode": "ssd", "ignore_eos": True})
    plain = s.oai.completions.create(model=s.model, prompt=plain_chat_prompt(messages), max_tokens=8, temperature=0,
                                     logprobs=3, extra_body={"ssd_mode": "ar", "ignore_eos": True}).choices[0]
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == plain.logprobs.tokens
    for c, value, top in zip(content, plain.logprobs.token_logprobs, plain.logprobs.top_logprobs):
        assert abs(c.logprob - value) < TOL and len(c.top_logprobs) == 3
        assert all(abs(t.logprob - top[t.token]) < TOL for t in c.top_logprobs)
        assert c.bytes == list(c.token.encode())
    stream = list(s.oai.chat.completions.create(model=s.model, messages=messages, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True,
                                                extra_body={"ssd_mode": "sd", "ignore_eos": True}))
    streamed = [c for ch in stream if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert all(abs(a.logprob - b.logprob) < TOL for a, b in zip(streamed, content))


@pytest.mark.parametrize("mode", MODES)
def test_echo_scores_prompts_equal_to_hf(served: Served, mode: str) -> None:
    """echo=True, max_tokens=0, a batch of prompts (text and token ids): each choice is its
    prompt, unscored first token then HF's log-softmax; nothing generated; with max_tokens=1 (how
    lm-eval asks) the prompt part is the same and one token follows."""
    s = served
    texts = ["def f(x):", "return x + 1", "a"]
    batch = [texts[0], texts[1], texts[2]]
    out = s.oai.completions.create(model=s.model, prompt=batch, max_tokens=0, echo=True, logprobs=5, temperature=0,
                                   extra_body={"ssd_mode": mode})
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == sum(len(s.ids(t)) for t in texts)
    for text, choice in zip(texts, out.choices):
        assert choice.text == text and choice.finish_reason == "length"
        check_against_hf(s, choice.logprobs, s.ids(text), 0, 5)
    ids = s.ids(texts[1])
    one = s.oai.completions.create(model=s.model, prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0,
                                   extra_body={"ssd_mode": mode}).choices[0]
    assert len(one.logprobs.tokens) == len(ids) + 1 and one.text.startswith(texts[1])
    assert one.logprobs.token_logprobs[: len(ids)] == out.choices[1].logprobs.token_logprobs
    check_against_hf(s, one.logprobs, ids + [s.id_of(one.logprobs.tokens[-1])], 0, 1)
    chunks = list(s.oai.completions.create(model=s.model, prompt=texts[0], max_tokens=0, echo=True, logprobs=2,
                                           stream=True, extra_body={"ssd_mode": mode}))
    assert "".join(c.choices[0].text for c in chunks) == texts[0]
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and len(streamed) == len(s.ids(texts[0]))


def test_best_of_returns_the_choice_with_the_best_mean_logprob(served: Served) -> None:
    """best_of=3, n=1 with a seed: the one returned is the best by mean logprob of the three
    choices n=3 gives for the same seed (choice j draws from seed + j). K is fixed: with K by batch
    size the three requests' plans depend on when each was admitted, and so do their draft tokens
    (the distribution, not the tokens, is what stays the same)."""
    s = served
    kw = dict(model=s.model, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11, logprobs=0,
              extra_body={"ssd_mode": "ssd", "ignore_eos": True, "lookahead": 2})
    three = s.oai.completions.create(n=3, **kw).choices
    best = s.oai.completions.create(n=1, best_of=3, **kw).choices
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in three]
    assert len(best) == 1 and best[0].index == 0 and best[0].text == three[means.index(max(means))].text
    assert s.oai.completions.create(n=3, **kw).choices[2].text == three[2].text  # reproducible per choice


def test_unsupported_and_invalid_are_400s_naming_the_field(served: Served) -> None:
    s = served
    cases = [
        (dict(prompt="x", suffix="y"), "suffix"),
        (dict(prompt="x", max_tokens=0), "max_tokens"),
        (dict(prompt="x", logprobs=21), "logprobs"),
        (dict(prompt="x", n=2, best_of=1), "best_of"),
        (dict(prompt="x", n=1, best_of=2, stream=True), "best_of"),
        (dict(prompt="x", n=17), "n"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            result = s.oai.completions.create(model=s.model, max_tokens=kwargs.pop("max_tokens", 2), **kwargs)
            list(result) if kwargs.get("stream") else None
        assert err.value.body["param"] == param, (kwargs, err.value.body)
    msgs = [{"role": "user", "content": "x"}]
    tool = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for kwargs, param in [(dict(tools=tool), "tools"), (dict(top_logprobs=2), "top_logprobs"),
                          (dict(logprobs=True, top_logprobs=21), "top_logprobs")]:
        with pytest.raises(openai.BadRequestError) as err:
            s.oai.chat.completions.create(model=s.model, messages=msgs, max_tokens=2, **kwargs)
        assert err.value.body["param"] == param


def test_grpc_logprobs_and_prompt_scoring(served: Served) -> None:
    """The gRPC API: logprobs / prompt_logprobs / score_only through the SDK equal HF; stream
    deltas add up to the result; out-of-range values are INVALID_ARGUMENT naming the field."""
    s = served
    ids = s.ids(PROMPT)
    with Client(f"127.0.0.1:{s.port}", timeout=60) as c:
        r = c.generate(prompt_ids=ids, max_tokens=6, mode="sd", logprobs=4, prompt_logprobs=3, ignore_eos=True)
        scored = c.generate(prompt_ids=ids, max_tokens=0, mode="ssd", prompt_logprobs=3, score_only=True)
        deltas = list(c.stream(prompt_ids=ids, max_tokens=6, mode="ssd", logprobs=4, ignore_eos=True))
        with pytest.raises(InvalidArgument, match="logprobs"):
            c.generate(prompt_ids=ids, max_tokens=2, logprobs=21)
        with pytest.raises(InvalidArgument, match="score_only"):
            c.generate(prompt_ids=ids, max_tokens=0, score_only=True)
    full = ids + list(r.token_ids)
    ref = s.log_softmax(full)
    for j, rec in enumerate(r.prompt_logprobs + r.logprobs, 1):
        assert rec.token_id == full[j] and abs(rec.logprob - float(ref[j - 1, full[j]])) < TOL
        assert [t for t, _ in rec.top] == ref[j - 1].topk(len(rec.top)).indices.tolist()
    assert len(r.prompt_logprobs) == len(ids) - 1 and len(r.logprobs) == 6 and all(len(x.top) == 4 for x in r.logprobs)
    assert scored.token_ids == () and scored.finish_reason == "length"
    assert [x.token_id for x in scored.prompt_logprobs] == [x.token_id for x in r.prompt_logprobs]
    streamed = [x for d in deltas for x in d.logprobs]
    assert [x.token_id for x in streamed] == list(r.token_ids)
    assert all(abs(a.logprob - b.logprob) < TOL for a, b in zip(streamed, r.logprobs))


@pytest.mark.slow
def test_n4_seeded_choices_follow_the_target_distribution(tmp_path: Path) -> None:
    """n=4 with a seed: 4 choices, reproducible for the seed, and over 450 seeds (1800 samples of
    the first 2 tokens, SSD, T = 1) their distribution passes the chi-square test against the
    target alone's exact joint (tests/exactref.py); a choice repeating another's draws would fail."""
    vocab, new, requests = 8, 2, 450
    s = Served(tmp_path, vocab=vocab)
    try:
        by_text = {s.piece(t): t for t in range(vocab)}
        prompt = [1, 4, 2]

        def ask(seed: int):
            out = s.oai.completions.create(model=s.model, prompt=[prompt], max_tokens=new, temperature=1.0, n=4,
                                           seed=seed, logprobs=0,
                                           extra_body={"ssd_mode": "ssd", "ignore_eos": True, "lookahead": 2})
            assert [c.index for c in out.choices] == [0, 1, 2, 3] and out.usage.completion_tokens == 4 * new
            return [tuple(by_text[t] for t in c.logprobs.tokens) for c in out.choices]

        first = ask(0)
        assert ask(0) == first
        samples = first + [x for seed in range(1, requests) for x in ask(seed * 4)]
    finally:
        s.close()
    exact = exact_joint(s.target.model, tuple(prompt), new, vocab, temperature=1.0)
    assert math.isclose(sum(exact.values()), 1.0, rel_tol=1e-6)
    p = chi_square_pvalue(samples, exact)
    assert p > ALPHA, p
