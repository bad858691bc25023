"""lm-eval (EleutherAI's harness, PyPI `lm-eval`) against the served OpenAI API and against HF.

Runs two tasks from local files (scripts/lm_eval_data/: a log-likelihood multiple-choice task and a
greedy generation task), nothing fetched from the Hub (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set
before lm-eval is imported): once with lm-eval's `local-completions` model against a target server
(the same create_server `ssd serve target` runs, a registered draft service, and the OpenAI
gateway `--openai-port` attaches) in the given decode mode, once with lm-eval's own `hf` model on
the target directory alone. Prints one JSON object: the metrics of both runs and the largest
per-request differences (log-likelihoods, generated strings).

    .venv/bin/python scripts/lm_eval_check.py [--target DIR --draft DIR] [--mode ssd] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parent / "lm_eval_data"
ROOT = Path(__file__).resolve().parent.parent
TASKS = ("ssd_code_mc", "ssd_code_gen")

MC_YAML = """task: ssd_code_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/code_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN_YAML = """task: ssd_code_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/code_gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


def write_tasks(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ssd_code_mc.yaml").write_text(MC_YAML.format(data=DATA))
    (directory / "ssd_code_gen.yaml").write_text(GEN_YAML.format(data=DATA))
    return directory


def _evaluate(model: str, model_args: str, tasks_dir: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS),
                                  task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True,
                                  batch_size=4, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0)
    metrics = {task: {k: v for k, v in out["results"][task].items() if isinstance(v, (int, float)) and "stderr" not in k}
               for task in TASKS}
    samples = {task: [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])] for task in TASKS}
    return {"metrics": metrics, "samples": samples}


def served_run(target_dir: Path, draft_dir: Path, mode: str, tasks_dir: Path) -> dict:
    """lm-eval local-completions against a target + draft + OpenAI gateway (in process, free ports)."""
    import target_service.server as server_mod
    from draft_service.config import DraftServerConfig
    from draft_service.server import create_server as create_draft
    from openai_gateway import BackgroundServer, create_app
    from ssd_core.config import Mode
    from ssd_core.models import load_model
    from target_service.config import TargetConfig

    server, port = server_mod.create_server(TargetConfig(model=str(target_dir), port=0, mode_default=Mode(mode)))
    drafts, _ = create_draft(DraftServerConfig(port=0, targets=(f"127.0.0.1:{port}",)), model=load_model(draft_dir))
    drafts.start()
    drafts.start_registration().wait_registered(1, 20)
    gateway = BackgroundServer(create_app([f"127.0.0.1:{port}"], None, target_dir)).start()
    try:
        args = (f"base_url={gateway.url}/completions,model={target_dir.name},tokenizer_backend=huggingface,"
                f"tokenizer={target_dir},tokenized_requests=True,num_concurrent=1,max_retries=1,max_length=256")
        return _evaluate("local-completions", args, tasks_dir)
    finally:
        gateway.stop()
        drafts.stop(0)
        server.stop(0)


def hf_run(target_dir: Path, tasks_dir: Path) -> dict:
    """lm-eval's own HF model on the target alone."""
    return _evaluate("hf", f"pretrained={target_dir},dtype=float32,device=cpu,max_length=256", tasks_dir)


def compare(served: dict, hf: dict) -> dict:
    """Largest |log-likelihood difference| and the number of differing generations / greedy flags."""
    ll = [(a, b) for a, b in zip(served["samples"]["ssd_code_mc"], hf["samples"]["ssd_code_mc"])]
    max_ll = max(abs(float(x[0][0]) - float(y[0][0])) for a, b in ll for x, y in zip(a, b))
    greedy_diff = sum(bool(x[0][1]) != bool(y[0][1]) for a, b in ll for x, y in zip(a, b))
    gen_diff = sum(a != b for a, b in zip(served["samples"]["ssd_code_gen"], hf["samples"]["ssd_code_gen"]))
    return {"max_loglikelihood_diff": max_ll, "is_greedy_differences": greedy_diff, "generation_differences": gen_diff}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, default=ROOT / "ssd_models/default/target")
    parser.add_argument("--draft", type=Path, default=ROOT / "ssd_models/default/draft")
    parser.add_argument("--mode", default="ssd", choices=("ar", "sd", "ssd"))
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = write_tasks(Path(tmp) / "tasks")
        served = served_run(args.target.resolve(), args.draft.resolve(), args.mode, tasks)
        hf = hf_run(args.target.resolve(), tasks)
    report = {"mode": args.mode, "served": served["metrics"], "hf": hf["metrics"], **compare(served, hf)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    same = served["metrics"] == hf["metrics"] and report["generation_differences"] == 0
    return 0 if same and report["max_loglikelihood_diff"] < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
