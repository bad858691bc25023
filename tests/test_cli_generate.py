"""`ssd generate`: flags, the JSON contract and clear errors, on tiny models saved to disk."""

from __future__ import annotations

import json

import pytest

from conftest import hf_greedy, make_pair
from ssd_cli.main import main


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    target, draft = make_pair(draft_kind="perturbed")
    target.model.save_pretrained(root / "target")
    draft.model.save_pretrained(root / "draft")
    small, _ = make_pair(vocab=32)
    small.model.save_pretrained(root / "other_vocab")
    return root, target


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
def test_generate_json_matches_target_greedy(pair_dirs, capsys, mode):
    root, target = pair_dirs
    rc = main(["generate", "--target", str(root / "target"), "--draft", str(root / "draft"), "--mode", mode,
               "--prompt-ids", "1,2,3", "--max-new-tokens", "12", "--lookahead", "3", "--fan-out", "2,1,1,2",
               "--saguaro-c", "0.5", "--backup", "jit", "--device", "cpu", "--seed", "1", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == hf_greedy(target.model, [1, 2, 3], 12)
    assert out["finish_reason"] == "length"
    assert set(out["stats"]) >= {"rounds", "mean_accepted_length", "cache_hit_rate", "backup_uses", "tokens_per_s"}


def test_generate_sampled_is_reproducible_with_a_seed(pair_dirs, capsys):
    root, _ = pair_dirs
    argv = ["generate", "--target", str(root / "target"), "--draft", str(root / "draft"), "--prompt-ids", "5,6",
            "--max-new-tokens", "10", "--temperature", "0.9", "--top-p", "0.9", "--top-k", "20", "--seed", "3", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == first["token_ids"]


@pytest.mark.parametrize("extra,needle", [
    (["--lookahead", "0"], "lookahead"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--lookahead", "2", "--fan-out", "9,9,9"], "fan_out"),
    (["--prompt-ids", ""], "prompt"),
])
def test_bad_parameters_exit_nonzero_with_a_named_error(pair_dirs, capsys, extra, needle):
    root, _ = pair_dirs
    argv = ["generate", "--target", str(root / "target"), "--draft", str(root / "draft"), "--json"]
    argv += extra if "--prompt-ids" in extra else ["--prompt-ids", "1,2"] + extra
    assert main(argv) != 0
    captured = capsys.readouterr()
    assert needle in captured.err and captured.out == ""


def test_mismatched_pair_and_missing_dir_are_clear_errors(pair_dirs, capsys):
    root, _ = pair_dirs
    assert main(["generate", "--target", str(root / "target"), "--draft", str(root / "other_vocab"), "--prompt-ids", "1"]) != 0
    assert "vocabulary" in capsys.readouterr().err
    assert main(["generate", "--target", str(root / "nope"), "--draft", str(root / "draft"), "--prompt-ids", "1"]) != 0
    assert "no HF model" in capsys.readouterr().err
