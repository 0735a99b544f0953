"""Build SFT and DPO sets from chitchat-dataset 0.9.0 (PyPI, MIT; 7,168 human conversations):

  python scripts/prep_chitchat.py --out /tmp/chitchat

Conversations are shuffled once (seed 0) and split so that no conversation is in two files:
- sft_train.jsonl / sft_eval.jsonl: {"messages"}: a short system line, then the conversation's
  first turns (a turn = one person's consecutive messages, joined), the first speaker as "user",
  the second as "assistant", ending on an assistant turn;
- dpo_train.jsonl / dpo_eval.jsonl, from conversations the SFT run never sees: {"prompt" (the
  conversation up to a user turn), "chosen" (the real next reply), "rejected" (the reply at the same
  turn of another conversation)}. The eval pairs are drawn with their own random stream, so they do
  not change with the training options (--rejected-turn applies to both, --pairs-per-conversation
  to the training pairs only).
"""
from __future__ import annotations

import argparse
import json
import os
import random

SYSTEM = "You are chatting casually with a new friend."


def conversations(max_turns: int) -> list[list[dict]]:
    import chitchat_dataset
    path = os.path.join(os.path.dirname(chitchat_dataset.__file__), "dataset.json")
    with open(path) as f:
        data = json.load(f)
    out = []
    for key in sorted(data):
        turns = [" ".join(m["text"].strip() for m in turn if m["text"].strip()) for turn in data[key]["messages"]]
        turns = [t for t in turns if t][:max_turns]
        if len(turns) % 2:
            turns = turns[:-1]
        if len(turns) >= 4:
            out.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)])
    random.Random(0).shuffle(out)
    return out


def dpo_pairs(convs, rng, rejected_turn: str = "same", per_conv: int = 1) -> list[dict]:
    """Per conversation, `per_conv` assistant turns (distinct, as many as it has; with per_conv=1 the
    first or second reply, as the eval set): the conversation up to that turn is the prompt, the real
    reply the chosen one, and an assistant reply of another (random) conversation the rejected one,
    taken at the same turn index (rejected_turn="same": the same stage of a chat, the harder pairs)
    or at any of its turns ("any"). per_conv > 1 draws from every assistant turn, the first reply
    included (the eval set's turns: half of its pairs are first replies)."""
    pairs = []
    for i, conv in enumerate(convs):
        turns = list(range(1, len(conv), 2))  # the assistant turns
        for k in rng.sample(turns, min(per_conv, len(turns))) if per_conv > 1 else \
                [rng.randrange(1, len(conv) // 2) * 2 - 1 if len(conv) >= 4 else 1]:
            other = convs[(i + 1 + rng.randrange(len(convs) - 1)) % len(convs)]
            if rejected_turn == "same":
                j = min(k, len(other) - 1) if len(other) > 1 else 1
                if other[j]["role"] != "assistant":
                    j -= 1
            else:
                j = rng.randrange(1, len(other), 2)
            rejected = other[j]["content"]
            if rejected == conv[k]["content"]:
                continue
            pairs.append({"prompt": [{"role": "system", "content": SYSTEM}] + conv[:k],
                          "chosen": [conv[k]], "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/chitchat")
    ap.add_argument("--max-turns", type=int, default=6)
    ap.add_argument("--sft-train", type=int, default=2000)
    ap.add_argument("--sft-eval", type=int, default=200)
    ap.add_argument("--dpo-train", type=int, default=600)
    ap.add_argument("--dpo-eval", type=int, default=200)
    ap.add_argument("--rejected-turn", choices=("same", "any"), default="same",
                    help="the rejected reply: another conversation's at the same turn, or at any turn")
    ap.add_argument("--pairs-per-conversation", type=int, default=1,
                    help="training pairs per DPO conversation (distinct turns; the eval set keeps 1)")
    a = ap.parse_args()
    convs = conversations(a.max_turns)
    n = [a.sft_train, a.sft_eval, a.dpo_train, a.dpo_eval]
    if sum(n) > len(convs):
        raise SystemExit(f"asked for {sum(n)} conversations, the data set has {len(convs)} usable ones")
    cuts, lo = [], 0
    for k in n:
        cuts.append(convs[lo:lo + k])
        lo += k
    os.makedirs(a.out, exist_ok=True)
    files = {"sft_train": [{"messages": [{"role": "system", "content": SYSTEM}] + c} for c in cuts[0]],
             "sft_eval": [{"messages": [{"role": "system", "content": SYSTEM}] + c} for c in cuts[1]],
             "dpo_train": dpo_pairs(cuts[2], random.Random(1), a.rejected_turn, a.pairs_per_conversation),
             "dpo_eval": dpo_pairs(cuts[3], random.Random(2), a.rejected_turn)}
    for name, recs in files.items():
        with open(os.path.join(a.out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        print(f"{name}: {len(recs)} records")


if __name__ == "__main__":
    main()
