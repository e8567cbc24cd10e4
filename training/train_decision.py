"""Train the image-slot classifier (retrieve / generate, or retrieve / generate / edit) on PartiPrompts-style
decisions.

    python -m training.train_decision --model DIR --annotations PartiPromptsDecisionsConfident.tsv

The annotations are a TSV with ``Prompt`` and ``Decision`` columns (``gen``, ``ret``, ``edit`` or ``same``;
other columns are ignored). Annotations that carry ``edit`` train a three-way head (labels gen, ret, edit: it
may edit the conversation's last picture), the others the original's two-way one; the labels go into the
model's config (``decision.labels``). As in the original notebook: ``same`` is dropped, the first ``--train-size`` (600)
examples train and the rest are held out; the features are the [IMG0] last-layer state of a teacher-forced
forward of ``prompt + [IMG0..7]``; the head (Dropout 0.5 + Linear) is trained full-batch with AdamW
(lr 1e-3, no weight decay) for 2000 steps with cross-entropy. Prints macro-F1 and balanced accuracy on the
held-out split (and each label's recall) and writes ``decision.safetensors`` into the model directory
(``--out`` to write a copy elsewhere).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


TWO_WAY, THREE_WAY = ("gen", "ret"), ("gen", "ret", "edit")  # a head's outputs (gill.config.DECISION_LABELS)


@dataclass
class Annotations:
    prompts: list[str]
    labels: list[int]  # index into ``names``
    names: tuple[str, ...] = TWO_WAY  # ("gen", "ret"), or ("gen", "ret", "edit") where any row says "edit"


def read_annotations(path: str | Path, labels: tuple[str, ...] | None = None) -> Annotations:
    """The usable rows of a decision TSV. ``labels``: the head's outputs; default: ("gen", "ret", "edit") where
    any row says "edit", else ("gen", "ret")."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "Prompt" not in rows[0] or "Decision" not in rows[0]:
        raise ValueError(f"{path}: expected a TSV with 'Prompt' and 'Decision' columns")
    decisions = [(row["Decision"] or "").strip() for row in rows]
    if labels is None:
        labels = THREE_WAY if "edit" in decisions else TWO_WAY
    prompts, ys = [], []
    for i, (row, decision) in enumerate(zip(rows, decisions)):
        if decision == "same":
            continue
        if decision not in labels:
            raise ValueError(f"{path}: row {i + 2}: decision {decision!r} is not one of {list(labels) + ['same']}")
        prompts.append(row["Prompt"])
        ys.append(labels.index(decision))
    return Annotations(prompts, ys, tuple(labels))


@torch.no_grad()
def features(model, tokenizer, img_tokens, prompts: list[str], batch_size: int = 32, retriever=None) -> torch.Tensor:
    """[IMG0] states of ``prompt + [IMG0..n-1]`` (teacher forced), (N, d) float32; with a ``retriever``,
    the best retrieval score is appended (N, d + 1), as the paper-time classifier read it."""
    device = model.adapter.logit_scale.device
    scale = model.adapter.logit_scale.exp().item()
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer([p + img_tokens.text for p in prompts[start:start + batch_size]], padding=True, return_tensors="pt")
        res = model.img_token_forward(enc.input_ids.to(device), enc.attention_mask.to(device))
        feats = res.img_hidden[:, 0].float()
        if retriever is not None:
            hits = retriever.search(model.text_retrieval_embeddings(res.img_hidden), k=1, scale=scale)
            best = torch.tensor([[h[0].score if h else 0.0] for h in hits], device=feats.device)
            feats = torch.cat([feats, best], dim=-1)
        out.append(feats.cpu())
    return torch.cat(out)


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 2) -> float:
    scores = []
    for c in range(num_classes):
        tp = ((pred == c) & (target == c)).sum().item()
        fp = ((pred == c) & (target != c)).sum().item()
        fn = ((pred != c) & (target == c)).sum().item()
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / num_classes


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 2) -> float:
    """Mean per-class recall (chance 1 / num_classes whatever the class balance)."""
    recalls = [((pred == c) & (target == c)).sum().item() / (target == c).sum().item()
               for c in range(num_classes) if (target == c).any()]
    return sum(recalls) / max(len(recalls), 1)


