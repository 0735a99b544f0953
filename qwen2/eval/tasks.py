"""The benchmarks: prompts and metrics as lm-evaluation-harness (0.4) writes them.

A task turns each document into requests and scores the responses:
- multiple choice (MMLU, ARC-Challenge, HellaSwag, Winogrande, C-Eval, CMMLU): one
  log-likelihood request (context, " " + choice) per choice; acc = the most likely choice,
  acc_norm = the most likely per character of the choice (lm-eval's definitions);
- generation (GSM8K, MATH-500, HumanEval, MBPP): one greedy generation, scored by its task.

Contexts are lm-eval's: description + few-shot examples ("question" + " " + "answer" + "\\n\\n",
first_n from the few-shot split) + the question. What differs from lm-eval (no train splits
offline) is listed in docs/eval.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from qwen2.errors import Qwen2Error
from qwen2.eval import data

LETTERS = ("A", "B", "C", "D")


@dataclass
class Request:
    """A log-likelihood request (context, continuation) or a generation (prompt ... until)."""
    context: str = ""
    continuation: str | None = None          # set: log-likelihood request
    messages: list[dict] | None = None       # chat: the conversation (the context is then unused)
    prefill: str = ""                        # chat: the start of the assistant's turn
    until: list[str] = field(default_factory=list)
    max_gen_toks: int = 256

    @property
    def loglikelihood(self) -> bool:
        return self.continuation is not None


class Task:
    name: str
    generation = False           # generation task (chat templating applies)
    default_shots = 0
    metrics: tuple[str, ...] = ("acc",)
    per_group_limit = False      # --limit counts per subject (as lm-eval does for MMLU's subtasks)

    def docs(self, limit: int | None) -> list[dict]:
        raise NotImplementedError

    def requests(self, doc: dict, shots: int, chat: bool) -> list[Request]:
        raise NotImplementedError

    def score(self, doc: dict, responses: list) -> dict[str, float]:
        raise NotImplementedError


def _fewshot(examples: list[tuple[str, str]], delim: str = " ") -> str:
    return "".join(f"{q}{delim}{a}\n\n" for q, a in examples)


def mc_score(lls: list[float], choices: list[str], gold: int) -> dict[str, float]:
    pred = max(range(len(lls)), key=lambda i: lls[i])
    norm = max(range(len(lls)), key=lambda i: lls[i] / max(len(choices[i]), 1))
    return {"acc": float(pred == gold), "acc_norm": float(norm == gold)}


class MultipleChoice(Task):
    """Context + " " + choice for each choice (lm-eval's multiple_choice output type)."""
    metrics = ("acc", "acc_norm")

    def text(self, doc) -> str: ...
    def choices(self, doc) -> list[str]: ...
    def gold(self, doc) -> int: ...
    def fewshot_docs(self, doc) -> list[dict]:
        return []
    def description(self, doc) -> str:
        return ""

    def context(self, doc, shots: int) -> str:
        pool = self.fewshot_docs(doc)
        if shots > len(pool):
            raise Qwen2Error(f"{self.name}: {shots}-shot asks for more examples than its offline few-shot split has ({len(pool)})")
        ex = [(self.text(d), self.choices(d)[self.gold(d)]) for d in pool[:shots]]
        return self.description(doc) + _fewshot(ex) + self.text(doc)

    def requests(self, doc, shots, chat):
        ctx = self.context(doc, shots)
        return [Request(ctx, " " + c) for c in self.choices(doc)]

    def score(self, doc, responses):
        s = mc_score([r[0] for r in responses], self.choices(doc), self.gold(doc))
        return {k: s[k] for k in self.metrics}


class MMLU(MultipleChoice):
    name, default_shots, metrics, per_group_limit = "mmlu", 5, ("acc",), True

    def docs(self, limit):
        out = []
        for s in data.mmlu_subjects():
            out += data.mmlu(s, "test")[:limit]
        return out

    @staticmethod
    @lru_cache(maxsize=None)
    def _dev(subject):
        return data.mmlu(subject, "dev")

    def fewshot_docs(self, doc):
        return self._dev(doc["subject"])

    def description(self, doc):
        return f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"

    def text(self, doc):
        c = doc["choices"]
        return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"

    def choices(self, doc):
        return list(LETTERS)

    def gold(self, doc):
        return int(doc["answer"])


class ARCChallenge(MultipleChoice):
    name = "arc_challenge"

    def docs(self, limit):
        return data.arc_challenge("test")[:limit]

    def fewshot_docs(self, doc):  # lm-eval samples from train (not offline): validation instead
        return data.arc_challenge("validation")

    def text(self, doc):
        return f"Question: {doc['question']}\nAnswer:"

    def choices(self, doc):
        return list(doc["choices"]["text"])

    def gold(self, doc):
        return doc["choices"]["label"].index(doc["answerKey"])


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(MultipleChoice):
    name = "hellaswag"

    def docs(self, limit):
        return data.hellaswag()[:limit]

    def text(self, doc):
        return _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())

    def choices(self, doc):
        return [_hellaswag_clean(e) for e in doc["endings"]]

    def gold(self, doc):
        return int(doc["label"])


