"""Training and scoring of a ReLLaX model with ``accelerate`` (single process, ``accelerate launch`` or
``torchrun`` unchanged: DDP/FSDP come from the launcher's configuration). Several processes reproduce the
single-process run for the same global batch (see :func:`train_model`); :func:`predict_proba` shards the
scoring over the ranks and gathers it. FSDP: accelerate's FSDP plugin (GPU launches; accelerate 1.15 runs
CPU launches as DDP), or a model the caller already sharded with torch's FSDP2 ``fully_shard`` (works on
CPU with gloo); checkpoints then hold the gathered full tensors, and resuming under FSDP is refused.

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

from ..ops._backend import cpu_has_native_bf16


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto | fast | no | bf16 | fp16 (resolve_mixed_precision)
    save_every_steps: int = 50  # also at every epoch end; 0: epoch ends only
    keep_checkpoints: int = 2
    seed: int = 0
    eval_batch_size: int = 64
    gradient_checkpointing: bool = False
    progress: bool = True
    stop_after_steps: Optional[int] = None  # testing hook: raise KeyboardInterrupt after this global step
    # absolute learning rates per parameter group (PARAM_GROUPS: lora, generator, projector, readout); a group
    # left out trains at ``lr``
    lr_groups: Optional[Dict[str, float]] = None
    # batches of similar token length (less padding): each epoch's permutation is cut into megabatches of
    # ``LENGTH_MEGABATCH`` global batches, each sorted by length, and the batches of a megabatch are shuffled
    group_by_length: bool = False
    # with a valid set (train_model's ``valid``): score it every N steps (0: at epoch ends only) and, with
    # select_best, end with the trainable tensors of the best valid AUC (model selection on valid, test once)
    eval_every_steps: int = 0
    select_best: bool = True


PARAM_GROUPS = ("lora", "generator", "projector", "readout")
LENGTH_MEGABATCH = 50  # global batches per length-sorted megabatch (HF Trainer's group_by_length uses 50 too)


def param_group_of(name: str) -> str:
    """The learning-rate group of a trainable parameter of a ``ReLLaXModel``: ``lora`` (CFLoRA A and B),
    ``generator`` (the C generator / interaction parameters), ``projector`` (SPA), ``readout`` (the residual
    read-out's lambda and gate, the encoder verbaliser bias) or ``other``."""
    if name.endswith("lora_A") or name.endswith("lora_B") or ".lora_A." in name or ".lora_B." in name:
        return "lora"
    if ".interaction." in name or name.startswith("interaction."):
        return "generator"
    if name.startswith("projector.") or ".projector." in name:
        return "projector"
    if name.split(".")[-1] in ("readout_lambda", "readout_gate", "verbaliser_bias"):
        return "readout"
    return "other"


def param_groups(
    model, lr: float, lr_groups: Optional[Dict[str, float]] = None, weight_decay: float = 0.0
) -> List[Dict]:
    """AdamW parameter groups of ``model``'s trainable parameters, one per :func:`param_group_of` group that
    has parameters, each with its learning rate (``lr_groups[group]``, else ``lr``) and a ``name``."""
    lr_groups = dict(lr_groups or {})
    unknown = sorted(set(lr_groups) - set(PARAM_GROUPS))
    if unknown:
        raise ValueError(f"lr_groups: unknown group(s) {unknown}; expected some of {list(PARAM_GROUPS)}")
    for group, value in lr_groups.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"lr_groups[{group!r}]: expected a finite learning rate >= 0, got {value!r}")
    grouped: Dict[str, List] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grouped.setdefault(param_group_of(_unwrapped_name(name)), []).append(p)
    return [
        {"params": ps, "lr": float(lr_groups.get(g, lr)), "weight_decay": weight_decay, "name": g}
        for g, ps in grouped.items()
    ]


def _unwrapped_name(name: str) -> str:
    """A parameter name without the wrappers' parts (DDP's ``module.``, FSDP's and torch.compile's)."""
    wrappers = ("module", "_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module")
    return ".".join(part for part in name.split(".") if part not in wrappers)


