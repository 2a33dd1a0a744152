"""Benchmark harness: every method on every task, same data, seed and epoch budget, side by side.

    python bench/run.py --quick          # CPU-sized subsets (~15 minutes on 2 cores)
    python bench/run.py --full           # whole training sets (hours on a CPU)
    python bench/run.py --quick --tasks fpb,conll --methods camel,full
    python bench/run.py --curve          # data efficiency: camel, full, LoRA at 5/20/100 % of the data
    python bench/run.py --curve --tasks fpb --fractions 1.0 --seeds 7,13   # more seeds where one is the default
    python bench/run.py --control        # camel against random groups of its size, three seeds
    python bench/run.py --control --fractions 0.2 --tasks conll   # the same on 20 % of the whole training set
    python bench/run.py --report-only    # rebuild docs/BENCHMARKS.md from bench/results/*.json

Each run is `python -m core train` in its own process (so peak memory is per method), in the run
store bench/runs/<profile>/. Results: bench/results/<profile>.json; docs/BENCHMARKS.md is rebuilt from
every results file there (tables, ratios to full fine-tuning, the issue's targets held or missed), with
interactive plots docs/benchmarks-<profile>.html.
Timings on a shared machine are noisy: compare ratios within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))  # core, for train_size
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
    epochs = tr["epochs"] or 1.0
    row = {
        "task": task, "method": method, "metric": metric, "value": val.get(metric),
        "test_value": report.get("test", {}).get(metric),
        "trainable": report["method"]["trainable"], "trainable_pct": report["method"]["trainable_pct"],
        "seconds_per_epoch": tr["seconds_per_epoch"], "tokens_per_second": tr.get("tokens_per_second"),
        "fb_seconds_per_epoch": round(tr["forward_backward_seconds"] / epochs, 2) if "forward_backward_seconds" in tr else None,
        "train_flops_per_token": tr.get("train_flops_per_token"), "achieved_gflops": tr.get("achieved_gflops"),
        "train_peak_rss_mb": tr.get("train_peak_rss_mb"), "peak_rss_mb": tr["peak_rss_mb"], "delta_mb": round(tr["delta_bytes"] / 1e6, 2),
        "train_size": json.loads((run_dir / "data.json").read_text())["sizes"]["train"],
    }
    if "selection" in report:
        row["scoring_seconds"] = report["selection"].get("scoring_seconds")
        row["scoring_fraction_of_epoch"] = report["selection"].get("scoring_fraction_of_epoch")
        row["depth_floor"] = report["selection"]["settings"].get("depth_floor")
    forgetting = report.get("forgetting")
    if forgetting:
        row["forgetting"] = forgetting.get("increase") if forgetting["measure"] == "perplexity" else 1 - forgetting["mean_cosine"]
        row["forgetting_measure"] = "perplexity increase" if forgetting["measure"] == "perplexity" else "1 - embedding cosine"
    return row


def train_once(config: dict, runs_dir: Path, name: str) -> tuple[Path, subprocess.CompletedProcess, float]:
    """One `python -m core train` run in its own process, in a fresh folder."""
    run_dir = runs_dir / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config_path = runs_dir / f"{name}.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps({**config, "runs_dir": str(runs_dir), "run_id": name}, indent=2))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "core", "train", "--config", str(config_path), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True)
    return run_dir, proc, time.perf_counter() - start


def train_row(config: dict, runs_dir: Path, name: str, task: str, method: str, **extra) -> dict:
    """Train one run and summarise it as a results row (or a row naming the error)."""
    run_dir, proc, wall = train_once(config, runs_dir, name)
    if proc.returncode != 0:
        print(f"{name}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {"task": task, "method": method, **extra, "error": proc.stderr.strip().splitlines()[-1:]}
    return {**summarise(task, method, run_dir), **extra, "wall_seconds": round(wall, 1)}


def run_profile(profile: str, tasks: list[str], methods: list[str], seed: int, results_path: Path) -> None:
    runs_dir = ROOT / "bench" / "runs" / profile
    results = {"profile": profile, "machine": machine(), "rows": []}
    partial = tasks != list(TASKS) or methods != METHODS
    if partial and results_path.is_file():  # a partial rerun replaces its own rows and keeps the others
        previous = json.loads(results_path.read_text())
        results["rows"] = previous["rows"]  # each is replaced when its rerun ends
        results["reruns"] = [*previous.get("reruns", []), {"tasks": ",".join(tasks), "methods": ",".join(methods), "machine": results["machine"]}]
        results["machine"] = previous["machine"]
    order = {t: i for i, t in enumerate(TASKS)}
    for task in tasks:
        for method in [m for m in methods if m in TASKS[task].get("methods", METHODS)]:
            row = train_row(run_config(task, method, profile, runs_dir, seed), runs_dir, f"{task}-{method}", task, method)
            results["rows"] = [r for r in results["rows"] if (r["task"], r["method"]) != (task, method)] + [row]
            results["rows"].sort(key=lambda r: (order.get(r["task"], 99), METHODS.index(r["method"]) if r["method"] in METHODS else 99))
            write_json(results_path, results)  # after every run: a long profile keeps what it has
            if "error" in row:
                continue
            print(f"{task:9s} {method:14s} {row['metric']} {row['value']:.4f}  trained {row['trainable_pct']:.2f} %  "
                  f"{row['seconds_per_epoch']:.1f} s/epoch  {row.get('train_peak_rss_mb') or row['peak_rss_mb']:.0f} MB", flush=True)


# Data efficiency: the same methods on a share of the training data; three seeds (subset, split, init) below 100 %.
CURVE = {"tasks": ["conll", "fpb"], "methods": ["camel", "full", "lora"], "fractions": [0.05, 0.2, 1.0], "seeds": [42, 7, 13],
         "epochs": {"conll": {0.05: 6, 0.2: 3, 1.0: 1}, "fpb": {0.05: 6, 0.2: 3, 1.0: 3}},
         "eval": {"conll": {"max_eval_samples": 1000}, "fpb": {}}}


def train_size(task: str, seed: int) -> int:
    from core.config import DataConfig
    from core.data import load_task_data

    return len(load_task_data(DataConfig(**TASKS[task]["data"]), seed=seed).train)


def share_config(task: str, method: str, runs_dir: Path, seed: int, share: float, n: int) -> dict:
    """A run on `share` of the whole training set (`n` examples), with the curve's epochs and evaluation set."""
    config = run_config(task, method, "full", runs_dir, seed)
    config["data"] = {**config["data"], **CURVE["eval"][task], "max_train_samples": max(16, round(share * n)) if share < 1 else None}
    config["train"]["epochs"] = CURVE["epochs"][task].get(share, CURVE["epochs"][task][0.2])  # other shares: as at 20 %
    return config


