"""Benchmark harness: every method on every task, same data, seed and epoch budget, side by side.

    python bench/run.py --quick          # CPU-sized subsets (~15 minutes on 2 cores)
    python bench/run.py --full           # whole training sets (hours on a CPU)
    python bench/run.py --quick --tasks fpb,conll --methods camel,full

Each run is `python -m core train` in its own process (so peak memory is per method), in the run
store bench/runs/<profile>/. Results: bench/results/<profile>.json, and docs/BENCHMARKS.md with the
tables and ratios to full fine-tuning, plus an interactive plot docs/benchmarks-<profile>.html.
Timings on a shared machine are noisy: compare ratios within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
METHODS = ["camel", "random_groups", "full", "lora", "bitfit", "head", "last_n"]
HEADLINE = {"conll": "entity_f1", "fpb": "macro_f1", "squad": "f1", "dialogue": "perplexity"}

# Per task: the data and evaluation settings shared by every method; sizes per profile.
TASKS = {
    "conll": {"data": {"task": "ner", "train": str(DATA / "ner/conll2003/train.txt"), "validation": str(DATA / "ner/conll2003/dev.txt")},
              "quick": {"max_train_samples": 600, "max_eval_samples": 300}, "full": {}, "epochs": {"quick": 2, "full": 3}},
    "fpb": {"data": {"task": "classification", "train": str(DATA / "sentiment/financial_phrasebank/Sentences_AllAgree.txt"),
                     "encoding": "latin-1", "validation_fraction": 0.1, "test_fraction": 0.1},
            "quick": {"max_train_samples": 600, "max_eval_samples": 226}, "full": {}, "epochs": {"quick": 2, "full": 3}},
    "squad": {"data": {"task": "qa", "train": str(DATA / "qa/squad_v1.1/dev-v1.1.articles-01-36.json"), "validation_fraction": 0.33,
                       "max_length": 192, "stride": 48},
              "quick": {"max_train_samples": 400, "max_eval_samples": 150}, "full": {"max_length": 384, "stride": 128},
              "epochs": {"quick": 1, "full": 2}},
    "dialogue": {"data": {"task": "dialogue", "prompt_column": "instruction", "response_column": "response", "validation_fraction": 0.1,
                          "train": str(DATA / "dialogue/bitext_customer_support/Bitext_Sample_Customer_Support_Training_Dataset.csv"),
                          "max_length": 192},
                 "model": "smollm2", "methods": ["camel", "full", "lora"],
                 "eval": {"forgetting_corpus": str(DATA / "lm/wikitext-2/wiki.valid.tokens"), "generation_samples": 2, "max_new_tokens": 32},
                 "quick": {"max_train_samples": 64, "max_eval_samples": 16}, "full": {"max_train_samples": 2000, "max_eval_samples": 200},
                 "eval_quick": {"forgetting_tokens": 1024}, "eval_full": {"forgetting_tokens": 8192}, "epochs": {"quick": 1, "full": 1}},
}
METHOD_SETTINGS = {
    "camel": {"name": "camel"},
    "random_groups": {"name": "random_groups"},  # sized to the camel run of the same task (match_run)
    "full": {"name": "full"},
    "lora": {"name": "lora", "lora_r": 8, "lora_targets": ["query", "value"]},
    "bitfit": {"name": "bitfit"},
    "head": {"name": "head"},
    "last_n": {"name": "last_n", "last_n": 2},
}


def run_config(task: str, method: str, profile: str, runs_dir: Path, seed: int) -> dict:
    spec = TASKS[task]
    data = {**spec["data"], **spec[profile]}
    method_cfg = dict(METHOD_SETTINGS[method])
    if method == "random_groups":
        method_cfg.update(match_run=f"{task}-camel")
    if method == "lora" and spec.get("model") == "smollm2":
        method_cfg["lora_targets"] = ["q_proj", "v_proj"]
    config = {
        "data": data,
        "model": {"name": spec.get("model", "minilm")},
        "groups": {"strategy": "ffn_clusters"} if method in ("camel", "random_groups") else {},
        "method": method_cfg,
        "train": {"epochs": spec["epochs"][profile], "batch_size": 8 if task == "dialogue" else 16, "seed": seed, "patience": 2},
        "eval": {**spec.get("eval", {}), **spec.get(f"eval_{profile}", {})},
        "runs_dir": str(runs_dir),
        "run_id": f"{task}-{method}",
    }
    if "forgetting_corpus" not in config["eval"] and task in ("conll", "fpb"):
        config["eval"]["forgetting_corpus"] = str(DATA / "lm/wikitext-2/wiki.valid.tokens")
    return config


def matmul_gflops(seconds: float = 2.0, n: int = 1024) -> float:
    """Dense fp32 matmul throughput of this machine, measured now (the same threads as training)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def machine() -> dict:
    import torch

    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "matmul_gflops": round(matmul_gflops(), 1)}


