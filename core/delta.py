"""Deltas: only the trained tensors of a run, in safetensors. Base model + delta = the tuned model.

A delta stores tensors under the names they have in the model as trained (peft-wrapped names for
LoRA runs, whose delta is the adapters plus the head). `load_run_model` rebuilds the model exactly:
base weights (or the parent run's tuned model, for re-tuned runs), the same method wrapping, then
the delta. Loading never unpickles anything.
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from core.errors import RunError
from core.fileio import atomic_write
from core.runs import Run, open_run

DELTA_FILE = "delta.safetensors"


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_delta(model: nn.Module, run: Run, method: str) -> int:
    """Write the trained tensors of `model` to the run; return the file size in bytes."""
    state = trained_state(model)
    if not run.writer:  # another process (rank 0) writes it
        return sum(t.numel() * t.element_size() for t in state.values())
    atomic_write(run.file(DELTA_FILE), lambda tmp: save_file(state, tmp, metadata={"run_id": run.id, "method": method}))
    return run.file(DELTA_FILE).stat().st_size


def load_delta(run: Run) -> dict[str, torch.Tensor]:
    path = run.file(DELTA_FILE)
    if not path.is_file():
        raise RunError(f"run {run.id!r} has no {DELTA_FILE} (state: {run.status().get('state')}); only completed runs can be loaded")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def apply_delta(model: nn.Module, delta: dict[str, torch.Tensor], source: str) -> None:
    params = dict(model.named_parameters())
    missing = [k for k in delta if k not in params]
    if missing:
        raise RunError(f"{source}: the delta names tensors the model does not have, e.g. {missing[0]!r}; "
                       "was the base model changed?")
    with torch.no_grad():
        for name, tensor in delta.items():
            if params[name].shape != tensor.shape:
                raise RunError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} in the delta but "
                               f"{tuple(params[name].shape)} in the model")
            params[name].copy_(tensor)


def load_run_model(run: Run, merge: bool = False) -> nn.Module:
    """The tuned model of a completed run, in eval mode. `merge` folds LoRA adapters into the weights
    and returns a plain model (used when a run is the starting point of another)."""
    from core.groups import partition
    from core.methods import apply_method
    from core.models import load_task_model

    config = run.config()
    labels = run.labels()
    if config.init_from:
        model = load_run_model(open_run(config.init_from, config.runs_dir), merge=True)
    else:
        model = load_task_model(config.model, config.data.task, labels)
    if config.method.name == "lora":  # the delta names adapter tensors: wrap the model the same way
        model, _ = apply_method(model, partition(model, "layer"), config.method)
    apply_delta(model, load_delta(run), f"run {run.id!r}")
    if merge and config.method.name == "lora":
        model = model.merge_and_unload()
        # The merged model keeps peft's module copy as its head; parameters are plain again.
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
