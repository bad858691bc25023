"""Cache offers (SessionOpen.want_offers): a draft pushes each finished speculation cache, and the
target takes a hit from it without waiting for the round's answer. Real target and draft servers
in this process, over gRPC on loopback.

Whatever the offers say, greedy output is the target alone's (HF generate): offers a draft lies
in are verified like any speculation, and malformed ones are dropped. The sampled path through
offers (an untrusted draft: point-mass verification) is chi-square tested in
tests/test_exactness_pool.py.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from client import Client
from conftest import hf_greedy, make_pair
from draft_service import session as draft_session
from draft_service.config import DraftServerConfig
from draft_service.servicer import Outbox
from draft_service.server import create_server as create_draft
from ssd_core import metrics
from ssd_core.config import BackupKind, Mode, SamplingParams
from ssd_core.types import CacheOffer, RoundOutcome, SeqStart
from ssd_core.wire import codec
from ssd_protos.ssd.v1 import speculation_pb2 as spb
from ssd_protos.ssd.v1 import speculation_pb2_grpc as spb_grpc
from target_service.config import TargetConfig
from target_service.server import create_server as create_target
from target_service.session import DraftSessionClient

PROMPTS = [[3, 1, 4, 1, 5, 9], [2, 7, 1, 8], [5, 5, 6, 1, 2]]
_OFFERS_TO_PB = codec.offers_to_pb  # the real encoder (the tampering tests patch the draft's)
NEW = 24


@pytest.fixture(scope="module")
def pair():
    return make_pair(draft_kind="perturbed")


@pytest.fixture(scope="module")
def reference(pair):
    return [hf_greedy(pair[0].model, p, NEW) for p in PROMPTS]


def _offer_rounds() -> float:
    return metrics.CACHE_OFFER_ROUNDS._value.get()


def _run(pair, cache_offers: bool = True, batch: bool = False) -> list:
    """Greedy SSD generations through a real target + draft; (results, offer rounds they used)."""
    target, draft = pair
    cfg = TargetConfig(model="in-process", port=0, max_tokens=256, draft_timeout_s=5.0, lease_ttl_s=60.0,
                       mode_default=Mode.SSD, cache_offers=cache_offers)
    server, port = create_target(cfg, target=target)
    addr = f"127.0.0.1:{port}"
    d, _ = create_draft(DraftServerConfig(port=0, targets=(addr,)), model=draft)
    d.start()
    try:
        d.start_registration().wait_registered(1, 20)
        before = _offer_rounds()
        with Client(addr, timeout=120, max_retries=0) as c:
            if batch:
                with futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
                    results = list(pool.map(lambda p: c.generate(prompt_ids=p, max_tokens=NEW, ignore_eos=True,
                                                                 lookahead=3), PROMPTS))
            else:
                results = [c.generate(prompt_ids=p, max_tokens=NEW, ignore_eos=True, lookahead=3) for p in PROMPTS]
        return results, _offer_rounds() - before
    finally:
        d.stop(0)
        server.stop(0)


def test_offers_answer_hits_without_the_round_trip_and_output_is_the_targets(pair, reference):
    results, used = _run(pair)
    assert [list(r.token_ids) for r in results] == reference
    assert used > 0  # hits were taken from the pushed caches
    assert sum(r.stats.cache_hit_rate for r in results) > 0


def test_offers_in_a_batch_and_turned_off(pair, reference):
    results, used = _run(pair, batch=True)
    assert [list(r.token_ids) for r in results] == reference
    results, used_off = _run(pair, cache_offers=False)
    assert [list(r.token_ids) for r in results] == reference
    assert used_off == 0  # --cache-offers off: the target never asks for offers, none is used


def _lying(offers: list[CacheOffer]):
    """Every entry's tokens replaced by plausible wrong ones (in the vocabulary, right length)."""
    return _OFFERS_TO_PB([CacheOffer(o.seq_id, o.round, {key: tuple((t + 1 + j) % 64 for j, t in enumerate(tokens))
                                                              for key, tokens in o.entries.items()}) for o in offers])


def _malformed(offers: list[CacheOffer]):
    """Out-of-vocabulary tokens, wrong lengths and far too many entries: each offer is dropped."""
    m = _OFFERS_TO_PB(offers)
    for i, seq in enumerate(m.sequences):
        kind = i % 3
        for e in seq.entries:
            if kind == 0:
                e.tokens[:] = [10**6] * len(e.tokens)
            elif kind == 1:
                e.tokens.append(1)
        if kind == 2:
            for n in range(5000):
                seq.entries.add(num_accepted=0, bonus_token=n % 64, tokens=list(seq.entries[0].tokens))
    return m


