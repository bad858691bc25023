"""Device-resident rounds (issue 15): the greedy shortcut is `verify` exactly; GPU-only checks skip."""

from __future__ import annotations

import pytest
import torch

from ssd_core.sampling import process_logits
from ssd_core.verify import draw_noise, point_mass, verify, verify_greedy


@pytest.mark.parametrize("q_kind", ["point_mass", "sampled_q"])
def test_verify_greedy_equals_verify_with_one_hot_p(q_kind):
    gen = torch.Generator().manual_seed(0)
    batch, k, vocab = 64, 4, 7
    logits = torch.randn(batch, k + 1, vocab, generator=gen)
    logits[::5, :, 2] = logits[::5].max(dim=-1).values + 0  # ties: the first maximal index wins
    argmax = logits.argmax(dim=-1)
    draft = torch.where(torch.rand(batch, k, generator=gen) < 0.6, argmax[:, :k],
                        torch.randint(0, vocab, (batch, k), generator=gen))
    p = process_logits(logits.view(-1, vocab), torch.zeros(batch * (k + 1)), torch.zeros(batch * (k + 1), dtype=torch.long),
                       torch.ones(batch * (k + 1))).view(batch, k + 1, vocab)
    q = point_mass(draft, vocab)
    if q_kind == "sampled_q":  # a trusted draft's q, which gave its token mass
        q = torch.rand(batch, k, vocab, generator=gen) + q
        q = q / q.sum(-1, keepdim=True)
    uniforms, race = draw_noise([torch.Generator().manual_seed(i) for i in range(batch)], k, vocab)
    expect = verify(draft, q, p, uniforms, race)
    got = verify_greedy(draft, argmax)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    assert int(got[0].min()) < k < int(got[0].max()) + 1  # both rejections and full acceptance occur


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible to torch)")
def test_verify_on_the_device_equals_the_cpu():
    gen = torch.Generator().manual_seed(1)
    batch, k, vocab = 8, 3, 50
    p = torch.rand(batch, k + 1, vocab, generator=gen).softmax(-1)
    q = torch.rand(batch, k, vocab, generator=gen).softmax(-1)
    draft = torch.randint(0, vocab, (batch, k), generator=gen)
    uniforms, race = draw_noise([torch.Generator().manual_seed(i) for i in range(batch)], k, vocab)
    cpu = verify(draft, q, p, uniforms, race)
    dev = verify(*(t.cuda() for t in (draft, q, p, uniforms, race)))
    assert torch.equal(cpu[0], dev[0].cpu()) and torch.equal(cpu[1], dev[1].cpu())