def summarise(task: str, method: str, run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    val, tr = report["validation"], report["training"]
    metric = HEADLINE[task]
    row = {
        "task": task, "method": method, "metric": metric, "value": val.get(metric),
        "test_value": report.get("test", {}).get(metric),
        "trainable": report["method"]["trainable"], "trainable_pct": report["method"]["trainable_pct"],
        "seconds_per_epoch": tr["seconds_per_epoch"], "tokens_per_second": tr.get("tokens_per_second"),
        "peak_rss_mb": tr["peak_rss_mb"], "delta_mb": round(tr["delta_bytes"] / 1e6, 2),
    }
    if "selection" in report:
        row["scoring_seconds"] = report["selection"].get("scoring_seconds")
        row["scoring_fraction_of_epoch"] = report["selection"].get("scoring_fraction_of_epoch")
    forgetting = report.get("forgetting")
    if forgetting:
        row["forgetting"] = forgetting.get("increase") if forgetting["measure"] == "perplexity" else 1 - forgetting["mean_cosine"]
        row["forgetting_measure"] = "perplexity increase" if forgetting["measure"] == "perplexity" else "1 - embedding cosine"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_const", dest="profile", const="quick")
    group.add_argument("--full", action="store_const", dest="profile", const="full")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--report-only", action="store_true", help="rebuild docs from bench/results without training")
    args = parser.parse_args(argv)
    profile = args.profile or "quick"
    results_path = ROOT / "bench" / "results" / f"{profile}.json"
    if not args.report_only:
        if not DATA.is_dir():
            print(f"needs the shared data sets in {DATA}", file=sys.stderr)
            return 2
        runs_dir = ROOT / "bench" / "runs" / profile
        results = {"profile": profile, "machine": machine(), "rows": []}
        partial = args.tasks != ",".join(TASKS) or args.methods != ",".join(METHODS)
        if partial and results_path.is_file():  # a partial rerun replaces its own rows and keeps the others
            previous = json.loads(results_path.read_text())
            chosen = {(t, m) for t in args.tasks.split(",") for m in args.methods.split(",")}
            results["rows"] = [r for r in previous["rows"] if (r["task"], r["method"]) not in chosen]
            results["reruns"] = [*previous.get("reruns", []), {"tasks": args.tasks, "methods": args.methods, "machine": results["machine"]}]
            results["machine"] = previous["machine"]
        for task in args.tasks.split(","):
            methods = [m for m in args.methods.split(",") if m in TASKS[task].get("methods", METHODS)]
            for method in methods:
                run_dir = runs_dir / f"{task}-{method}"
                if run_dir.exists():
                    import shutil

                    shutil.rmtree(run_dir)
                config_path = runs_dir / f"{task}-{method}.json"
                config_path.parent.mkdir(parents=True, exist_ok=True)
                config_path.write_text(json.dumps(run_config(task, method, profile, runs_dir, args.seed), indent=2))
                start = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "core", "train", "--config", str(config_path), "--no-progress"],
                                      cwd=ROOT, capture_output=True, text=True)
                wall = time.perf_counter() - start
                if proc.returncode != 0:
                    print(f"{task} {method}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
                    results["rows"].append({"task": task, "method": method, "error": proc.stderr.strip().splitlines()[-1:]})
                    continue
                row = summarise(task, method, run_dir)
                row["wall_seconds"] = round(wall, 1)
                results["rows"].append(row)
                print(f"{task:9s} {method:14s} {row['metric']} {row['value']:.4f}  trained {row['trainable_pct']:.2f} %  "
                      f"{row['seconds_per_epoch']:.1f} s/epoch  {row['peak_rss_mb']:.0f} MB", flush=True)
        order = {t: i for i, t in enumerate(TASKS)}
        results["rows"].sort(key=lambda r: (order.get(r["task"], 99), METHODS.index(r["method"]) if r["method"] in METHODS else 99))
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    results = json.loads(results_path.read_text())
    write_docs(results)
    return 0


def write_docs(results: dict) -> None:
    profile, m = results["profile"], results["machine"]
    rows = [r for r in results["rows"] if "error" not in r]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python bench/run.py --{profile}` on {m['date']}: {m['platform']}, {m['cpus']} CPUs, "
        f"torch {m['torch']} ({m['threads']} threads), dense fp32 matmul {m['matmul_gflops']} GFLOP/s measured in the same run.",
        "Every method of a task ran with the same data, seed, epoch budget and early stopping, one after another in one",
        "run of the script; timings are wall-clock on a shared machine, so read them as ratios within a task.",
        "`random_groups` trains random groups as large as that task's camel run (the control for scoring).",
        "s/epoch includes the per-epoch evaluation. Forgetting: WikiText-2 perplexity increase for the causal LM,",
        "1 - mean cosine similarity of base and tuned sentence embeddings of WikiText-2 lines for the encoders.",
        "",
        "The quick profile trains on small subsets for one or two epochs (see TASKS in bench/run.py): methods with",
        "low default learning rates (full at 5e-5) or few parameters (LoRA, BitFit, head) are far from converged there,",
        "so its ratios say how methods behave with little data and compute, not where they end up. Targets of",
        "issue 5 are to be read off the full profile.",
        "",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        full = next((r for r in task_rows if r["method"] == "full"), None)
        metric = task_rows[0]["metric"]
        lines += [f"## {task} ({metric}, validation{'; lower is better' if metric == 'perplexity' else ''})", "",
                  "| method | " + metric + " | / full | trained % | s/epoch | / full | tokens/s | peak RSS MB | / full | delta MB | forgetting | scoring % of epoch |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in task_rows:
            def ratio(key: str, r: dict = r, full: dict | None = full) -> str:
                return f"{r[key] / full[key]:.2f}" if full and full.get(key) and r.get(key) is not None else ""

            scoring = r.get("scoring_fraction_of_epoch")
            forgetting = r.get("forgetting")
            lines.append(f"| {r['method']} | {r['value']:.4f} | {ratio('value')} | {r['trainable_pct']:.2f} | {r['seconds_per_epoch']:.1f} | "
                         f"{ratio('seconds_per_epoch')} | {r.get('tokens_per_second') or ''} | {r['peak_rss_mb']:.0f} | {ratio('peak_rss_mb')} | "
                         f"{r['delta_mb']:.1f} | {'' if forgetting is None else f'{forgetting:.4f}'} | "
                         f"{'' if scoring is None else f'{100 * scoring:.1f}'} |")
        lines.append("")
    for rerun in results.get("reruns", []):
        lines += [f"Rerun separately on {rerun['machine']['date']} (matmul {rerun['machine']['matmul_gflops']} GFLOP/s): "
                  f"tasks {rerun['tasks']}, methods {rerun['methods']}.", ""]
    failed = [r for r in results["rows"] if "error" in r]
    if failed:
        lines += ["## Runs that failed", ""] + [f"- {r['task']} {r['method']}: {r['error']}" for r in failed] + [""]
    lines += [f"Interactive plot: [benchmarks-{profile}.html](benchmarks-{profile}.html) (quality against trained parameters and time).", ""]
    (ROOT / "docs" / "BENCHMARKS.md").write_text("\n".join(lines))
    write_plot(rows, ROOT / "docs" / f"benchmarks-{profile}.html")


def write_plot(rows: list[dict], path: Path) -> None:
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        return
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = make_subplots(rows=len(tasks), cols=2, subplot_titles=[t for task in tasks for t in (f"{task}: quality vs trained %", f"{task}: quality vs s/epoch")])
    for i, task in enumerate(tasks, start=1):
        task_rows = [r for r in rows if r["task"] == task]
        for col, key in ((1, "trainable_pct"), (2, "seconds_per_epoch")):
            fig.add_trace(go.Scatter(x=[r[key] for r in task_rows], y=[r["value"] for r in task_rows], mode="markers+text",
                                     text=[r["method"] for r in task_rows], textposition="top center", showlegend=False), row=i, col=col)
    fig.update_layout(height=320 * len(tasks), width=1000)
    fig.write_html(path, include_plotlyjs="cdn")


if __name__ == "__main__":
    raise SystemExit(main())
