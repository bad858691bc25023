"""Int8 draft weights (ssd_core.lean.Int8Weight, ssd_core.models.apply_weights).

A draft's weights decide what it proposes, never what the target accepts: with an int8 draft,
greedy AR / SD / SSD give the target's own greedy tokens (batch 1 and 4, every backup, over
StaticKV and BatchKV, in a child process, through the draft service); the sampled chi-square
tests with an int8 draft are in test_exactness_paths.py (in process, child process) and
test_exactness_served.py (over gRPC, through a draft kill). Here also: the int8 logits track the
float ones, the float model is untouched, pickling repacks, and the format is chosen and refused
with clear errors.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from conftest import hf_greedy, make_pair
from ssd_core.config import BackupKind, Mode, SamplingParams, SpecConfig
from ssd_core.engine import Engine, Request
from ssd_core.errors import InvalidParameter
from ssd_core.lean import Int8Weight, from_hf, int8_available
from ssd_core.models import apply_weights, load_model, wrap_model
from ssd_core.static_kv import StaticKV

pytestmark = pytest.mark.skipif(not int8_available(), reason="this torch build has no fbgemm int8 GEMM")

NEW = 24
PROMPTS = [[3, 17, 5, 9], [1, 2, 3], [40, 41, 7, 7, 12, 30], [8]]
HF_PAIR = make_pair(draft_kind="perturbed", seed=5)
REFS = [hf_greedy(HF_PAIR[0].model, p, NEW) for p in PROMPTS]


def _lean(m, fmt: str = "float"):
    return apply_weights(wrap_model(from_hf(m.model, share=False), None, m.name + "-lean"), fmt)


TARGET = _lean(HF_PAIR[0])
DRAFT8 = _lean(HF_PAIR[1], "int8")


def test_int8_logits_track_the_float_model_and_leave_it_untouched():
    hf = HF_PAIR[1].model
    ids = torch.tensor([PROMPTS[2] * 3])
    with torch.inference_mode():
        ref = hf(ids).logits
        got = StaticKV(DRAFT8.model, 1).forward(DRAFT8.model, ids, torch.arange(ids.shape[1])[None])
        again = hf(ids).logits
    assert DRAFT8.weights == "int8" and DRAFT8.model.weight_format == "int8"
    assert torch.equal(ref, again)  # the HF model (and its float weights) is what it was
    rel = (got - ref).norm() / ref.norm()
    assert 0 < rel < 0.15, rel  # quantized: not bit-equal, but close (0.09 on this 32-wide model)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


CASES = [
    (Mode.SD, 3, (), 1.0, BackupKind.AUTO),
    (Mode.SSD, 3, (), 1.0, BackupKind.JIT),
    (Mode.SSD, 3, (3, 0, 1, 4), 0.3, BackupKind.JIT),
    (Mode.SSD, 5, (), 0.3, BackupKind.FAST),
]


@pytest.mark.parametrize("mode,k,fan_out,c,backup", CASES)
def test_greedy_with_an_int8_draft_equals_the_target_alone(mode, k, fan_out, c, backup):
    spec = SpecConfig(mode=mode, lookahead=k, fan_out=fan_out, saguaro_c=c, backup=backup)
    for group in ([0], [2], [0, 1, 2, 3]):  # batch 1 and 4
        engine = Engine(TARGET, DRAFT8, spec)
        try:
            results = engine.generate([Request(tuple(PROMPTS[i]), SamplingParams(max_new_tokens=NEW)) for i in group])
        finally:
            engine.close()
        assert [list(r.token_ids) for r in results] == [REFS[i] for i in group]


def test_an_int8_draft_in_a_child_process_is_exact_and_repacked_there():
    from ssd_core.proc_speculator import process_factory

    clone = pickle.loads(pickle.dumps(DRAFT8))  # what spawn does to a model handed to the child
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        a = StaticKV(DRAFT8.model, 1).forward(DRAFT8.model, ids, torch.arange(4)[None])
        b = StaticKV(clone.model, 1).forward(clone.model, ids, torch.arange(4)[None])
    assert clone.weights == "int8" and torch.equal(a, b)
    float_draft = _lean(HF_PAIR[1])
    engine = Engine(TARGET, float_draft, SpecConfig(mode=Mode.SSD, lookahead=3),
                    speculator_factory=process_factory(float_draft, weights="int8"))  # quantized in the child
    try:
        results = engine.generate([Request(tuple(p), SamplingParams(max_new_tokens=NEW)) for p in PROMPTS[:2]])
    finally:
        engine.close()
    assert [list(r.token_ids) for r in results] == REFS[:2]
    assert float_draft.weights == "float"  # the parent's copy is not touched


def test_the_format_is_chosen_where_it_applies_and_refused_where_it_does_not(tmp_path):
    hf_draft = make_pair(draft_kind="perturbed", seed=5)[1]
    assert apply_weights(hf_draft, "auto").weights == "float"  # HF modules: auto keeps float
    with pytest.raises(InvalidParameter, match="lean backend"):
        apply_weights(hf_draft, "int8")
    with pytest.raises(InvalidParameter, match="use one of"):
        apply_weights(hf_draft, "int4")
    assert apply_weights(_lean(HF_PAIR[1]), "auto").weights == "int8"
    assert apply_weights(_lean(HF_PAIR[1]), "float").weights == "float"
    half = wrap_model(from_hf(hf_draft.model, share=False).to(torch.bfloat16), None, "bf16")  # moves hf_draft too
    with pytest.raises(InvalidParameter, match="float32 model on a CPU"):
        apply_weights(half, "int8")
    assert apply_weights(half, "auto").weights == "float"
    with pytest.raises(RuntimeError, match="cannot be moved or cast"):
        _lean(HF_PAIR[1], "int8").model.to(torch.float64)
    with pytest.raises(ValueError, match="does not go back to float"):
        DRAFT8.model.quantize("float")
    # through load_model, as the CLI and the draft service load a draft
    HF_PAIR[1].model.save_pretrained(tmp_path / "d")
    assert load_model(tmp_path / "d", weights="auto").weights == "int8"
    assert load_model(tmp_path / "d").weights == "float"  # the default of load_model: as loaded (targets)
    assert load_model(tmp_path / "d", backend="hf", weights="auto").weights == "float"


def test_int8_weight_is_the_float_product_within_quantization_error():
    gen = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen), torch.randn(5, 32, generator=gen)
    ref = x @ w.t() + b
    got = Int8Weight(w, b)(x)
    assert got.shape == ref.shape
    assert ((got - ref).abs().max() / ref.abs().max()) < 0.03


def test_the_draft_service_loads_its_model_as_configured(tmp_path):
    import threading

    from draft_service.cli import config_from_args
    from draft_service.config import DraftServerConfig
    from draft_service.server import create_server, serve
    from ssd_cli.main import build_parser

    args = build_parser().parse_args(["serve", "draft", "--model", "m", "--weights", "float"])
    assert config_from_args(args).weights == "float"
    assert config_from_args(build_parser().parse_args(["serve", "draft", "--model", "m"])).weights == "auto"
    draft = _lean(HF_PAIR[1])
    server, _ = create_server(DraftServerConfig(port=0), model=draft)  # handed in: served as it is
    server.stop(0)
    assert draft.weights == "float"
    HF_PAIR[1].model.save_pretrained(tmp_path / "d")
    for fmt, want in (("auto", "int8"), ("float", "float")):
        stop, seen = threading.Event(), []
        from draft_service import server as mod

        real = mod.DraftServer.set_model

        def spy(self, model, real=real):
            seen.append(model.weights)
            real(self, model)
            stop.set()  # loaded: stop before registering (no targets configured)

        mod.DraftServer.set_model = spy
        try:  # on a thread: serve() installs no signal handlers there
            t = threading.Thread(target=serve, args=(DraftServerConfig(model_dir=str(tmp_path / "d"), port=0,
                                                                       weights=fmt), stop))
            t.start()
            t.join(60)
        finally:
            mod.DraftServer.set_model = real
        assert not t.is_alive()
        assert seen == [want]