class Winogrande(MultipleChoice):
    """Partial scoring: the sentence up to the blank, filled with each option, is the context;
    the rest of the sentence is the continuation (lm-eval's multiple-input form)."""
    name, metrics = "winogrande", ("acc",)

    def docs(self, limit):
        return data.winogrande()[:limit]

    def requests(self, doc, shots, chat):
        if shots:
            raise Qwen2Error("winogrande: no few-shot split offline (lm-eval samples from train); use --num-fewshot 0")
        i = doc["sentence"].index("_")
        rest = " " + doc["sentence"][i + 1:].strip()
        return [Request(doc["sentence"][:i] + opt, rest) for opt in (doc["option1"], doc["option2"])]

    def score(self, doc, responses):
        lls = [r[0] for r in responses]
        return {"acc": float(max(range(2), key=lambda i: lls[i]) == int(doc["answer"]) - 1)}


class _ChineseMC(MultipleChoice):
    """C-Eval (val split) and CMMLU (test split), 5-shot from dev, lm-eval's templates."""
    hub: str
    split: str
    loader = None
    default_shots = 5

    def __init__(self, subjects: list[str] | None = None, local: str | None = None):
        self.subjects, self.local = subjects, local

    def subject_names(self) -> list[str]:
        if self.subjects:
            return self.subjects
        import os
        from pathlib import Path
        base = self.local or os.environ.get(f"QWEN2_{self.hub.split('/')[0].upper().replace('-', '_')}_DIR")
        if base:
            return sorted(p.name.removesuffix(f"_{self.split}.csv").removesuffix(".csv")
                          for p in (Path(base) / self.split).glob("*.csv"))
        try:
            import datasets
            return sorted(datasets.get_dataset_config_names(self.hub))
        except Exception as e:
            raise Qwen2Error(f"{self.name}: {self.hub} is not reachable ({type(e).__name__}); point "
                             f"QWEN2_{self.hub.split('/')[0].upper().replace('-', '_')}_DIR at a copy of its CSV files") from None

    def docs(self, limit):
        out = []
        for s in self.subject_names():
            out += [{**d, "_subject": s} for d in type(self).loader(s, self.split, self.local)[:limit]]
        return out

    def fewshot_docs(self, doc):
        return type(self).loader(doc["_subject"], "dev", self.local)

    def choices(self, doc):
        return list(LETTERS)


class CEval(_ChineseMC):
    name, hub, split, per_group_limit = "ceval", data.CEVAL_HUB, "val", True
    loader = staticmethod(data.ceval)

    def description(self, doc):
        return f"以下是中国关于{_zh_subject('ceval', doc['_subject'])}的单项选择题，请选出其中的正确答案。\n\n"

    def text(self, doc):
        return f"{doc['question'].strip()}\nA. {doc['A']}\nB. {doc['B']}\nC. {doc['C']}\nD. {doc['D']}\n答案："

    def gold(self, doc):
        return LETTERS.index(doc["answer"].strip())


class CMMLU(_ChineseMC):
    name, hub, split, per_group_limit = "cmmlu", data.CMMLU_HUB, "test", True
    loader = staticmethod(data.cmmlu)

    def description(self, doc):
        return f"以下是关于{_zh_subject('cmmlu', doc['_subject'])}的单项选择题，请直接给出正确答案的选项。\n\n"

    def text(self, doc):
        return f"{doc['Question'].strip()}\nA. {doc['A']}\nB. {doc['B']}\nC. {doc['C']}\nD. {doc['D']}\n答案："

    def gold(self, doc):
        return LETTERS.index(doc["Answer"].strip())


@lru_cache(maxsize=None)
def _zh_subject(bench: str, subject: str) -> str:
    """The subject's Chinese name from lm-eval's task file (its description), else the id."""
    try:
        from importlib.resources import files
        name = f"ceval-valid_{subject}.yaml" if bench == "ceval" else f"cmmlu_{subject}.yaml"
        text = (files("lm_eval") / "tasks" / bench / name).read_text(encoding="utf-8")
        m = re.search(r'"description": "以下是(?:中国)?关于(.+?)的单项选择题', text)
        if m:
            return m.group(1)
    except Exception:
        pass
    return subject.replace("_", " ")


