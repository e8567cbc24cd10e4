"""Ship a build as the ``toy`` preset: the model (with its corpus and report) and the metric model go into
the package (``gill/assets``), each directory replaced atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from training.toy.plan import INSTALLED_SCORER, ROOT, Plan, log


def install(out: Path, plan: Plan, seed: int, command: str) -> None:
    assets = ROOT / "gill" / "assets"
    skip = shutil.ignore_patterns("gill-config.json", "work", "*.tmp")
    for src, name in ((out / "model", "toy"), (out / "metric-clip", "toy-metric-clip")):
        tmp = assets / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=skip)
        if name == "toy":
            if (out / "report").is_dir():
                shutil.copytree(out / "report", tmp / "report")
            config = json.loads((tmp / "config.json").read_text())
            config["run"]["scorer"] = INSTALLED_SCORER
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            manifest = tmp / "index" / "manifest.json"  # provenance: the preset, not the build's scratch path
            manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "model": "toy"}, indent=2) + "\n")
            report = out / "report" / "report.json"
            (tmp / "BUILD.json").write_text(json.dumps({
                "command": command, "seed": seed, "plan": plan.__dict__,
                "report": json.loads(report.read_text()) if report.is_file() else None,
            }, indent=2) + "\n")
        old = assets / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if (assets / name).exists():
            (assets / name).rename(old)
        tmp.rename(assets / name)
        shutil.rmtree(old, ignore_errors=True)
    size = sum(f.stat().st_size for f in assets.rglob("*") if f.is_file())
    log(f"installed into {assets} ({size / 2**20:.1f} MiB)")
