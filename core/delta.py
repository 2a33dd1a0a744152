"""Deltas: only the trained tensors of a run, in safetensors. Base model + delta = the tuned model.

A delta stores tensors under the names they have in the model as trained (peft-wrapped names for
LoRA runs, whose delta is the adapters plus the head). A tensor trained only in slices (FFN experts:
some rows or columns) is stored as those slices, `name`, with their positions, `name@index<dim>`. `load_run_model` rebuilds the model exactly:
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


INDEX = "@index"


def trained_state(model: nn.Module, slices: dict[str, tuple[int, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """The trained tensors: those with `requires_grad` whole, those in `slices` (name -> (dim, indices
    of the trained entries), FFN experts) as their trained slices plus the indices."""
    slices = slices or {}
    state = {}
    for name, param in model.named_parameters():
        if name in slices:
            dim, index = slices[name]
            index = index.cpu()
            state[name] = param.detach().cpu().index_select(dim, index).contiguous()
            state[f"{name}{INDEX}{dim}"] = index.clone()  # its own storage: a weight and its bias share indices
        elif param.requires_grad:
            state[name] = param.detach().cpu().contiguous()
    return state


def save_delta(model: nn.Module, run: Run, method: str, slices: dict[str, tuple[int, torch.Tensor]] | None = None) -> int:
    """Write the trained tensors of `model` to the run (slices of sliced ones); return the file size in bytes."""
    state = trained_state(model, slices)
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
    indices = {k.rsplit(INDEX, 1)[0]: (int(k.rsplit(INDEX, 1)[1]), v) for k, v in delta.items() if INDEX in k}
    values = {k: v for k, v in delta.items() if INDEX not in k}
    missing = [k for k in values if k not in params]
    if missing:
        raise RunError(f"{source}: the delta names tensors the model does not have, e.g. {missing[0]!r}; "
                       "was the base model changed?")
    with torch.no_grad():
        for name, tensor in values.items():
            target = params[name]
            if name in indices:
                dim, index = indices[name]
                expected = list(target.shape)
                expected[dim] = len(index)
                if dim >= target.dim() or list(tensor.shape) != expected or (len(index) and int(index.max()) >= target.shape[dim]):
                    raise RunError(f"{source}: slices of {name!r} (shape {tuple(tensor.shape)}, dim {dim}) do not fit "
                                   f"its shape {tuple(target.shape)} in the model")
                target.index_copy_(dim, index.to(target.device), tensor.to(target.dtype).to(target.device))
                continue
            if target.shape != tensor.shape:
                raise RunError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} in the delta but "
                               f"{tuple(target.shape)} in the model")
            target.copy_(tensor)


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