def run_curve(tasks: list[str], methods: list[str], results_path: Path, fractions: list[float] | None = None,
              seeds: list[int] | None = None) -> None:
    """`seeds` (default: three below 100 %, the first at 100 %) and `fractions` pick what to (re)run; the
    results file keeps every other row."""
    runs_dir = ROOT / "bench" / "runs" / "curve"
    results = {"profile": "curve", "machine": machine(), "settings": {k: v for k, v in CURVE.items() if k != "epochs"},
               "epochs": {t: {str(f): e for f, e in v.items()} for t, v in CURVE["epochs"].items()}, "rows": []}
    if results_path.is_file():
        previous = json.loads(results_path.read_text())
        results["reruns"] = [*previous.get("reruns", []), {"machine": results["machine"], "tasks": ",".join(tasks), "methods": ",".join(methods),
                                                          "fractions": fractions, "seeds": seeds}]
        results["machine"] = previous["machine"]
        results["rows"] = [r for r in previous["rows"]
                           if not (r["task"] in tasks and r["method"] in methods and (fractions is None or r["fraction"] in fractions)
                                   and (seeds is None or r["seed"] in seeds))]
    for task in tasks:
        n = train_size(task, 42)
        for fraction in [f for f in CURVE["fractions"] if fractions is None or f in fractions]:
            for seed in seeds or (CURVE["seeds"] if fraction < 1.0 else CURVE["seeds"][:1]):
                for method in methods:
                    config = share_config(task, method, runs_dir, seed, fraction, n)
                    config["eval"].pop("forgetting_corpus", None)  # quality only here
                    if method == "random_groups":
                        config["method"]["match_run"] = f"{task}-{fraction}-{seed}-camel"
                    name = f"{task}-{fraction}-{seed}-{method}"
                    row = train_row(config, runs_dir, name, task, method, fraction=fraction, seed=seed)
                    results["rows"].append(row)
                    write_json(results_path, results)  # after every run: a long curve keeps what it has
                    if "error" not in row:
                        print(f"{name:28s} {row['metric']} {row['value']:.4f}  n={row['train_size']}  {row['wall_seconds']:.0f} s", flush=True)
    write_json(results_path, results)


# Does scoring matter? camel against random groups of the same size, several seeds: on quick-profile data,
# or (--fractions) on shares of the whole training set with the curve's epochs and evaluation sets.
CONTROL = {"tasks": ["conll", "fpb"], "methods": ["camel", "random_groups"], "seeds": [42, 7, 13]}


