"""Training and scoring of a ReLLaX model with ``accelerate`` (single process, ``accelerate launch`` or
``torchrun`` unchanged: DDP/FSDP come from the launcher's configuration).

The loss is the answer-token loss: cross-entropy over the two answer logits [No, Yes] (equivalently BCE
on the 2-way softmax). Batches are drawn from a per-epoch seeded permutation, so the sample cursor
(epoch, step) plus the saved RNG states make a resumed run continue exactly where the interrupted one
stopped (see ``train.checkpoint``). Mixed precision: bf16 on GPUs that support it, else fp16; fp32 on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    save_every_steps: int = 50  # also at every epoch end; 0: epoch ends only
    keep_checkpoints: int = 2
    seed: int = 0
    eval_batch_size: int = 64
    gradient_checkpointing: bool = False
    progress: bool = True
    stop_after_steps: Optional[int] = None  # testing hook: raise KeyboardInterrupt after this global step


class PromptDataset:
    """Prompt samples (``data.collate.PromptSample``) + a collator + per-sample CTR conditioning rows."""

    def __init__(self, samples: Sequence, collator, cond: Optional[torch.Tensor] = None):
        self.samples = list(samples)
        self.collator = collator
        self.cond = cond  # (N_split, cond_dim) indexed by PromptSample.sample_index, or None

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.float32)

    def batch(self, indices) -> Dict[str, torch.Tensor]:
        batch = self.collator([self.samples[int(i)] for i in indices])
        if self.cond is not None:
            batch["cond"] = self.cond[batch["sample_index"]]
        return batch


def _to(batch: Dict, device) -> Dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def answer_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), label.long())


def train_model(
    model,
    dataset: PromptDataset,
    config: TrainConfig,
    run_dir,
    resume: bool = False,
    accelerator=None,
    log: Callable[[str], None] = print,
) -> Dict:
    """Train ``model`` (a ``ReLLaXModel``) on ``dataset``; checkpoints go to ``run_dir/checkpoints``.

    Returns {"losses": [per-step loss], "global_step": int, "resumed_from": step or None}.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    acc = accelerator or Accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision), cpu=not torch.cuda.is_available())
    world, rank = acc.num_processes, acc.process_index
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (check the recipe stage)")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    global_batch = config.batch_size * world
    steps_per_epoch = math.ceil(len(dataset) / global_batch)
    total_steps = steps_per_epoch * config.epochs
    warmup = int(total_steps * config.warmup_ratio)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "losses": []}
    resumed_from = None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            state = load_checkpoint(ckpt, model, optimizer, scheduler)
            resumed_from = state["global_step"]
            log(f"resumed from {ckpt} (epoch {state['epoch']}, step {state['step_in_epoch']}, global step {state['global_step']})")
    model, optimizer = acc.prepare(model, optimizer)
    losses: List[float] = list(state["losses"])
    model.train()
    bar = tqdm(total=total_steps, initial=state["global_step"], desc="train", disable=not (config.progress and acc.is_main_process))
    try:
        for epoch in range(state["epoch"], config.epochs):
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
            first = state["step_in_epoch"] if epoch == state["epoch"] else 0
            for step in range(first, steps_per_epoch):
                chunk = order[step * global_batch : (step + 1) * global_batch]
                mine = chunk[rank::world]
                if len(mine) == 0:
                    mine = chunk[:1]
                batch = _to(dataset.batch(mine), acc.device)
                with acc.autocast():
                    logits = model(batch)
                loss = answer_loss(logits, batch["label"])
                acc.backward(loss)
                if config.max_grad_norm:
                    acc.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_loss = float(acc.reduce(loss.detach(), reduction="mean")) if world > 1 else float(loss.detach())
                losses.append(step_loss)
                state = {"epoch": epoch, "step_in_epoch": step + 1, "global_step": state["global_step"] + 1, "losses": losses}
                if step + 1 == steps_per_epoch:
                    state.update(epoch=epoch + 1, step_in_epoch=0)
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", epoch=epoch + 1)
                at_epoch_end = state["step_in_epoch"] == 0
                if at_epoch_end or (config.save_every_steps and state["global_step"] % config.save_every_steps == 0):
                    acc.wait_for_everyone()
                    if acc.is_main_process:
                        save_checkpoint(run_dir, acc.unwrap_model(model), optimizer, scheduler, state, keep=config.keep_checkpoints)
                    acc.wait_for_everyone()
                if config.stop_after_steps is not None and state["global_step"] >= config.stop_after_steps:
                    raise KeyboardInterrupt(f"stop_after_steps={config.stop_after_steps} reached (testing hook)")
    finally:
        bar.close()
    return {"losses": losses, "global_step": state["global_step"], "resumed_from": resumed_from, "model": acc.unwrap_model(model)}


@torch.no_grad()
def predict_proba(model, dataset: PromptDataset, batch_size: int = 64, progress: bool = True, desc: str = "score") -> np.ndarray:
    """p(click) for every sample of ``dataset``, in order (single process; eval mode, no dropout)."""
    from tqdm.auto import tqdm

    from .model import click_probability

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, disable=not progress):
        batch = _to(dataset.batch(range(start, min(start + batch_size, len(dataset)))), device)
        out.append(click_probability(model(batch)).cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)