class PromptDataset:
    """Prompt samples (``data.collate.PromptSample``) + a collator + per-sample CTR conditioning rows.

    With a ``PromptCollator`` (anything with ``encode`` and ``pad``) each sample is rendered and tokenised
    once and kept (a truncated prompt takes several tokeniser calls to fit): later epochs, the length
    grouping and every evaluation of the same set reuse it.
    """

    def __init__(self, samples: Sequence, collator, cond: Optional[torch.Tensor] = None):
        self.samples = list(samples)
        self.collator = collator
        self.cond = cond  # (N_split, cond_dim) indexed by PromptSample.sample_index, or None
        self._cache: Optional[List] = (
            [None] * len(self.samples) if (hasattr(collator, "encode") and hasattr(collator, "pad")) else None
        )

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.float32)

    def encoded(self, i: int) -> Dict:
        """Sample ``i`` rendered and tokenised by the collator (cached)."""
        i = int(i)
        if self._cache is None:
            raise TypeError(
                f"collator: {type(self.collator).__name__} has no encode/pad, so nothing is cached"
            )
        if self._cache[i] is None:
            self._cache[i] = self.collator.encode(self.samples[i])
        return self._cache[i]

    def lengths(self) -> np.ndarray:
        """Token length of every sample (tokenises what is not cached yet)."""
        if self._cache is None:
            return np.array([len(self.collator([s])["input_ids"][0]) for s in self.samples], dtype=np.int64)
        return np.array([len(self.encoded(i)["input_ids"]) for i in range(len(self.samples))], dtype=np.int64)

    def batch(self, indices) -> Dict[str, torch.Tensor]:
        if self._cache is not None:
            batch = self.collator.pad([self.encoded(i) for i in indices])
        else:
            batch = self.collator([self.samples[int(i)] for i in indices])
        if self.cond is not None:
            batch["cond"] = self.cond[batch["sample_index"]]
        return batch


def epoch_order(dataset: PromptDataset, config: TrainConfig, epoch: int, global_batch: int) -> torch.Tensor:
    """The sample order of one epoch (deterministic in ``config.seed`` and ``epoch``, so a resumed run finds
    the same batches): a seeded permutation, with ``group_by_length`` re-ordered into length-sorted
    megabatches whose batches are shuffled (every sample still once per epoch)."""
    gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    order = torch.randperm(len(dataset), generator=gen)
    if not config.group_by_length or len(dataset) <= global_batch:
        return order
    lengths = torch.as_tensor(dataset.lengths())
    mega = LENGTH_MEGABATCH * global_batch
    out = []
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        chunk = chunk[torch.sort(lengths[chunk], descending=True, stable=True).indices]
        batches = list(torch.split(chunk, global_batch))
        # the last, possibly short, batch keeps its place at the end of the epoch (rank slicing, resume)
        tail = batches.pop() if start + mega >= len(order) and len(batches[-1]) < global_batch else None
        perm = torch.randperm(len(batches), generator=gen).tolist()
        out.extend(batches[k] for k in perm)
        if tail is not None:
            out.append(tail)
    return torch.cat(out)


def _to(batch: Dict, device) -> Dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


MIXED_PRECISION = ("auto", "fast", "no", "bf16", "fp16")


def resolve_mixed_precision(value: str) -> str:
    """accelerate's mixed precision for a TrainConfig value: ``auto`` = bf16 (fp16 without bf16) on CUDA,
    fp32 on the CPU; ``fast`` = ``auto``, but bf16 autocast also on a CPU that computes bf16 natively."""
    if value not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision: expected one of {', '.join(MIXED_PRECISION)}, got {value!r}")
    if value not in ("auto", "fast"):
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if value == "fast" and cpu_has_native_bf16() else "no"


def answer_loss_sum(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), label.long(), reduction="sum")


