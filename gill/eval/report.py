"""The HTML report: our numbers beside the paper's, and a grid of context -> output -> ground truth."""

from __future__ import annotations

import html
import json
from pathlib import Path

from gill.io import atomic_write_text
from gill.eval.data import skip_counts
from gill.eval.runner import read_records

# arXiv 2305.17216 (see the project's reference notes). CLIP ViT-L/14 image-feature cosine; LPIPS.
PAPER = {
    "vist": {
        "gill/1-caption": {"clip_similarity": 0.581, "lpips": 0.702},
        "gill/5-captions": {"clip_similarity": 0.612, "lpips": 0.696},
        "gill/5-captions-4-images": {"clip_similarity": 0.641, "lpips": 0.693},
        "sd/1-caption": {"clip_similarity": 0.592, "lpips": 0.703},
        "sd/5-captions": {"clip_similarity": 0.598, "lpips": 0.704},
    },
    "visdial": {
        "gill/1-round": {"clip_similarity": 0.528},
        "gill/5-rounds": {"clip_similarity": 0.621},
        "gill/10-rounds": {"clip_similarity": 0.645, "lpips": 0.714},
        "sd/1-round": {"clip_similarity": 0.552},
        "sd/5-rounds": {"clip_similarity": 0.629},
        "sd/10-rounds": {"clip_similarity": 0.622, "lpips": 0.723},
    },
}
PAPER_RETRIEVAL = {  # VIST, 5 captions + 4 images, recall in %
    "GILL (paper; gallery protocol not stated)": (20.3, 45.0, 53.7),
    "CLIP ViT-L in GILL's table": (8.8, 22.3, 29.8),
    "CLIP ViT-L in FROMAGe's/MCL's tables (context images masked)": (2.4, 21.3, 34.0),
}


def _fmt(v) -> str:
    return "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _protocol_line(summary: dict) -> str:
    protocol = summary.get("protocol") or {}
    run = summary.get("run") or {}
    if not protocol:
        return ""
    fields = ", ".join(f"{k}: {v}" for k, v in protocol.items() if k != "name")
    settings = ", ".join(f"{k}: {v}" for k, v in run.items() if v is not None)
    return (f"<p>protocol: <b>{html.escape(str(protocol.get('name')))}</b> ({html.escape(fields)})</p>"
            f"<p>run: {html.escape(settings)}</p>")