# ------------------------------------------------------------------------------------- GSM8K
@lru_cache(maxsize=1)
def _gsm8k_cot_examples() -> list[dict]:
    """lm-eval's gsm8k-cot exemplars (Wei et al.'s eight chain-of-thought examples)."""
    import yaml
    from importlib.resources import files
    cfg = yaml.safe_load((files("lm_eval") / "tasks" / "gsm8k" / "gsm8k-cot.yaml").read_text())
    return cfg["fewshot_config"]["samples"]


def _exact_match_gsm8k(pred: str, gold: str) -> bool:
    # lm-eval's exact_match with ignore_case and regexes_to_ignore [",", "\$", "(?s).*#### ", "\.$"]
    def clean(s):
        for r in (",", r"\$", r"(?s).*#### ", r"\.$"):
            s = re.sub(r, "", s)
        return s.lower().strip()
    return clean(pred) == clean(gold)


class GSM8K(Task):
    """lm-eval's gsm8k-cot: "Q: ...\\nA:" with chain-of-thought exemplars, greedy until "Q:";
    strict-match reads "The answer is N.", flexible-extract the last number. Chat: the exemplars
    as turns (lm-eval's --apply_chat_template --fewshot_as_multiturn)."""
    name, generation, default_shots = "gsm8k", True, 8
    metrics = ("exact_match,strict-match", "exact_match,flexible-extract")

    def docs(self, limit):
        return data.gsm8k()[:limit]

    def requests(self, doc, shots, chat):
        ex = _gsm8k_cot_examples()
        if shots > len(ex):
            raise Qwen2Error(f"gsm8k: at most {len(ex)} few-shot examples")
        ex = ex[:shots]
        q = f"Q: {doc['question']}\nA:"
        if chat:
            msgs = []
            for e in ex:
                msgs += [{"role": "user", "content": f"Q: {e['question']}\nA:"},
                         {"role": "assistant", "content": e["target"]}]
            return [Request(messages=msgs + [{"role": "user", "content": q}], until=["Q:"], max_gen_toks=512)]
        ctx = _fewshot([(f"Q: {e['question']}\nA:", e["target"]) for e in ex]) + q
        return [Request(ctx, until=["Q:", "</s>", "<|im_end|>"], max_gen_toks=256)]

    @staticmethod
    def extract(text: str) -> tuple[str, str]:
        """(strict-match, flexible-extract) answers, as lm-eval's regex filters take them."""
        m = re.search(r"The answer is (\-?[0-9\.\,]+).", text)
        strict = m.group(1) if m else "[invalid]"
        found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)
        flex = next((g for g in found[-1] if g), "[invalid]") if found else "[invalid]"
        return strict, flex

    def score(self, doc, responses):
        gold = doc["answer"].split("####")[-1].strip()
        strict, flex = self.extract(responses[0])
        return {"exact_match,strict-match": float(_exact_match_gsm8k(strict, gold)),
                "exact_match,flexible-extract": float(_exact_match_gsm8k(flex, gold))}


# ----------------------------------------------------------------------------------- MATH-500
MINERVA_EXAMPLES = [  # lm-eval's minerva_math few-shot samples (Lewkowycz et al. 2022)
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
]


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (balanced braces), or None."""
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    if text.startswith("\\boxed ", i):
        return text[i + 7:].split("$")[0].strip()
    j = text.find("{", i)
    depth = 0
    for k in range(j, len(text)) if j >= 0 else ():
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None


_SUBS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
         (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
            "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
            "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
            "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;",
            r",\!", "{,}", '"', "\\dots"]


def normalize_answer(ans: str) -> str:
    """Minerva's final-answer normalisation (Lewkowycz et al. 2022, appendix D), as in lm-eval."""
    ans = ans.split("=")[-1]
    for a, b in _SUBS:
        ans = ans.replace(a, b)
    for e in _REMOVED:
        ans = ans.replace(e, "")
    ans = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", ans)
    ans = re.sub(r"(\\text\{)(.*?)(\})", "\\2", ans)
    ans = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", ans)
    ans = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", ans)
    ans = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", ans)
    ans = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", ans)
    ans = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", ans)
    ans = ans.replace("$", "")
    if ans.replace(",", "").isdigit():
        ans = ans.replace(",", "")
    return ans.strip()