@pytest.mark.parametrize("tamper", [_lying, _malformed])
def test_offers_a_draft_lies_in_or_garbles_never_change_greedy_output(pair, reference, monkeypatch, tamper):
    monkeypatch.setattr(draft_session.codec, "offers_to_pb", tamper)
    results, used = _run(pair)
    assert [list(r.token_ids) for r in results] == reference
    if tamper is _lying:
        assert used > 0  # the lies were used (and verified: the output above is still exact)
    else:
        assert used == 0  # nothing malformed is ever used


def test_a_session_outbox_bounds_offers_and_holds_answers_until_there_is_room():
    box = Outbox(size=4)
    for i in range(10):  # a target that does not read: offers past the bound are dropped
        box.offer(i)
    assert box.dropped == 6
    sent = threading.Event()
    t = threading.Thread(target=lambda: box.answer("answer") and sent.set())
    t.start()
    assert not sent.wait(0.5)  # full: the request thread waits (and so stops reading requests)
    assert box.get() == 0
    assert sent.wait(5)  # room again: the answer goes, after the offers queued before it
    assert [box.get() for _ in range(4)] == [1, 2, 3, "answer"]
    for i in range(4):
        box.offer(i)
    done = []
    t = threading.Thread(target=lambda: done.append(box.answer("late")))
    t.start()
    box.closed.set()  # the RPC ended: a waiting answer gives up instead of blocking for ever
    t.join(5)
    assert done == [False]


class _ReshapingDraft(spb_grpc.SpeculatorServicer):
    """A Speculator that pushes an offer of the old shape right after a reconfigure (as a build in
    flight does: `old_entries` entries of `old_k` tokens), answers the next round with `new_k`
    tokens, then pushes an offer of `late_entries` entries of `old_k` tokens (over the new bounds:
    now bad)."""

    def __init__(self, old_k: int = 3, new_k: int = 2, old_entries: int = 1, late_entries: int = 7) -> None:
        self.done = threading.Event()
        self.old_k, self.new_k, self.old_entries, self.late_entries = old_k, new_k, old_entries, late_entries

    def Session(self, request_iterator, context):
        def old_offer(round_: int, n: int):
            entries = [spb.OfferEntry(num_accepted=0, bonus_token=b, tokens=list(range(1, self.old_k + 1)))
                       for b in range(n)]
            return spb.SessionResponse(offer=spb.CacheOffer(sequences=[spb.SequenceOffer(seq_id="s", round=round_,
                                                                                          entries=entries)]))

        for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "open":
                yield spb.SessionResponse(opened=spb.SessionOpened(session_id="x", config=request.open.config))
            elif kind == "reconfigure":
                yield old_offer(1, self.old_entries)
            elif kind == "round":
                yield spb.SessionResponse(speculations=spb.Speculations(step=request.round.step, sequences=[
                    spb.SequenceSpeculation(seq_id="s", round=1, tokens=list(range(1, self.new_k + 1)))]))
                yield old_offer(2, self.late_entries)
                self.done.set()


@pytest.mark.parametrize("old_fan_out,new_fan_out,shape", [
    ((1, 1, 1, 1), (1, 1, 1), {}),  # K 3 -> 2: 7 entries > 6 = 3 + 2 + 1
    # fan-out only (K stays 3): 10 entries fit the old bound (8 + 3 + 1), not the new (4 + 3 + 1)
    ((2, 2, 2, 2), (1, 1, 1, 1), dict(old_k=3, new_k=3, old_entries=10, late_entries=10)),
], ids=["k-change", "fan-out-change"])
def test_offers_built_before_a_reconfigure_are_stale_not_bad(old_fan_out, new_fan_out, shape):
    fake = _ReshapingDraft(**shape)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    spb_grpc.add_SpeculatorServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = DraftSessionClient("lease", f"127.0.0.1:{port}", "t0",
                                codec.config_to_pb(old_fan_out, 1.0, BackupKind.JIT, len(old_fan_out) - 1),
                                vocab_size=8, want_offers=True)
    try:
        client.add([SeqStart("s", (1, 2), SamplingParams(), 3)])
        client.reconfigure(codec.config_to_pb(new_fan_out, 1.0, BackupKind.JIT, len(new_fan_out) - 1))
        step = client.send_round([RoundOutcome.first("s")], want_draft_probs=False)
        assert client.wait_round(step, time.monotonic() + 10) is not None
        assert fake.done.wait(10)
        deadline = time.monotonic() + 5
        while client._bad_offers == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        # the offer in flight at the reconfigure is stale (quiet); one of the old shape after the
        # draft answered a round of the new one is bad (counted, and warned about at the 1st, 100th, ...)
        assert (client.stale_offers, client._bad_offers) == (1, 1)
    finally:
        client.close("test over")
        server.stop(0)