def run_control(tasks: list[str], results_path: Path, fractions: list[float] | None = None, seeds: list[int] | None = None) -> None:
    runs_dir = ROOT / "bench" / "runs" / "control"
    results = {"profile": "control", "machine": machine(), "settings": CONTROL, "rows": []}
    shares: list[str | float] = list(fractions) if fractions else ["quick"]
    if results_path.is_file():  # rows of other tasks and shares are kept
        previous = json.loads(results_path.read_text())
        results["rows"] = [r for r in previous["rows"]
                           if not (r["task"] in tasks and r.get("share", "quick") in shares and (seeds is None or r["seed"] in seeds))]
        if results["rows"]:  # the table keeps the first run's machine and lists this one as a rerun
            results["reruns"] = [*previous.get("reruns", []), {"machine": results["machine"], "tasks": ",".join(tasks), "shares": shares,
                                                              "seeds": seeds}]
            results["machine"] = previous["machine"]
    for task in tasks:
        n = train_size(task, 42) if fractions else 0
        for share in shares:
            for seed in seeds or CONTROL["seeds"]:
                for method in CONTROL["methods"]:
                    name = f"{task}-{share}-{seed}" if share != "quick" else f"{task}-{seed}"
                    config = (run_config(task, method, "quick", runs_dir, seed) if share == "quick"
                              else share_config(task, method, runs_dir, seed, share, n))
                    config["eval"].pop("forgetting_corpus", None)  # quality only here
                    if method == "random_groups":
                        config["method"]["match_run"] = f"{name}-camel"
                    row = train_row(config, runs_dir, f"{name}-{method}", task, method, seed=seed, share=share)
                    results["rows"].append(row)
                    write_json(results_path, results)
                    if "error" not in row:
                        print(f"{name:24s} {method:14s} {row['metric']} {row['value']:.4f}  trained {row['trainable_pct']:.2f} %", flush=True)
    write_json(results_path, results)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def list_argument(parser: argparse.ArgumentParser, flag: str, value: str | None, profile: str, convert, valid, expected: str):
    """A comma-separated --curve / --control option as a list (None when not given); argparse errors otherwise."""
    if value is None:
        return None
    if profile not in ("curve", "control"):
        parser.error(f"{flag} goes with --curve or --control" + (" (--seed sets the seed of a profile)" if flag == "--seeds" else ""))
    try:
        items = [convert(x) for x in value.split(",")]
    except ValueError:
        items = []
    if not items or not all(valid(x) for x in items):
        parser.error(f"{flag}: {expected}, got {value!r}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_const", dest="profile", const="quick")
    group.add_argument("--full", action="store_const", dest="profile", const="full")
    group.add_argument("--curve", action="store_const", dest="profile", const="curve")
    group.add_argument("--control", action="store_const", dest="profile", const="control",
                       help="camel against random groups of its size, three seeds (quick data, or --fractions)")
    parser.add_argument("--tasks", help=f"comma-separated (default: all of {','.join(TASKS)})")
    parser.add_argument("--methods", help=f"comma-separated (default: all of {','.join(METHODS)})")
    parser.add_argument("--seed", type=int, default=42, help="--quick / --full: the seed of every run")
    parser.add_argument("--seeds", help="--curve / --control: comma-separated seeds to (re)run instead of the defaults")
    parser.add_argument("--fractions", help="--curve: shares of the training data to (re)run; --control: shares of the whole training set "
                        "to compare on instead of the quick subsets (e.g. 0.2)")
    parser.add_argument("--report-only", action="store_true", help="rebuild docs from bench/results without training")
    args = parser.parse_args(argv)
    profile = args.profile or "quick"
    if not args.report_only:
        default_tasks, default_methods = {"curve": (CURVE["tasks"], CURVE["methods"]),
                                          "control": (CONTROL["tasks"], CONTROL["methods"])}.get(profile, (list(TASKS), METHODS))
        tasks = args.tasks.split(",") if args.tasks else default_tasks
        methods = args.methods.split(",") if args.methods else default_methods
        unknown = [t for t in tasks if t not in TASKS] + [m for m in methods if m not in METHODS]
        if unknown:
            parser.error(f"unknown task or method: {', '.join(unknown)} (tasks: {', '.join(TASKS)}; methods: {', '.join(METHODS)})")
        fractions = list_argument(parser, "--fractions", args.fractions, profile, float, lambda f: 0 < f <= 1,
                                  f"comma-separated shares in (0, 1] (the curve's: {CURVE['fractions']})")
        seeds = list_argument(parser, "--seeds", args.seeds, profile, int, lambda _: True, "comma-separated integers")
        if not DATA.is_dir():
            print(f"needs the shared data sets in {DATA}", file=sys.stderr)
            return 2
        results_path = ROOT / "bench" / "results" / f"{profile}.json"
        if profile == "curve":
            run_curve(tasks, methods, results_path, fractions, seeds)
        elif profile == "control":
            run_control(tasks, results_path, fractions, seeds)
        else:
            run_profile(profile, tasks, methods, args.seed, results_path)
    from report import write_docs  # bench/report.py

    write_docs(ROOT / "bench" / "results", ROOT / "docs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
