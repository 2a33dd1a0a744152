"""Profile training steps of one run configuration with torch.profiler: where a step's time goes.

    python bench/profile_step.py --config bench/runs/quick/conll-camel.json [--steps 10] [--method full]

Prepares the run exactly as `python -m core train` does (scoring and selection included), then times
`--steps` optimizer steps (forward, backward, optimizer) on real training batches after
two warm-up steps, and prints the profiler's table of the most expensive operators plus the split of the
step into phases, and what autograd keeps for backward on the longest of those batches (tensors saved by
the forward pass, parameters not counted: the activation memory a step adds). Nothing is written to a
run folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from core.config import RunConfig
    from core.train import prepare, task_batches

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--method", help="override method.name (e.g. full, lora)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--shapes", action="store_true", help="group operators by input shapes")
    parser.add_argument("--attention-dropout", type=float, help="override train.attention_dropout (0: fused CPU attention)")
    args = parser.parse_args(argv)
    config = RunConfig.load(args.config)
    if args.method:
        config.method.name = args.method
    if args.attention_dropout is not None:
        config.train.attention_dropout = args.attention_dropout
    prep = prepare(config)
    model, plan, t = prep.model, prep.plan, config.train
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # Trainer's default optimizer (`adamw_torch_fused`): the fused kernel, also on CPUs. (Until Dec 2026 this
    # script used the foreach AdamW, ~5x slower for full fine-tuning's 22.6 M parameters on this CPU.)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=t.weight_decay, fused=True)
    batches = task_batches(prep.task, prep.data.train, args.steps + 2, t.batch_size, t.seed)

    def step(batch) -> dict[str, float]:
        times = {}
        start = time.perf_counter()
        with record_function("forward"):
            loss = model(**batch).loss
        times["forward"] = time.perf_counter() - start
        with record_function("backward"):
            loss.backward()
        times["backward"] = time.perf_counter() - start - times["forward"]
        mark = time.perf_counter()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times["optimizer"] = time.perf_counter() - mark
        return times

    longest = max(batches[2:], key=lambda b: b["input_ids"].numel())
    saved = saved_for_backward(model, longest)
    for batch in batches[:2]:
        step(batch)
    totals: dict[str, float] = {}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for batch in batches[2:]:
            for k, v in step(batch).items():
                totals[k] = totals.get(k, 0.0) + v
    print(f"{config.method.name}: {plan.trainable:,} trainable ({100 * plan.trainable / plan.total:.2f} %), "
          f"{len(batches) - 2} steps, batch {t.batch_size}")
    print(f"saved for backward on the longest batch ({' x '.join(map(str, longest['input_ids'].shape))} tokens): "
          f"{saved / 2**20:.1f} MB")
    whole = sum(totals.values())
    print("phases: " + ", ".join(f"{k} {v / (len(batches) - 2) * 1000:.1f} ms ({100 * v / whole:.0f} %)" for k, v in totals.items()))
    print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


def saved_for_backward(model, batch) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass over `batch` (each storage once;
    parameters, which live anyway, not counted). Gradients are cleared afterwards."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


if __name__ == "__main__":
    raise SystemExit(main())
