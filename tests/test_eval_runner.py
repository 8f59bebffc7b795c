"""`evaluate` end to end on tiny saved models: result files, resume, failures mid-suite,
adapters, ensembles, many models, the CLI, code tasks, tax diagnostics."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llama, make_tokenizer

from dtm.errors import DtmError
from dtm.evaluation import evaluate, evaluate_many, tax_curve
from dtm.evaluation.codeexec import run_program
from dtm.evaluation.lmeval import fold_metrics


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Two saved tiny models and a small suite: MC (bare JSONL), MC with groups, generation."""
    root = tmp_path_factory.mktemp("evallab")
    tok = make_tokenizer()
    for name, seed in (("m1", 0), ("m2", 1)):
        model = make_llama(seed=seed)
        with torch.no_grad():
            model.lm_head.weight.mul_(20)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    g = torch.Generator().manual_seed(0)
    words = ["the", "cat", "sat", "on", "mat", "Paris", "France", "capital", "1", "2", "3"]

    def phrase(n: int) -> str:
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))

    mc = [{"question": phrase(5), "choices": [phrase(1 + j % 3) for j in range(4)], "answer": i % 4} for i in range(24)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    grouped = [{"id": f"k{i}", **r, "split": "seen" if i % 3 else "unseen"} for i, r in enumerate(mc)]
    (root / "know.jsonl").write_text("".join(json.dumps(r) + "\n" for r in grouped))
    (root / "know.yaml").write_text("name: know\ntype: multiple_choice\ndata: know.jsonl\nprompt_format: alpaca\ngroup_by: split\n")
    gen = [{"id": f"g{i}", "prompt": phrase(4), "answer": phrase(1), **({"pattern": "[a-z ]*"} if i % 2 else {})} for i in range(6)]
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (root / "gen.yaml").write_text("name: gen\ntype: generate\ndata: gen.jsonl\nprompt_format: alpaca\nmax_new_tokens: 6\nstop: [\"\\n\"]\n")
    return root


def test_bare_jsonl_results_file_and_resume(lab, tmp_path, monkeypatch):
    out = tmp_path / "res.json"
    res = evaluate(lab / "m1", [lab / "mc.jsonl"], out=out, batch_size=4, progress=False)
    r = res["mc"]
    assert set(r["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert 0 <= r["metrics"]["acc"] <= 1 and r["metrics"]["acc_stderr"] > 0
    assert r["counts"] == {"items": 24, "truncated": 0, "task_items": 24}
    assert r["model"] == str(lab / "m1") and len(r["spec_hash"]) == 16 and r["seconds"] > 0
    assert json.loads(out.read_text())["mc"]["metrics"] == r["metrics"]
    # batch size and scoring layout do not change the numbers
    again = evaluate(lab / "m1", [lab / "mc.jsonl"], batch_size=1, share_context=False, progress=False)["mc"]
    assert again["metrics"] == pytest.approx(r["metrics"])
    # resume: a finished task is not recomputed
    import dtm.evaluation.runner as runner

    def boom(*a, **k):
        raise AssertionError("recomputed a finished task")

    monkeypatch.setattr(runner, "run_task", boom)
    assert evaluate(lab / "m1", [lab / "mc.jsonl"], out=out, progress=False)["mc"]["seconds"] == r["seconds"]
    with pytest.raises(DtmError, match="recomputed"):  # a different limit is a different run
        evaluate(lab / "m1", [lab / "mc.jsonl"], out=out, limit=5, progress=False)


def test_directory_output_groups_generation_and_samples(lab, tmp_path):
    out = tmp_path / "eval"
    res = evaluate(lab / "m1", [lab / "know.yaml", lab / "gen.yaml"], out=out, progress=False, log_samples=True)
    know, gen = res["know"], res["gen"]
    assert set(know["groups"]) == {"seen", "unseen"}
    assert know["groups"]["seen"]["items"] == 16 and know["groups"]["unseen"]["items"] == 8
    assert set(gen["metrics"]) >= {"exact_match", "exact_match_stderr", "pattern_match"} and gen["metrics"]["pattern_items"] == 3
    assert json.loads((out / "know.json").read_text())["task"] == "know"
    samples = [json.loads(line) for line in (out / "gen.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all("output" in s for s in samples)
    assert all("\n" not in s["output"] for s in samples)  # cut at the stop sequence


def test_failure_mid_suite_keeps_finished_tasks(lab, tmp_path, monkeypatch):
    import dtm.evaluation.runner as runner

    real = runner.run_task

    def flaky(scorer, task, *a, **k):
        if task.name == "know":
            raise RuntimeError("out of memory (simulated)")
        return real(scorer, task, *a, **k)

    monkeypatch.setattr(runner, "run_task", flaky)
    out = tmp_path / "res.json"
    with pytest.raises(DtmError, match=r"know: RuntimeError: out of memory") as err:
        evaluate(lab / "m1", [lab / "mc.jsonl", lab / "know.yaml", lab / "gen.yaml"], out=out, progress=False)
    assert "rerun to retry" in str(err.value)
    assert set(json.loads(out.read_text())) == {"mc", "gen"}
    monkeypatch.setattr(runner, "run_task", real)
    assert set(evaluate(lab / "m1", [lab / "mc.jsonl", lab / "know.yaml", lab / "gen.yaml"], out=out, progress=False)) == {"mc", "know", "gen"}


def test_bad_task_fails_before_any_model_work(lab, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 3}) + "\n")
    with pytest.raises(DtmError, match=r"task 'bad'.*bad\.jsonl:1: field 'answer' = 3 is out of range"):
        evaluate(lab / "m1", [lab / "mc.jsonl", bad], out=tmp_path / "r.json", progress=False)
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(DtmError, match="ensemble=True"):
        evaluate([lab / "m1", lab / "m2"], [lab / "mc.jsonl"])


def test_adapter_equals_its_merged_model(lab, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(lab / "m1")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    make_tokenizer().save_pretrained(tmp_path / "merged")
    with_adapter = evaluate(lab / "m1", [lab / "mc.jsonl"], adapter=tmp_path / "adapter", progress=False)["mc"]
    plain = evaluate(lab / "m1", [lab / "mc.jsonl"], progress=False)["mc"]
    assert with_adapter["metrics"] == evaluate(tmp_path / "merged", [lab / "mc.jsonl"], progress=False)["mc"]["metrics"]
    assert with_adapter["adapter"] == str(tmp_path / "adapter")
    # an adapter-only directory is loaded on the base model its adapter_config names
    assert evaluate(tmp_path / "adapter", [lab / "mc.jsonl"], progress=False)["mc"]["metrics"] == with_adapter["metrics"]
    assert plain["spec_hash"] == with_adapter["spec_hash"]


def test_ensemble_and_many_models(lab, tmp_path):
    ens = evaluate([lab / "m1", lab / "m2"], [lab / "mc.jsonl"], ensemble=True, progress=False)["mc"]
    assert ens["ensemble"] is True and ens["model"] == [str(lab / "m1"), str(lab / "m2")]
    many = evaluate_many({"base": lab / "m1", "other": lab / "m2", "ens": [lab / "m1", lab / "m2"]},
                         [lab / "mc.jsonl", lab / "know.yaml"], tmp_path / "all", progress=False)
    assert set(many) == {"base", "other", "ens"}
    assert many["ens"]["mc"]["metrics"] == pytest.approx(ens["metrics"])
    assert many["base"]["mc"]["metrics"] == pytest.approx(evaluate(lab / "m1", [lab / "mc.jsonl"], progress=False)["mc"]["metrics"])
    assert sorted(p.name for p in (tmp_path / "all").glob("*.json")) == ["base.json", "ens.json", "other.json"]


def test_a_model_with_the_same_tokenizer_files_reuses_the_task_encoding(lab, tmp_path, monkeypatch):
    import shutil

    import dtm.evaluation.runner as runner

    runner._ENCODINGS.clear()
    encoded = []
    real = runner.encode_mc
    monkeypatch.setattr(runner, "encode_mc", lambda *a: encoded.append(a[0].name) or real(*a))
    evaluate(lab / "m1", [lab / "know.yaml"], progress=False)
    second = evaluate(lab / "m2", [lab / "know.yaml"], progress=False)["know"]  # other weights, same tokenizer files
    assert encoded == ["know"]
    runner._ENCODINGS.clear()  # the reused ids give what a fresh encoding gives
    assert evaluate(lab / "m2", [lab / "know.yaml"], progress=False)["know"]["metrics"] == second["metrics"]
    assert evaluate(lab / "m2", [lab / "know.yaml"], limit=5, progress=False)["know"]["counts"]["items"] == 5
    assert encoded == ["know"] * 3  # a different row count is encoded anew
    other = tmp_path / "m3"
    shutil.copytree(lab / "m2", other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 99}))
    evaluate(other, [lab / "know.yaml"], progress=False)
    assert encoded == ["know"] * 4  # other tokenizer files: encoded again


def test_tax_curve_resumes_per_checkpoint(lab, tmp_path):
    curve = tax_curve({0.0: lab / "m1", 0.5: lab / "m2", 1.0: lab / "m1"}, [lab / "mc.jsonl"], tmp_path / "curve", progress=False)
    assert curve["fractions"] == [0.0, 0.5, 1.0]
    accs = curve["tasks"]["mc"]["acc"]
    assert len(accs) == 3 and accs[0] == accs[2]
    assert (tmp_path / "curve" / "frac-0.5.json").is_file()


def test_bias_diagnostic_measures_training_losses(lab, tmp_path):
    from dtm.data.template import conversation
    from dtm.evaluation.diagnostics import bias_diagnostic

    train = [conversation("the cat", "sat on the mat", id=str(i)) for i in range(3)]
    val = [conversation("What is the capital of France?", "Paris", id=str(i)) for i in range(3)]
    out = bias_diagnostic({0.5: lab / "m1", 1.0: lab / "m2"}, train, val, device="cpu")
    assert len(out["train_loss"]) == 2 and all(v > 0 for v in out["train_loss"] + out["val_loss"])
    d_train = out["train_loss"][0] - out["train_loss"][1]
    d_val = out["val_loss"][0] - out["val_loss"][1]
    assert out["ratio"] == [pytest.approx(d_train / d_val)]


def test_cli_eval(lab, tmp_path, capsys):
    from dtm.cli import main

    out = tmp_path / "cli.json"
    assert main(["eval", str(lab / "m1"), "--task", str(lab / "mc.jsonl"), "--out", str(out), "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "mc: acc=" in printed and "acc_norm=" in printed and "(24 items" in printed
    assert "mc" in json.loads(out.read_text())
    bad = tmp_path / "dup.jsonl"
    bad.write_text(json.dumps({"id": "1", "question": "q", "choices": ["a", "b"], "answer": 0}) + "\n" + json.dumps({"id": "1", "question": "r", "choices": ["a", "b"], "answer": 0}) + "\n")
    assert main(["eval", str(lab / "m1"), "--task", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "dup.jsonl:2: field 'id': duplicate id '1'" in err and "Traceback" not in err
    assert main(["eval", str(lab / "m1"), str(lab / "m2"), "--ensemble", "--task", str(lab / "mc.jsonl")]) == 0
    capsys.readouterr()


def test_cli_eval_in_bfloat16_prints_its_peak_memory(lab, tmp_path, capsys):
    """`--dtype bfloat16` loads the weights in bf16 (on CPU too) and scores like fp32 up to bf16
    rounding; every `dtm eval` ends with the process's peak resident memory."""
    from dtm.cli import main
    from dtm.evaluation.harness import load_scorer

    assert next(load_scorer(lab / "m1", device="cpu", dtype="bfloat16").models[0].parameters()).dtype == torch.bfloat16
    assert next(load_scorer(lab / "m1", device="cpu").models[0].parameters()).dtype == torch.float32
    results = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        assert main(["eval", str(lab / "m1"), "--task", str(lab / "mc.jsonl"), "--out", str(out), "--dtype", dtype]) == 0
        printed = capsys.readouterr().out
        assert "peak memory (RSS) of this process:" in printed and " GiB" in printed
        results[dtype] = json.loads(out.read_text())["mc"]["metrics"]["acc"]
    assert abs(results["bfloat16"] - results["float32"]) <= 2 / 24  # 24 items: at most two flip at bf16 resolution
    # a result scored in another dtype is not reused from the same file: the dtype is part of its key
    same = tmp_path / "float32.json"
    fp32_key = json.loads(same.read_text())["mc"]["run_key"]
    assert main(["eval", str(lab / "m1"), "--task", str(lab / "mc.jsonl"), "--out", str(same), "--dtype", "bfloat16"]) == 0
    rescored = json.loads(same.read_text())["mc"]
    assert rescored["run_key"] != fp32_key and rescored["metrics"]["acc"] == results["bfloat16"]


# ---------------------------------------------------------------- code tasks


def test_code_runs_sandboxed(tmp_path):
    assert run_program("def f(x):\n    return x + 1\nassert f(1) == 2\n") == (True, "passed")
    ok, why = run_program("assert 1 == 2, 'wrong'\n")
    assert not ok and "AssertionError: wrong" in why
    assert run_program("while True:\n    pass\n", timeout_s=1) == (False, "timed out")
    ok, why = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert not ok and ("network" in why or "Errno" in why)


def test_code_tasks_need_opt_in(lab, tmp_path, caplog):
    rows = [{"id": "h1", "prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(1, 2) == 3\n", "entry_point": "add"}]
    (tmp_path / "he.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "he.yaml").write_text("name: he\ntype: code\ndata: he.jsonl\nmax_new_tokens: 4\n")
    assert evaluate(lab / "m1", [tmp_path / "he.yaml"], progress=False) == {}
    assert "allow_code_execution" in caplog.text
    res = evaluate(lab / "m1", [tmp_path / "he.yaml"], allow_code_execution=True, progress=False)["he"]
    assert res["metrics"]["pass_at_1"] == 0.0  # a random model does not write `return a + b`


def test_lm_eval_metric_folding():
    raw = {"alias": "arc", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict-match": 0.2, "exact_match_stderr,strict-match": "N/A"}
    assert fold_metrics(raw) == {"acc": 0.5, "acc_stderr": 0.1, "exact_match_strict-match": 0.2}


@pytest.mark.slow  # imports and runs lm-evaluation-harness end to end: ~10-15 s, the integration tier
def test_lm_eval_backend_runs_a_local_task(lab, tmp_path):
    pytest.importorskip("lm_eval")
    from dtm.evaluation.lmeval import run_lm_eval

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "local_mc.yaml").write_text(
        f"task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {lab / 'mc.jsonl'}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    theirs = run_lm_eval(lab / "m1", ["local_mc"], include_path=tmp_path / "t", batch_size=8)["local_mc"]["metrics"]
    ours = evaluate(lab / "m1", [lab / "mc.jsonl"], progress=False)["mc"]["metrics"]
    assert abs(theirs["acc"] - ours["acc"]) * 24 <= 1 and abs(theirs["acc_norm"] - ours["acc_norm"]) * 24 <= 1


def test_perplexity_task(lab, tmp_path):
    import math

    rows = [{"id": str(i), "text": t} for i, t in enumerate(["the cat sat on the mat.", "What is the capital of France? Paris."])]
    (tmp_path / "ppl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ppl.yaml").write_text("name: ppl\ntype: perplexity\ndata: ppl.jsonl\n")
    res = evaluate(lab / "m1", [tmp_path / "ppl.yaml"], out=tmp_path / "out", progress=False, log_samples=True)["ppl"]
    samples = [json.loads(line) for line in (tmp_path / "out" / "ppl.samples.jsonl").read_text().splitlines()]
    total = sum(s["loglikelihood"] for s in samples)
    nbytes = sum(len(r["text"].encode()) for r in rows)
    assert res["metrics"]["bits_per_byte"] == pytest.approx(-total / nbytes / math.log(2))
    assert res["metrics"]["token_perplexity"] == pytest.approx(math.exp(-total / sum(s["tokens"] for s in samples)))


def test_a_task_the_model_cannot_run_does_not_stop_the_others(lab, tmp_path):
    (tmp_path / "chat.yaml").write_text(f"name: chat\ndata: {lab / 'know.jsonl'}\nprompt_format: chat\n")
    tok_dir = tmp_path / "nochat"
    import shutil

    shutil.copytree(lab / "m1", tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in tok_dir.glob("chat_template.*"):
        extra.unlink()
    with pytest.raises(DtmError, match=r"chat: .*chat template"):
        evaluate(tok_dir, [tmp_path / "chat.yaml", lab / "mc.jsonl"], out=tmp_path / "r.json", progress=False)
    assert set(json.loads((tmp_path / "r.json").read_text())) == {"mc"}


def test_limit_below_one_and_a_file_for_a_directory_are_refused(lab, tmp_path, capsys):
    from dtm.cli import main

    with pytest.raises(DtmError, match="limit must be >= 1, got 0"):
        evaluate(lab / "m1", [lab / "mc.jsonl"], limit=0, progress=False)
    with pytest.raises(DtmError, match="limit must be >= 1"):
        evaluate_many([lab / "m1", lab / "m2"], [lab / "mc.jsonl"], limit=0, progress=False)
    assert main(["eval", str(lab / "m1"), "--task", str(lab / "mc.jsonl"), "--limit", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    taken = tmp_path / "results"
    taken.write_text("my notes\n")
    with pytest.raises(DtmError, match=r"results: is an existing file.*directory"):
        evaluate(lab / "m1", [lab / "mc.jsonl"], out=taken, progress=False)
    with pytest.raises(DtmError, match=r"results: is an existing file.*directory"):
        evaluate_many([lab / "m1", lab / "m2"], [lab / "mc.jsonl"], out_dir=taken, progress=False)
    assert taken.read_text() == "my notes\n"