def rank_slice(chunk: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a global batch: a contiguous slice (sizes differ by at most one)."""
    n = len(chunk)
    return chunk[n * rank // world : n * (rank + 1) // world]


def is_fully_sharded(model) -> bool:
    """True for a module sharded with torch's FSDP2 ``fully_shard`` (or containing one)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def checkpoint_views(model, optimizer, fsdp: bool):
    """What ``save_checkpoint`` reads (``trainable_state()``, ``state_dict()``). Under FSDP the full tensors
    and the full optimizer state are gathered first (a collective: every rank calls this; rank 0 writes)."""
    if not fsdp:
        return model, optimizer
    from types import SimpleNamespace

    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    full = get_model_state_dict(model, options=options)
    optim = getattr(optimizer, "optimizer", optimizer)
    optim_state = get_optimizer_state_dict(model, optim, options=options)
    tensors = {n: v for n, v in full.items() if n in trainable}
    return SimpleNamespace(trainable_state=lambda: tensors), SimpleNamespace(state_dict=lambda: optim_state)


def _allow_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state whose mixed precision cannot change once set. In one process
    (no launcher) a later training run with another precision (a bf16 row after an fp32 one in a benchmark,
    or in a notebook) gets a fresh state instead of accelerate's "restart your runtime" error. Under a
    launcher the state is the launch's and is left alone."""
    from accelerate.state import AcceleratorState

    from rellax_fast.distributed import launched

    if launched() or not AcceleratorState._shared_state:
        return
    if AcceleratorState._shared_state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state()


def train_model(
    model,
    dataset: PromptDataset,
    config: TrainConfig,
    run_dir,
    resume: bool = False,
    accelerator=None,
    log: Callable[[str], None] = print,
    valid: Optional[PromptDataset] = None,
) -> Dict:
    """Train ``model`` (a ``ReLLaXModel``) on ``dataset``; checkpoints go to ``run_dir/checkpoints``.

    Under ``torchrun`` / ``accelerate launch`` with N processes each step takes the same global batch of
    ``config.batch_size * N`` samples as one process with ``batch_size * N`` would, split into contiguous
    per-rank slices; each rank's loss is its slice's summed loss divided by the global batch size (times N,
    which DDP's gradient averaging divides out), so gradients, clipping, optimizer steps and the logged
    losses are those of the single-process run up to float summation order, also when the last batch does
    not divide evenly. Only rank 0 writes (checkpoints). The optimizer is built after ``accelerator.prepare``
    of the model (FSDP replaces the parameters by sharded ones). LoRA and backbone dropout masks depend on
    the local batch layout, so with dropout > 0 the runs agree in distribution, not value by value.

    ``valid``: a held-out set scored every ``config.eval_every_steps`` steps and at every epoch end (and
    before the first step when the model's ``select_from_start`` is True: the gated residual read-out
    starts as the frozen DIN, a candidate in its own right); with
    ``config.select_best`` the returned model carries the trainable tensors of the best valid AUC (kept in
    every checkpoint, so a resumed run selects as the uninterrupted one would).

    Returns {"losses": [per-step loss], "global_step": int, "resumed_from": step or None, "model": unwrapped,
    "valid": [{"step", "auc", "logloss"}, ...], "best": the selected valid row or None, "valid_probs": the
    returned model's p(click) on ``valid`` when scored in this process, else None}.

    The steps are :class:`_TrainingRun`'s: prepare (resume, wrap, optimizer), the epoch loop (one optimizer step
    each, then validation and selection, then checkpointing), and the result (the selected tensors put back).
    """
    if accelerator is None:
        accelerator = default_accelerator(config)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (check the recipe stage)")
    run = _TrainingRun(model, dataset, config, run_dir, accelerator, log, valid)
    run.prepare(resume)
    run.epoch_loop()
    return run.result()


def default_accelerator(config: TrainConfig):
    """The Accelerator of a training run given none: ``config``'s mixed precision, CPU without CUDA, DDP that
    tolerates parameters a batch leaves unused (e.g. the SPA projector without placeholders)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    precision = resolve_mixed_precision(config.mixed_precision)
    _allow_precision(precision)
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])


class _TrainingRun:
    """One :func:`train_model` call: the prepared model and optimizer, the step counters (``state``, what a
    checkpoint records), the valid history and the best candidate so far; its methods are the call's steps."""

    def __init__(self, model, dataset: PromptDataset, config: TrainConfig, run_dir, acc, log, valid) -> None:
        self.model, self.dataset, self.config, self.run_dir, self.acc, self.log = (
            model,
            dataset,
            config,
            run_dir,
            acc,
            log,
        )
        self.valid = valid
        self.world, self.rank = acc.num_processes, acc.process_index
        self.global_batch = config.batch_size * self.world
        self.steps_per_epoch = math.ceil(len(dataset) / self.global_batch)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup = int(self.total_steps * config.warmup_ratio)
        self.sharded = is_fully_sharded(
            model
        )  # torch's fully_shard applied by the caller (FSDP2 without accelerate)
        self.fsdp = self.sharded or str(getattr(acc, "distributed_type", "")).endswith("FSDP")
        self.state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "losses": []}
        self.resumed_from = None
        self.best = (
            None  # with a valid set: {"step", "auc", "logloss"} of the best valid AUC so far, and its tensors
        )
        self.last_valid = None  # (step, probs) of the latest valid scoring in this process

    def schedule(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup))

    def new_optimizer(self, m):
        config = self.config
        return torch.optim.AdamW(
            param_groups(m, config.lr, config.lr_groups, config.weight_decay),
            lr=config.lr,
            weight_decay=config.weight_decay,
        )

    def prepare(self, resume: bool) -> None:
        """The latest checkpoint read back (with ``resume``), the model and optimizer prepared, the scheduler."""
        from .checkpoint import latest_checkpoint, load_checkpoint

        acc = self.acc
        ckpt = latest_checkpoint(self.run_dir) if resume else None
        if ckpt is not None and self.fsdp:
            raise NotImplementedError(
                f"{ckpt}: resuming under FSDP is not supported yet (checkpoints hold full tensors "
                "and a full optimizer state); resume without FSDP, or train without --resume"
            )
        if ckpt is not None:  # the trainable tensors go into the plain model, before any wrapping
            load_checkpoint(ckpt, self.model, None, None, restore_rng=False)
        # already sharded: accelerate would wrap it again in DDP (it enables FSDP only on GPUs)
        if self.sharded:
            self.optimizer = acc.prepare(self.new_optimizer(self.model))
        elif self.fsdp and not getattr(acc, "is_fsdp2", False):
            # FSDP1 flattens the parameters: the optimizer must be built on the wrapped model
            self.model = acc.prepare(self.model)
            self.optimizer = acc.prepare(self.new_optimizer(self.model))
        else:  # one process, DDP, or FSDP2 (accelerate maps the optimizer onto the sharded parameters)
            self.model, self.optimizer = acc.prepare(self.model, self.new_optimizer(self.model))
        self.params = [
            p for p in self.model.parameters() if p.requires_grad
        ]  # after prepare: FSDP's sharded ones
        optimizer = self.optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, self.schedule
        )
        if ckpt is not None:
            self.resume_from(ckpt)
        self.selecting = self.valid is not None and len(self.valid) > 0
        if self.selecting and self.fsdp:
            self.log("valid-set model selection is not supported under FSDP: training without it")
            self.selecting = False
        self.valid_history: List[Dict] = list(self.state.get("valid", []))
        self.losses: List[float] = list(self.state["losses"])

    def resume_from(self, ckpt) -> None:
        from .checkpoint import load_checkpoint

        state = self.state = load_checkpoint(
            ckpt, self.acc.unwrap_model(self.model), self.optimizer, self.scheduler
        )
        self.resumed_from = state["global_step"]
        self.log(
            f"resumed from {ckpt} (epoch {state['epoch']}, step {state['step_in_epoch']}, global step {state['global_step']})"
        )
        if state.get("best") is not None:
            from .checkpoint import load_best_tensors

            self.best = dict(state["best"], tensors=load_best_tensors(ckpt))

    def evaluate_valid(self) -> None:
        """Score the valid set; keep the row in the history and, when it is the best AUC so far, the candidate."""
        from ..metrics import ctr_metrics

        config, acc, valid = self.config, self.acc, self.valid
        probs = predict_proba(
            self.model,
            valid,
            config.eval_batch_size,
            progress=False,
            accelerator=acc,
            mixed_precision=config.mixed_precision,
        )
        m = ctr_metrics(valid.labels(), probs)
        row = {"step": self.state["global_step"], "auc": m["auc"], "logloss": m["logloss"]}
        self.valid_history.append(row)
        self.last_valid = (row["step"], probs)
        best = self.best
        # a NaN AUC (a one-class valid set) never beats a number
        improved = best is None or (
            not math.isnan(row["auc"]) and (math.isnan(best["auc"]) or row["auc"] > best["auc"])
        )
        if improved and config.select_best:
            tensors = {
                k: v.detach().clone().cpu() for k, v in acc.unwrap_model(self.model).trainable_state().items()
            }
            best = self.best = dict(row, tensors=tensors, probs=probs)
        elif improved:
            best = self.best = dict(row, tensors=None)
        self.log(
            f"valid at step {row['step']}: AUC {row['auc']:.4f}  LogLoss {row['logloss']:.4f}"
            + ("  (best)" if improved else f"  (best {best['auc']:.4f} at step {best['step']})")
        )
        self.state["valid"] = self.valid_history  # what the next checkpoint records
        self.state["best"] = {k: best[k] for k in ("step", "auc", "logloss")}

    def epoch_loop(self) -> None:
        """Every remaining step of every epoch: the optimizer step, then validation and checkpointing."""
        from tqdm.auto import tqdm

        config, acc = self.config, self.acc
        if (
            self.selecting
            and self.state["global_step"] == 0
            and getattr(acc.unwrap_model(self.model), "select_from_start", False)
        ):
            # the untrained model is itself a candidate (the gated residual read-out starts as the frozen DIN):
            # score it before the first step, so the model kept is never worse on valid than where it started
            self.evaluate_valid()
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.state["global_step"],
            desc="train",
            disable=not (config.progress and acc.is_main_process),
        )
        try:
            for epoch in range(self.state["epoch"], config.epochs):
                order = epoch_order(self.dataset, config, epoch, self.global_batch)
                first = self.state["step_in_epoch"] if epoch == self.state["epoch"] else 0
                for step in range(first, self.steps_per_epoch):
                    self.optimizer_step(order, epoch, step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{np.mean(self.losses[-20:]):.4f}", epoch=epoch + 1)
                    self.after_step()
        finally:
            bar.close()

    def optimizer_step(self, order, epoch: int, step: int) -> None:
        """One step on the global batch ``step`` of the epoch's ``order``; ``state`` moves one step on."""
        config, acc, world, gb = self.config, self.acc, self.world, self.global_batch
        chunk = order[step * gb : (step + 1) * gb]
        mine = rank_slice(chunk, self.rank, world)
        weight = 1.0
        if len(mine) == 0:  # fewer samples than ranks: a zero-weight pass keeps the collectives in step
            mine, weight = chunk[:1], 0.0
        batch = _to(self.dataset.batch(mine), acc.device)
        with acc.autocast():
            logits = self.model(batch)
        loss_sum = answer_loss_sum(logits, batch["label"]) * weight
        # the global batch's loss, before anything is updated: every rank sees the same value, so a
        # non-finite one stops them all at this step and the last checkpoint keeps the state before it
        total = acc.reduce(loss_sum.detach(), reduction="sum") if world > 1 else loss_sum.detach()
        check_finite_loss(float(total) / len(chunk), self.state["global_step"] + 1, epoch + 1, config)
        acc.backward(loss_sum * (world / len(chunk)))
        if config.max_grad_norm:
            acc.clip_grad_norm_(self.params, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(total) / len(chunk))
        self.state = {
            "epoch": epoch,
            "step_in_epoch": step + 1,
            "global_step": self.state["global_step"] + 1,
            "losses": self.losses,
        }
        if step + 1 == self.steps_per_epoch:
            self.state.update(epoch=epoch + 1, step_in_epoch=0)

    def after_step(self) -> None:
        """Validation and selection, then a checkpoint, when due; the ``stop_after_steps`` testing hook."""
        config, state = self.config, self.state
        at_epoch_end = state["step_in_epoch"] == 0
        if self.selecting and (
            at_epoch_end or (config.eval_every_steps and state["global_step"] % config.eval_every_steps == 0)
        ):
            self.evaluate_valid()
        if at_epoch_end or (config.save_every_steps and state["global_step"] % config.save_every_steps == 0):
            self.checkpoint()
        if config.stop_after_steps is not None and state["global_step"] >= config.stop_after_steps:
            raise KeyboardInterrupt(f"stop_after_steps={config.stop_after_steps} reached (testing hook)")

    def checkpoint(self) -> None:
        """Every rank gathers (under FSDP), rank 0 writes: trainable tensors, optimizer, scheduler, ``state`` and
        the best candidate's tensors."""
        from .checkpoint import save_checkpoint

        acc, best = self.acc, self.best
        acc.wait_for_everyone()
        model_view, optimizer_view = checkpoint_views(acc.unwrap_model(self.model), self.optimizer, self.fsdp)
        if acc.is_main_process:
            save_checkpoint(
                self.run_dir,
                model_view,
                optimizer_view,
                self.scheduler,
                self.state,
                keep=self.config.keep_checkpoints,
                best_tensors=None if best is None else best.get("tensors"),
            )
        acc.wait_for_everyone()

    def result(self) -> Dict:
        """train_model's result; the best valid candidate's tensors put back into the model when selected."""
        unwrapped, best, state, last_valid = (
            self.acc.unwrap_model(self.model),
            self.best,
            self.state,
            self.last_valid,
        )
        selected = None
        if best is not None and best.get("tensors") is not None and best["step"] != state["global_step"]:
            params = dict(unwrapped.named_parameters())
            with torch.no_grad():
                for k, v in best["tensors"].items():
                    params[k].copy_(v.to(params[k].device, params[k].dtype))
            self.log(
                f"kept the trainable tensors of step {best['step']} (best valid AUC {best['auc']:.4f}), not of the last step"
            )
        if best is not None:
            selected = {k: best[k] for k in ("step", "auc", "logloss")}
        # the returned model's valid probabilities when this process scored them (callers need not score valid
        # again); None when they are unknown here (the selected step was scored before a resume)
        if selected is not None and self.config.select_best:
            valid_probs = best.get("probs")
        else:
            valid_probs = (
                last_valid[1] if last_valid is not None and last_valid[0] == state["global_step"] else None
            )
        return {
            "losses": self.losses,
            "global_step": state["global_step"],
            "resumed_from": self.resumed_from,
            "model": unwrapped,
            "valid": self.valid_history,
            "best": selected,
            "valid_probs": valid_probs,
        }


def check_finite_loss(loss: float, step: int, epoch: int, config: TrainConfig) -> None:
    """Stop training at the step whose loss is NaN or infinite (:class:`~rellax_fast.ctr.din.NonFiniteLossError`,
    naming the step and the learning rate) instead of training on and saving a diverged model."""
    if math.isfinite(loss):
        return
    from ..ctr.din import NonFiniteLossError

    groups = f" (per group: {config.lr_groups})" if config.lr_groups else ""
    raise NonFiniteLossError(
        f"training diverged: the loss is {loss} at step {step} (epoch {epoch}) with --lr {config.lr}{groups}; "
        "nothing of this step was applied (the last checkpoint holds the state before it): lower --lr, or "
        "check the data and the backbone"
    )


@torch.no_grad()
def predict_proba(
    model,
    dataset: PromptDataset,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "score",
    accelerator=None,
    mixed_precision: str = "no",
) -> np.ndarray:
    """p(click) for every sample of ``dataset``, in order (eval mode, no dropout).

    Under ``torchrun`` / ``accelerate launch`` (or with a multi-process ``accelerator``) every rank must call
    it: each scores its shard of the batches (accelerate's sharded DataLoader) and the probabilities are
    gathered with ``gather_for_metrics`` (which drops the samples repeated to even out the last batches),
    so every rank returns the single-process array. One process: a plain loop. ``mixed_precision``: a
    TrainConfig value (``resolve_mixed_precision``); bf16/fp16 score under autocast, as training did.
    """
    import contextlib

    from tqdm.auto import tqdm

    from .model import click_probability

    was_training = model.training
    model.eval()
    out = []
    acc = accelerator
    if acc is None:
        from rellax_fast.distributed import launched

        if launched():
            from accelerate import Accelerator

            # shares the launcher's process group and state with the trainer's (cpu=True: see distributed.state)
            acc = Accelerator(cpu=not torch.cuda.is_available())
    precision = resolve_mixed_precision(mixed_precision)

    def autocast():
        if precision == "no":
            return contextlib.nullcontext()
        device_type = next(model.parameters()).device.type
        return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)

    try:
        if acc is None or acc.num_processes == 1:
            device = next(model.parameters()).device
            for start in tqdm(range(0, len(dataset), batch_size), desc=desc, disable=not progress):
                batch = _to(dataset.batch(range(start, min(start + batch_size, len(dataset)))), device)
                with autocast():
                    logits = model(batch)
                out.append(click_probability(logits).cpu())
        else:
            from torch.utils.data import DataLoader

            if not is_fully_sharded(model) and next(model.parameters()).device != acc.device:
                model.to(
                    acc.device
                )  # each rank scores on its own device (cuda:LOCAL_RANK under a GPU launch)
            loader = DataLoader(
                range(len(dataset)), batch_size=batch_size, shuffle=False, collate_fn=dataset.batch
            )
            loader = acc.prepare_data_loader(loader)
            for batch in tqdm(loader, desc=desc, disable=not (progress and acc.is_main_process)):
                with autocast():
                    logits = model(batch)
                out.append(acc.gather_for_metrics(click_probability(logits).contiguous()).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)
