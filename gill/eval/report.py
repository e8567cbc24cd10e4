"""The HTML report: our numbers beside the paper's, and a grid of context -> output -> ground truth."""

from __future__ import annotations

import html
import json
from pathlib import Path

from gill._io import atomic_write_text
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


def write_report(out: Path, task: str, grid: int = 12) -> Path:
    summary = json.loads((out / "summary.json").read_text())
    paper = PAPER.get(task, {})
    rows = []
    for name, s in summary["settings"].items():
        p = paper.get(name, {})
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{s['n']}</td><td>{_fmt(s['clip_similarity'])} "
            f"&plusmn; {_fmt(s['clip_similarity_ci95'])}</td><td>{_fmt(p.get('clip_similarity'))}</td>"
            f"<td>{_fmt(s.get('lpips'))}</td><td>{_fmt(p.get('lpips'))}</td><td>{len(s.get('skipped', []))}</td></tr>"
        )
    skipped = summary.get("skipped", [])
    parts = [
        f"<html><head><meta charset='utf-8'><title>GILL evaluation: {task}</title><style>"
        "body{font-family:sans-serif;margin:2em} td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
        " img{width:112px;height:112px;object-fit:cover;margin:2px} .row{display:flex;align-items:center;gap:8px;margin:8px 0}"
        " .cap{font-size:11px;max-width:420px} .arrow{font-size:24px;color:#888}</style></head><body>",
        f"<h1>GILL evaluation: {task}</h1><p>scorer: {html.escape(summary.get('scorer', ''))}; "
        f"model: {html.escape(str(summary.get('model', '')))}; skipped examples: {len(skipped)}"
        + "".join(f"; {html.escape(kind)}: {n}" for kind, n in skip_counts(skipped).items()) + "</p>",
        "<table><tr><th>setting</th><th>n</th><th>CLIP similarity (ours, 95% CI)</th><th>paper</th><th>LPIPS (ours)</th>"
        "<th>paper</th><th>not scored</th></tr>", *rows, "</table>",
    ]
    unscored = [(name, x) for name, s in summary["settings"].items() for x in s.get("skipped", [])]
    if skipped or unscored:
        parts.append("<h2>Skipped</h2><table><tr><th>example</th><th>where</th><th>kind</th><th>reason</th></tr>")
        for where, x in [("dataset", x) for x in skipped] + unscored:
            parts.append(f"<tr><td>{html.escape(str(x.get('id')))}</td><td>{html.escape(where)}</td>"
                         f"<td>{html.escape(str(x.get('kind', '')))}</td><td>{html.escape(str(x.get('reason')))}</td></tr>")
        parts.append("</table>")
    if "retrieval" in summary:
        r = summary["retrieval"]
        parts.append(f"<h2>Retrieval of the last image (gallery of {r.get('gallery_size')} images)</h2><table>"
                     "<tr><th>setting / protocol</th><th>R@1</th><th>R@5</th><th>R@10</th></tr>")
        for name, v in r.items():
            if not isinstance(v, dict):
                continue
            for protocol in ("context_masked", "full_gallery"):
                x = v[protocol]
                parts.append(f"<tr><td>{html.escape(name)} / {protocol}</td>" + "".join(
                    f"<td>{100 * x[f'R@{k}']:.1f}</td>" for k in (1, 5, 10)) + "</tr>")
        for name, vals in PAPER_RETRIEVAL.items():
            parts.append(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{v}</td>" for v in vals) + "</tr>")
        parts.append("</table>")
    for name in summary["settings"]:
        records = list(read_records(out / name / "records.jsonl").values())[:grid]
        parts.append(f"<h2>{html.escape(name)}</h2>")
        for r in records:
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
    parts.append("</body></html>")
    path = out / "report.html"
    atomic_write_text(path, "\n".join(parts))
    return path