class MATH500(Task):
    """Minerva's 4-shot prompt (lm-eval's minerva_math500), greedy until "Problem:"; the answer is
    "Final Answer: The final answer is X" (else the last \\boxed{}), matched after Minerva's
    normalisation. Chat: Qwen's instruction ("reason step by step ... \\boxed{}"), 0-shot."""
    name, generation, default_shots, metrics = "math500", True, 4, ("exact_match",)

    def docs(self, limit):
        return data.math500()[:limit]

    def requests(self, doc, shots, chat):
        if chat:
            content = doc["problem"] + "\nPlease reason step by step, and put your final answer within \\boxed{}."
            return [Request(messages=[{"role": "user", "content": content}], max_gen_toks=1024)]
        if shots > len(MINERVA_EXAMPLES):
            raise Qwen2Error(f"math500: at most {len(MINERVA_EXAMPLES)} few-shot examples")
        ex = [(f"Problem:\n{p}\n\nSolution:", s) for p, s in MINERVA_EXAMPLES[:shots]]
        return [Request(_fewshot(ex) + f"Problem:\n{doc['problem']}\n\nSolution:", until=["Problem:"], max_gen_toks=1024)]

    def score(self, doc, responses):
        text = responses[0]
        m = re.search(r"Final Answer: The final answer is(.*?). I hope it is correct.", text + "I hope it is correct.")
        pred = m.group(1).strip() if m and "[invalid" not in m.group(1) else (last_boxed(text) or "[invalid]")
        gold = last_boxed(doc["solution"]) or ""
        return {"exact_match": float(normalize_answer(pred) == normalize_answer(gold))}


# ------------------------------------------------------------------------------- code tasks
# evalplus' instruction prompt for chat models (evalplus/provider/utility.py)
INSTRUCTION_PREFIX = "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
RESPONSE_PREFIX = "Below is a Python script with a self-contained function that solves the problem and passes corresponding tests:"


def _evalplus_request(problem: str) -> Request:
    task = f"{INSTRUCTION_PREFIX}\n```\n{problem.strip()}\n```\n"
    return Request(messages=[{"role": "user", "content": task}], prefill=f"{RESPONSE_PREFIX}\n```python\n",
                   until=["\n```"], max_gen_toks=768)


def extract_code(text: str) -> str:
    """Code of a chat reply whose assistant turn began inside a ```python fence."""
    return text.split("```")[0]


class CodeTask(Task):
    generation, metrics = True, ("pass@1",)
    timeout = 10.0

    def program(self, doc, text: str, chat: bool) -> str:
        raise NotImplementedError

    def score(self, doc, responses):  # responses[0]: sandbox.Result (run by the evaluator)
        return {"pass@1": float(responses[0].passed)}


class HumanEval(CodeTask):
    """Base: 0-shot completion of the prompt, stopping at a new top-level block (lm-eval's
    humaneval). Chat: evalplus' instruction prompt, the assistant turn opened with its prefix."""
    name = "humaneval"

    def docs(self, limit):
        return data.humaneval()[:limit]

    def requests(self, doc, shots, chat):
        if chat:
            return [_evalplus_request(doc["prompt"])]
        return [Request(doc["prompt"], until=["\nclass", "\ndef", "\n#", "\nif", "\nprint"], max_gen_toks=768)]

    def program(self, doc, text, chat):
        code = extract_code(text) if chat else doc["prompt"] + text
        return f"{code}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


class MBPP(CodeTask):
    """Base: lm-eval's mbpp prompt 0-shot (its 3 exemplars come from the prompt split, not
    offline), until "[DONE]". Chat: evalplus' MBPP prompt (description + first test, in a
    docstring) in its instruction prompt."""
    name = "mbpp"

    def docs(self, limit):
        return data.mbpp()[:limit]

    def requests(self, doc, shots, chat):
        if shots:
            raise Qwen2Error("mbpp: no few-shot split offline (lm-eval takes 3 from the prompt split); use --num-fewshot 0")
        if chat:
            return [_evalplus_request(f'"""\n{doc["text"]}\n{doc["test_list"][0]}\n"""\n')]
        tests = "\n".join(doc["test_list"][:3])
        prompt = (f"You are an expert Python programmer, and here is your task: {doc['text']} "
                  f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")
        return [Request(prompt, until=["[DONE]"], max_gen_toks=512)]

    def program(self, doc, text, chat):
        code = extract_code(text) if chat else text
        setup = doc.get("test_setup_code") or ""
        return f"{setup}\n{code}\n\n" + "\n".join(doc["test_list"]) + "\n"


TASKS = {t.name: t for t in (MMLU, ARCChallenge, HellaSwag, Winogrande, GSM8K, MATH500, HumanEval, MBPP, CEval, CMMLU)}
ALIASES = {"arc_c": "arc_challenge", "arc-c": "arc_challenge", "math": "math500", "math-500": "math500",
           "minerva_math500": "math500", "c-eval": "ceval"}


def get_task(name: str) -> Task:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise Qwen2Error(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[key]()
