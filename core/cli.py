"""Command line: `python -m core {groups,train,eval,runs} ...`; `--help` on each.

Every `train` flag sets one RunConfig field (shown in its help), on top of `--config FILE` when
given, so a run started from the UI, a config file or flags is the same kind of object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from core.errors import CamelError, ConfigError

# flag, config field, help. Values are parsed and checked by RunConfig, which names the field.
TRAIN_FLAGS: list[tuple[str, str, str]] = [
    ("--task", "data.task", "classification | ner"),
    ("--train", "data.train", "training data file (csv, tsv, json, jsonl, conll, at) or a datasets id"),
    ("--validation", "data.validation", "validation file (default: a seeded split of --train)"),
    ("--test", "data.test", "test file, evaluated at the end"),
    ("--format", "data.format", "auto | csv | tsv | json | jsonl | conll | at | hub"),
    ("--encoding", "data.encoding", "text encoding of the data files (e.g. latin-1)"),
    ("--text-column", "data.text_column", "classification: text column/key"),
    ("--label-column", "data.label_column", "classification: label column/key"),
    ("--token-column", "data.token_column", "ner: token key (json) or column index (conll, default 0)"),
    ("--tag-column", "data.tag_column", "ner: tag key (json) or column index (conll, default -1)"),
    ("--validation-fraction", "data.validation_fraction", "share of train held out when no validation file"),
    ("--test-fraction", "data.test_fraction", "share of train held out as test when no test file"),
    ("--max-train-samples", "data.max_train_samples", "use a seeded random subset of the training data"),
    ("--max-eval-samples", "data.max_eval_samples", "use a seeded random subset of validation/test"),
    ("--max-length", "data.max_length", "max tokens per input (NER, QA: window size)"),
    ("--stride", "data.stride", "NER, QA: tokens shared by consecutive windows"),
    ("--model", "model.name", "'minilm' (embedded), a model folder, or a Hub id"),
    ("--strategy", "groups.strategy", "expert-group strategy: layer | module | ffn_clusters | rules"),
    ("--experts", "groups.options.experts", "ffn_clusters: experts per block"),
    ("--cluster-features", "groups.options.features", "ffn_clusters: weights | coactivation"),
    ("--attention-experts", "groups.options.attention_experts", "ffn_clusters: attention head groups per block (default: each about an FFN expert's size; 0: one attention group)"),
    ("--method", "method.name", "camel | groups | random_groups | full | head | bitfit | last_n | lora"),
    ("--scorer", "method.scorer", "camel: gradient | gradient_density | gradient_signal | gradient_adam | activation | random"),
    ("--rule", "method.rule", "camel: auto | cumulative | top_k | budget"),
    ("--p", "method.p", "camel: cumulative score threshold in (0, 1]"),
    ("--scope", "method.scope", "camel: cumulative threshold auto | global | layer (auto: layer for token-level tasks)"),
    ("--top-k", "method.top_k", "camel: number of groups for rule top_k"),
    ("--budget", "method.budget", "camel / random_groups: fraction of the model's parameters"),
    ("--include", "method.include", "camel: groups always trained (names or globs)"),
    ("--exclude", "method.exclude", "camel: groups never trained (names or globs)"),
    ("--score-batches", "method.score_batches", "camel: task batches used for scoring"),
    ("--score-micro-batch", "method.score_micro_batch", "camel: examples per pass while scoring (less memory, same scores)"),
    ("--score-warmup", "method.score_warmup", "camel: head-only steps before scoring (head restored after; 0: none)"),
    ("--depth-keep", "method.depth_keep", "camel: score share kept above the depth floor (1: no floor; auto: 0.95)"),
    ("--match-run", "method.match_run", "random_groups: a run whose trained size to match"),
    ("--select", "method.select", "groups to train, comma-separated names or globs (e.g. layer.4,layer.5)"),
    ("--last-n", "method.last_n", "last_n: number of top blocks to train"),
    ("--lora-r", "method.lora_r", "LoRA rank"),
    ("--lora-alpha", "method.lora_alpha", "LoRA alpha"),
    ("--lora-dropout", "method.lora_dropout", "LoRA dropout"),
    ("--lora-targets", "method.lora_targets", "LoRA target module names, comma-separated"),
    ("--lr", "train.learning_rate", "learning rate (default depends on the method)"),
    ("--head-lr", "train.head_lr", "learning rate of the new task head (default: max(lr, 1e-3))"),
    ("--epochs", "train.epochs", "training epochs"),
    ("--max-steps", "train.max_steps", "optimizer steps (overrides --epochs)"),
    ("--batch-size", "train.batch_size", "training batch size"),
    ("--grad-accum", "train.grad_accum", "gradient accumulation steps"),
    ("--weight-decay", "train.weight_decay", "AdamW weight decay"),
    ("--seed", "train.seed", "random seed (data split, head init, order)"),
    ("--patience", "train.patience", "early stopping patience in evaluations (0: off)"),
    ("--metric", "train.metric", "validation metric for early stopping / best model"),
    ("--eval-steps", "train.eval_steps", "evaluate every N steps (default: every epoch)"),
    ("--threads", "train.threads", "CPU threads for torch"),
    ("--attention-dropout", "train.attention_dropout", "dropout on attention probabilities while training "
     "(default: the model's; 0 lets CPU attention use the fused kernel)"),
    ("--run-id", "run_id", "name of the run folder (default: time-task-method)"),
    ("--runs-dir", "runs_dir", "folder holding run folders"),
    ("--init-from", "init_from", "start from this run's tuned model (re-tuning on new data)"),
]
FLAG_OF = {field: flag for flag, field, _ in TRAIN_FLAGS}
DATA_FLAGS = ("--format", "--encoding", "--text-column", "--label-column", "--token-column", "--tag-column", "--max-length")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except ConfigError as e:
        flag = FLAG_OF.get(e.field)
        print(f"error: {flag + ' (' + e.field + ')' if flag else 'config field ' + repr(e.field)}: {e.problem}", file=sys.stderr)
        return 2
    except CamelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the run is marked as such and can be resumed with `train --resume RUN_ID`", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description="CAMEL Lab engine: expert-group fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("groups", help="print the expert-group partition of a model")
    p.add_argument("--model", default="minilm", help="'minilm' (embedded), a model folder, or a Hub id")
    p.add_argument("--task", default="classification", choices=["classification", "ner"], help="task head to attach")
    p.add_argument("--num-labels", type=int, default=2, help="size of the task head")
    p.add_argument("--strategy", default="layer", help="layer | module | rules")
    p.add_argument("--rules", help="YAML/JSON file with a list of {match, group} rules (strategy rules)")
    p.add_argument("--separate-biases", action="store_true", help="module strategy: biases in their own groups")
    p.add_argument("--params", action="store_true", help="list every parameter and its group")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with a Hub model to run")
    p.set_defaults(func=cmd_groups)

    p = sub.add_parser("train", help="train a run from a config file and/or flags",
                       description="Train one run. Flags override fields of --config; each names its field.")
    p.add_argument("--config", help="RunConfig file (.yaml, .yml or .json)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted or failed run from its last checkpoint")
    p.add_argument("--rules", help="YAML/JSON file with {match, group} rules (groups.options.rules)")
    p.add_argument("--trust-remote-code", action="store_true", default=None, help="model.trust_remote_code")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for flag, field, help_text in TRAIN_FLAGS:
        p.add_argument(flag, dest=_dest(flag), default=None, help=f"{help_text} [{field}]")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("score", help="score expert groups on task data and show the selection camel would make",
                       description="Relevance scores, task complexity and the selection, without training. "
                                   "Takes the same config and flags as train.")
    p.add_argument("--config", help="RunConfig file (.yaml, .yml or .json)")
    p.add_argument("--rules", help="YAML/JSON file with {match, group} rules (groups.options.rules)")
    p.add_argument("--trust-remote-code", action="store_true", default=None, help="model.trust_remote_code")
    p.add_argument("--json", action="store_true", help="print the selection as JSON")
    for flag, field, help_text in TRAIN_FLAGS:
        if flag not in ("--run-id", "--init-from", "--resume"):
            p.add_argument(flag, dest=_dest(flag), default=None, help=f"{help_text} [{field}]")
    p.set_defaults(func=cmd_score, run_id=None, init_from=None)

    p = sub.add_parser("eval", help="evaluate a completed run on another data file")
    p.add_argument("run", help="run id")
    p.add_argument("--data", required=True, help="data file, read with the run's data options")
    p.add_argument("--name", help="name of the result in the run's eval/ folder (default: file name)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--batch-size", type=int, default=64)
    for flag in DATA_FLAGS:
        field = dict((f, fld) for f, fld, _ in TRAIN_FLAGS)[flag]
        p.add_argument(flag, dest=_dest(flag), default=None, help=f"override the run's {field}")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("runs", help="list runs with their state and headline metrics")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs)
    return parser


# ---- commands -----------------------------------------------------------------------------------
def cmd_groups(args: argparse.Namespace) -> int:
    from core.config import ModelConfig
    from core.groups import partition, preview
    from core.models import load_task_model

    options: dict[str, Any] = {}
    if args.rules:
        options["rules"] = _read_rules(args.rules)
    if args.separate_biases:
        options["separate_biases"] = True
    labels = [f"LABEL_{i}" for i in range(args.num_labels)] if args.task == "classification" else ["O", "B-X", "I-X"]
    model = load_task_model(ModelConfig(args.model, args.trust_remote_code), args.task, labels)
    part = partition(model, args.strategy, options)
    if args.json:
        out = part.to_dict()
        if args.params:
            out["params"] = preview(model, part)
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.model}: {part.total_params:,} parameters in {len(part.groups)} groups (strategy {part.strategy})\n")
    print(part.table())
    if args.params:
        from core.groups import format_table

        rows = [("parameter", "shape", "params", "group")]
        rows += [(r["param"], "x".join(map(str, r["shape"])), f"{r['numel']:,}", r["group"]) for r in preview(model, part)]
        print("\n" + format_table(rows))
    unmatched = [g for g in part.groups if g.kind == "unmatched"]
    if unmatched:
        print(f"\n{len(unmatched[0].params)} parameters matched no rule (group 'unmatched'); --params lists them")
    return 0


def train_config(args: argparse.Namespace):
    """The RunConfig that `train`'s --config and flags describe."""
    from core.config import RunConfig

    data: dict[str, Any] = {}
    if args.config:
        data = RunConfig.load(args.config).to_dict()
    for flag, field, _ in TRAIN_FLAGS:
        value = getattr(args, _dest(flag))
        if value is not None:
            _set(data, field, value)
    if args.trust_remote_code:
        _set(data, "model.trust_remote_code", True)
    if args.rules:
        _set(data, "groups.options.rules", _read_rules(args.rules))
        data.setdefault("groups", {}).setdefault("strategy", "rules")
    return RunConfig.from_dict(data)


