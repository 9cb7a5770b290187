"""Training checkpoints as safetensors (every tensor) plus JSON (everything else), written
atomically so a run killed at any moment resumes from its last complete checkpoint.

No pickle: an optimizer's state is flattened to named tensors, its param groups go to JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's state as flat named tensors and its param groups as JSON-able dicts."""
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{pid}.{key}"] = t.detach().clone().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   groups: list[dict]) -> None:
    """Restore what :func:`optimizer_tensors` saved."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(path: Path, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Write `path`.safetensors (modules' weights, optimizer tensors) then `path`.json (meta,
    param groups); the JSON is written last, so its presence means the checkpoint is whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for prefix, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"{prefix}/{k}"] = v.detach().clone().contiguous()
    opt_tensors, groups = optimizer_tensors(optimizer)
    tensors.update({f"optimizer/{k}": v for k, v in opt_tensors.items()})
    weights = path.with_suffix(".safetensors")
    _atomic_write_bytes(weights, lambda p: save_file(tensors, str(p)))
    body = json.dumps({**meta, "param_groups": groups}, indent=1)
    _atomic_write_bytes(path.with_suffix(".json"), lambda p: p.write_text(body))


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None) -> dict | None:
    """Load a checkpoint written by :func:`save_checkpoint` into `modules` and `optimizer`;
    return its meta, or None when there is none."""
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    tensors = load_file(str(path.with_suffix(".safetensors")))
    for prefix, module in modules.items():
        own = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
        module.load_state_dict(own)
    if optimizer is not None:
        opt = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("optimizer/")}
        load_optimizer(optimizer, opt, meta.pop("param_groups"))
    return meta
