"""GPU tier: the same exactness contract on a CUDA device, and the NCCL transport round trip.

Marked `gpu`; every test skips with a reason where CUDA (or a second GPU, or CuPy) is missing,
which is the case in CI. On a GPU machine: `bash scripts/test_gpu.sh`. None of these has run on
a GPU yet: this project has not been lent one (issue 8).
"""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from conftest import hf_greedy, make_pair, save_tiny_pair
from ssd_core.config import Mode, SamplingParams, SpecConfig
from ssd_core.engine import Engine, Request
from ssd_core.models import load_model, wrap_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible to torch)")]

PROMPTS = [[1, 5, 9, 2], [7, 7, 3, 12, 30, 4], [11]]


def _on_cuda(pair, dtype):
    return tuple(wrap_model(m.model.to("cuda", dtype), None, m.name) for m in pair)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", [Mode.AR, Mode.SD, Mode.SSD])
def test_greedy_on_cuda_equals_hf_generate_on_the_target_alone(mode, dtype):
    target, draft = _on_cuda(make_pair(draft_kind="perturbed"), dtype)
    engine = Engine(target, draft, SpecConfig(mode=mode, lookahead=3))
    try:
        for prompt in PROMPTS:
            (res,) = engine.generate([Request(tuple(prompt), SamplingParams(max_new_tokens=20, ignore_eos=True))])
            assert list(res.token_ids) == hf_greedy(target.model, prompt, 20), (mode, dtype, prompt)
    finally:
        engine.close()


@pytest.mark.parametrize("mode", [Mode.SD, Mode.SSD])
def test_cuda_graphed_rounds_equal_hf_generate_on_the_target_alone(mode, monkeypatch):
    """Lean models on the static KV capture their verify / tree / glue steps (ssd_core.cuda_graphs)
    and replay them; greedy output still equals HF generate on the target alone."""
    from ssd_core.lean import from_hf

    monkeypatch.setenv("SSD_CUDA_GRAPHS", "1")
    hf_target, hf_draft = (m.model.to("cuda") for m in make_pair(draft_kind="perturbed"))
    target, draft = (wrap_model(from_hf(m, share=False), None, f"lean{i}") for i, m in enumerate((hf_target, hf_draft)))
    engine = Engine(target, draft, SpecConfig(mode=mode, lookahead=3))
    try:
        for prompt in PROMPTS:
            (res,) = engine.generate([Request(tuple(prompt), SamplingParams(max_new_tokens=20, ignore_eos=True))])
            assert list(res.token_ids) == hf_greedy(hf_target, prompt, 20), (mode, prompt)
        graphs = engine.kv.graphs
        assert graphs is not None and graphs.captures > 0 and graphs.replays > 0
    finally:
        engine.close()


def test_batched_ssd_on_cuda_with_the_draft_in_its_own_process(tmp_path):
    from ssd_core.proc_speculator import process_factory

    target_dir, draft_dir = save_tiny_pair(tmp_path)
    target = load_model(target_dir, "cuda")
    engine = Engine(target, None, SpecConfig(mode=Mode.SSD, lookahead=3),
                    speculator_factory=process_factory(draft_dir, 1, None, "cuda", "float32"))
    try:
        reqs = [Request(tuple(p), SamplingParams(max_new_tokens=16, ignore_eos=True)) for p in PROMPTS]
        results = engine.generate(reqs)
        for p, r in zip(PROMPTS, results):
            assert list(r.token_ids) == hf_greedy(target.model, p, 16)
    finally:
        engine.close()


def _nccl_rank(rank: int, uid, tensors, queue) -> None:
    from cupy.cuda import nccl

    from ssd_core.wire.transport import NcclTransport

    torch.cuda.set_device(rank)
    comm = nccl.NcclCommunicator(2, uid, rank)
    transport = NcclTransport(comm, 1 - rank, torch.device("cuda", rank))
    if rank == 0:
        for t in tensors:
            transport.send(t.to("cuda:0"))
        torch.cuda.synchronize(0)
        queue.put("sent")
    else:
        from ssd_core.wire.codec import tensor_header_to_pb

        got = []
        for t in tensors:  # the receiver learns shapes from the headers in order; here it rebuilds them
            got.append(transport.recv(tensor_header_to_pb(t.dtype, tuple(t.shape))).cpu())
        torch.cuda.synchronize(1)
        queue.put(got)


def test_nccl_transport_round_trip_between_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL between processes needs two distinct GPUs (NCCL refuses two ranks on one GPU)")
    from ssd_core.wire.transport import NcclTransport

    ok, reason = NcclTransport.available(0, 1)
    if not ok:
        pytest.skip(reason)
    from cupy.cuda import nccl

    uid = nccl.get_unique_id()
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.rand(2, 3, 64, generator=gen), torch.randint(0, 50, (5,), generator=gen),
               torch.rand(1, 4, 128, generator=gen).to(torch.bfloat16)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_nccl_rank, args=(r, uid, tensors, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    outs = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    received = next(o for o in outs if o != "sent")
    for sent, got in zip(tensors, received):
        assert got.dtype == sent.dtype and torch.equal(got, sent)