def write_report(out: Path, task: str, grid: int = 12) -> Path:
    """``report.html``: each setting's scores beside what they compare with. A real model's run (summary
    ``compare_with == "paper"``) stands beside the paper's numbers; the toy world's and random models' runs
    beside chance (each output against another example's target) and the plain Stable Diffusion
    baselines of the same run, never beside the paper's, which were measured on real VIST and VisDial."""
    summary = json.loads((out / "summary.json").read_text())
    versus_paper = summary.get("compare_with", "paper") == "paper"
    paper = PAPER.get(task, {}) if versus_paper else {}
    rows = []
    with_lpips = any("lpips" in s for s in summary["settings"].values())
    for name, s in summary["settings"].items():
        p = paper.get(name, {})
        lp = "" if s.get("lpips") is None else f"{_fmt(s.get('lpips'))} &plusmn; {_fmt(s.get('lpips_ci95'))}"
        lp_cells = (f"<td>{lp}</td>" + (f"<td>{_fmt(p.get('lpips'))}</td>" if versus_paper else "")) if with_lpips else ""
        beside = (f"<td>{_fmt(p.get('clip_similarity'))}</td>{lp_cells}" if versus_paper
                  else f"<td>{_fmt(s.get('chance'))}</td>{lp_cells}")
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{s['n']}</td><td>{_fmt(s['clip_similarity'])} "
            f"&plusmn; {_fmt(s['clip_similarity_ci95'])}</td>{beside}<td>{len(s.get('skipped', []))}</td></tr>"
        )
    lpips_head = ("<th>LPIPS (ours, 95% CI)</th>" + ("<th>paper</th>" if versus_paper else "")) if with_lpips else ""
    head = ("<th>paper</th>" if versus_paper else "<th>chance (another example's target)</th>") + lpips_head
    note = ("<p>Beside the paper's numbers (arXiv 2305.17216, real VIST / VisDial); they compare only under the "
            "original protocol.</p>" if versus_paper else
            "<p>This model is not the paper's (the toy world or a random model): its scores stand beside chance "
            "and the plain Stable Diffusion rows (sd/...) of this run, not beside the paper's numbers.</p>")
    skipped = summary.get("skipped", [])
    parts = [
        f"<html><head><meta charset='utf-8'><title>GILL evaluation: {task}</title><style>"
        "body{font-family:sans-serif;margin:2em} td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
        " img{width:160px;height:160px;object-fit:cover;margin:2px;image-rendering:pixelated}"
        " .row{display:flex;align-items:center;gap:8px;margin:8px 0}"
        " .cap{font-size:11px;max-width:420px} .arrow{font-size:24px;color:#888}</style></head><body>",
        f"<h1>GILL evaluation: {task}</h1><p>scorer: {html.escape(summary.get('scorer', ''))}; "
        f"model: {html.escape(str(summary.get('model', '')))}; skipped examples: {len(skipped)}"
        + "".join(f"; {html.escape(kind)}: {n}" for kind, n in skip_counts(skipped).items()) + "</p>",
        _protocol_line(summary), note,
        "<table><tr><th>setting</th><th>n</th><th>CLIP similarity (ours, 95% CI)</th>" + head +
        "<th>not scored</th></tr>", *rows, "</table>",
    ]
    unscored = [(name, x) for name, s in summary["settings"].items() for x in s.get("skipped", [])]
    if skipped or unscored:
        parts.append("<h2>Skipped</h2><table><tr><th>example</th><th>where</th><th>kind</th><th>reason</th></tr>")
        for where, x in [("dataset", x) for x in skipped] + unscored:
            parts.append(f"<tr><td>{html.escape(str(x.get('id')))}</td><td>{html.escape(where)}</td>"
                         f"<td>{html.escape(str(x.get('kind', '')))}</td><td>{html.escape(str(x.get('reason')))}</td></tr>")
        parts.append("</table>")
    if "retrieval" in summary:
        parts += _retrieval_table(summary["retrieval"], versus_paper)
    for name in summary["settings"]:
        parts += _grid(out, name, summary, grid)
    parts.append("</body></html>")
    path = out / "report.html"
    atomic_write_text(path, "\n".join(parts))
    return path


def _retrieval_table(r: dict, versus_paper: bool) -> list[str]:
    parts = [f"<h2>Retrieval of the last image (gallery of {r.get('gallery_size')} images; "
             f"{html.escape(str(r.get('protocol', 'both-galleries')))})</h2><table>"
             "<tr><th>setting / gallery</th><th>R@1</th><th>R@5</th><th>R@10</th></tr>"]
    for name, v in r.items():
        if not isinstance(v, dict) or "context_masked" not in v:
            continue
        for gallery in ("context_masked", "full_gallery", "chance"):
            if gallery in v and (versus_paper is False or gallery != "chance"):
                x = v[gallery]
                parts.append(f"<tr><td>{html.escape(name)} / {gallery}</td>" + "".join(
                    f"<td>{100 * x[f'R@{k}']:.1f}</td>" for k in (1, 5, 10)) + "</tr>")
    if versus_paper:
        for name, vals in PAPER_RETRIEVAL.items():
            parts.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{v}</td>" for v in vals) + "</tr>")
    return parts + ["</table>"]


def _grid(out: Path, name: str, summary: dict, grid: int) -> list[str]:
    """A setting's first ``grid`` examples: their inputs, the output and the ground truth."""
    parts = [f"<h2>{html.escape(name)}</h2>"]
    for r in list(read_records(out / name / "records.jsonl").values())[:grid]:
        prompt = r["prompt"] if isinstance(r["prompt"], list) else [r["prompt"]]
        context = []
        for p in prompt:
            if p.startswith("<image ") and "context_dir" in summary:
                context.append(f"<img src='{html.escape(str(Path(summary['context_dir']) / p[7:-1]))}'>")
            else:
                context.append(f"<span class='cap'>{html.escape(p)}</span>")
        parts.append(
            f"<div class='row'><b>{html.escape(r['id'])}</b> {' '.join(context)}<span class='arrow'>&rarr;</span>"
            f"<img src='{html.escape(name + '/' + r['image'])}' title='output'><span class='arrow'>|</span>"
            f"<img src='{html.escape(str(Path(r['target']).resolve()))}' title='ground truth'></div>"
        )
    return parts