def cmd_train(args: argparse.Namespace) -> int:
    from core.evaluate import format_report
    from core.train import resume, train

    if args.resume:
        runs_dir = args.runs_dir or "runs"
        result = resume(args.resume, runs_dir, progress=not args.no_progress)
    else:
        config = train_config(args)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        result = train(config, progress=not args.no_progress)
    report = result.report
    print(f"\nrun {result.run.id} completed: {result.run.path}")
    plan = report["method"]
    print(f"method {plan['method']}: {plan['trainable']:,} of {plan['total']:,} parameters trained ({plan['trainable_pct']:.2f} %)")
    for split in ("validation", "test"):
        if split in report:
            print(f"\n{split}:\n{format_report(report[split])}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from core.train import prepare

    config = train_config(args)
    config.method.name = "camel"  # `score` shows what camel would select
    prep = prepare(config)
    sel = prep.selection
    if args.json:
        print(json.dumps(sel.to_dict(), indent=2))
        return 0
    c, scoring = sel.complexity, sel.scoring
    print(f"task complexity {c.value:.3f}  (labels {c.components['labels']:.3f}, probe {c.components['probe']:.3f}, "
          f"spread {c.components['spread']:.3f})")
    print(f"  {c.num_labels} labels, label entropy {c.label_entropy:.3f}, {c.train_size:,} training examples, "
          f"{c.mean_length:.1f} tokens each")
    print(f"  untrained head loss {c.head_loss:.3f} (chance {c.chance_loss:.3f}); linear probe accuracy "
          f"{c.probe_accuracy:.3f} vs majority {c.majority_accuracy:.3f}")
    print(f"scoring: {scoring['scorer']} on {scoring['batches']} batches ({scoring['examples']} examples) in {scoring['seconds']:.2f} s")
    settings = ", ".join(f"{k} {v}" for k, v in sel.settings.items() if v is not None)
    print(f"selection: rule {sel.rule} ({settings}): {len(sel.selected)} groups, "
          f"{sel.selected_params:,} parameters ({100 * sel.selected_params / sel.total_params:.2f} % of the model)\n")
    print(sel.table())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from core.evaluate import evaluate_run, format_report
    from core.runs import open_run

    run = open_run(args.run, args.runs_dir)
    overrides = {field.split(".", 1)[1]: getattr(args, _dest(flag))
                 for flag, field, _ in TRAIN_FLAGS if flag in DATA_FLAGS and getattr(args, _dest(flag)) is not None}
    if "max_length" in overrides:
        overrides["max_length"] = _int("--max-length", overrides["max_length"])
    result = evaluate_run(run, args.data, overrides, name=args.name, batch_size=args.batch_size)
    print(f"run {run.id} on {args.data} ({result['n']} examples):\n{format_report(result)}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from core.groups import format_table
    from core.runs import list_runs

    runs = list_runs(args.runs_dir)
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    if not runs:
        print(f"no runs in {args.runs_dir}")
        return 0
    rows = [("run", "state", "method", "trained %", "headline", "created")]
    for s in runs:
        plan = s.get("plan") or {}
        head = s.get("headline") or s.get("last_eval") or {}
        headline = "  ".join(f"{k} {v:.4f}" for k, v in head.items() if isinstance(v, (int, float)))
        pct = plan.get("trainable_pct")
        rows.append((s.get("run_id", "?"), s.get("state", "?"), plan.get("method", ""),
                     f"{pct:.2f}" if pct is not None else "", headline, s.get("created", "")))
    print(format_table(rows))
    return 0


# ---- helpers ------------------------------------------------------------------------------------
def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _set(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[last] = value


def _int(flag: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise CamelError(f"{flag}: expected an integer, got {value!r}") from None


def _read_rules(path: str) -> list:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            rules = yaml.safe_load(f)  # YAML is a superset of JSON: one reader for both
    except FileNotFoundError:
        raise ConfigError("groups.options.rules", f"rules file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError("groups.options.rules", f"{path} is not valid YAML/JSON: {e}") from None
    if isinstance(rules, dict) and "rules" in rules:
        rules = rules["rules"]
    if not isinstance(rules, list):
        raise ConfigError("groups.options.rules", f"{path} must hold a list of {{match, group}} rules")
    return rules


def _quiet_libraries() -> None:
    """Library chatter (load reports, weight-loading bars) hides the run's own output."""
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