def train_head(head, x: torch.Tensor, y: torch.Tensor, steps: int = 2000, lr: float = 1e-3, seed: int = 0,
               standardize: bool = False, balance: bool = False):
    """Full-batch AdamW with cross-entropy. ``balance``: each class weighs the same in the loss (weights
    inversely proportional to its frequency), so a minority class is not given up for the majority's
    accuracy (what balanced accuracy measures); the original weighed every example alike. ``standardize``:
    train on features scaled to zero mean and unit variance (per feature, over ``x``), then fold the
    scaling into the linear layer, so the saved head reads raw features as before (same file format).
    Features of very different scales (a small LM's states beside a retrieval score) otherwise leave the
    weak ones unlearnt, and dropout on a large shared offset drowns the signal."""
    torch.manual_seed(seed)
    mean = x.mean(0) if standardize else torch.zeros(x.shape[1])
    std = x.std(0).clamp_min(1e-6) if standardize else torch.ones(x.shape[1])
    z = (x - mean) / std
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    counts = torch.bincount(y, minlength=head.linear.out_features).clamp_min(1).float()
    weight = (len(y) / (len(counts) * counts)) if balance else None
    head.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(z), y, weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if standardize:
        with torch.no_grad():
            w = head.linear.weight / std.to(head.linear.weight)
            head.linear.bias -= w @ mean.to(w)
            head.linear.weight.copy_(w)
    return head.eval()


def scores(head, x: torch.Tensor, y: torch.Tensor, n: int, names: tuple[str, ...]) -> dict:
    """The head's figures on the first ``n`` examples (train) and the rest (held out): macro-F1, balanced
    accuracy and each label's recall, beside the majority class's macro-F1."""
    k = len(names)
    with torch.no_grad():
        pred = head(x).argmax(-1)
    test, truth = pred[n:], y[n:]
    recall = {f"test_recall_{name}": ((test == c) & (truth == c)).sum().item() / (truth == c).sum().item()
              for c, name in enumerate(names) if (truth == c).any()}
    return {"labels": list(names), "train_examples": n, "test_examples": len(y) - n,
            "train_macro_f1": macro_f1(pred[:n], y[:n], k), "test_macro_f1": macro_f1(test, truth, k),
            "test_balanced_accuracy": balanced_accuracy(test, truth, k), **recall,
            "test_majority_macro_f1": macro_f1(torch.full_like(truth, int(y[:n].bincount().argmax())), truth, k)}


def parse(argv: list[str] | None):
    from gill.arguments import float_in, int_in, seed_arg

    p = argparse.ArgumentParser(prog="python -m training.train_decision", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (or tiny-random, with --out)")
    p.add_argument("--annotations", required=True)
    p.add_argument("--train-size", type=int_in(1), default=600)
    p.add_argument("--steps", type=int_in(1), default=2000)
    p.add_argument("--lr", type=float_in(0, above=True), default=1e-3)
    p.add_argument("--seed", type=seed_arg(), default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write the model directory here instead of into --model")
    p.add_argument("--standardize", action="store_true",
                   help="train on standardized features (folded into the saved head: same format)")
    p.add_argument("--balance-classes", action="store_true",
                   help="weigh every class alike in the loss (for annotations where one class is rare)")
    p.add_argument("--index", default=None,
                   help="retrieval index: the head also reads the best retrieval score (``use_ret_score``)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    from gill import GILL, DecisionHead
    from gill.checkpoint import save_model

    try:
        data = read_annotations(args.annotations)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if len(data.prompts) <= args.train_size:
        print(f"error: {len(data.prompts)} usable examples leave nothing after --train-size {args.train_size}", file=sys.stderr)
        return 1
    gill = GILL.from_pretrained(args.model, device=args.device, load_diffusion=False, index=args.index)
    model = gill.model
    retriever = gill.retriever if args.index else None
    model.config.decision.use_ret_score = retriever is not None
    model.config.decision.labels = data.names  # the head's outputs: two, or three with edit
    x = features(model, gill.tokenizer, gill.img_tokens, data.prompts, retriever=retriever)
    y = torch.tensor(data.labels)
    n = args.train_size
    torch.manual_seed(args.seed)  # the head's initial weights too: the same command gives the same head
    head = train_head(DecisionHead.from_config(model.config), x[:n], y[:n], args.steps, args.lr, args.seed,
                      standardize=args.standardize, balance=args.balance_classes)
    out = Path(args.out) if args.out else Path(args.model)
    if args.out and Path(args.model).is_dir() and out != Path(args.model):
        shutil.copytree(args.model, out, dirs_exist_ok=True)
    save_model(out, model, head)
    result = scores(head, x, y, n, data.names)
    (out / "decision_metrics.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
