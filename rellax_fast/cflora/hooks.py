"""The ``cflora_cond`` keyword: per-sample conditioning passed to ``forward`` and ``generate``.

This module owns :func:`enable_cflora_cond_kwarg` / :func:`disable_cflora_cond_kwarg`. They let code that
only calls ``model(**batch)`` or ``model.generate(**inputs)`` - ``transformers.Trainer``, evaluation loops,
pipelines - carry the conditioning vectors (B, cond_dim) as one more keyword::

    enable_cflora_cond_kwarg(model)
    loss = model(**batch, cflora_cond=cond).loss
    out = model.generate(**prompt, cflora_cond=cond, max_new_tokens=8)

The base model's ``forward`` signature is untouched:

- a forward pre-hook on the top-level module (registered first, ``with_kwargs=True``) pops ``cflora_cond``
  and enters the block of :func:`rellax_fast.cflora.cflora_condition` for that call
  (``conditioning.begin_condition``); a forward hook registered with ``always_call=True`` leaves it again
  (``end_condition``), also when the forward raises. Both are plain function calls, with no context-manager
  object, so ``torch.compile(model, fullgraph=True)`` traces a ``model(**batch, cflora_cond=cond)`` call. Each call pushes one entry
  on a small per-module stack and the hook pops it, so the pairing holds for nested or failed calls;
  ``cflora_cond=None`` (or no keyword) changes nothing, so an enclosing ``cflora_condition`` block still
  works. A keyword inside such a block is the nesting error of ``cflora_condition``.
- ``generate()`` rejects keywords its forward does not name (``_validate_model_kwargs``), so the
  instance's ``generate`` is wrapped: it pops ``cflora_cond`` and runs the whole generation inside one
  ``cflora_condition`` block (beams / ``num_return_sequences`` repeat each sample's C, as in the block).
- Gradient checkpointing: the block's cond stays on the layers, inactive, for the recomputation inside
  ``backward()`` - the same rules as ``cflora_condition``.
- ``transformers.Trainer`` keeps only the dataset columns named in ``forward``'s signature unless
  ``TrainingArguments(remove_unused_columns=False)``; with that, a dataset yielding ``cflora_cond`` per
  example and ``default_data_collator`` (which stacks it to (B, cond_dim)) train with no custom
  ``compute_loss``.

All state (the stack, the ``generate`` wrapper) lives on the module instance, and the hook
functions are module-level (no closures), so ``copy.deepcopy`` of a model gives a copy whose hooks
condition the copy.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

from torch import nn

from .conditioning import begin_condition, cflora_condition, cflora_layers, end_condition, unwrap_model

COND_KWARG = "cflora_cond"
_STATE = "_cflora_cond_kwarg"  # attribute on the model: {"stack": [...], "generate": instance-level original}

__all__ = ["COND_KWARG", "enable_cflora_cond_kwarg", "disable_cflora_cond_kwarg", "cflora_cond_kwarg_enabled"]


def _pre_hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
    stack = module.__dict__[_STATE]["stack"]
    # push first: the always-called forward hook pops exactly one entry per call, even if entering fails
    stack.append(None)
    cond = kwargs.pop(COND_KWARG, None)
    if cond is not None:
        # plain functions, no context-manager object: torch.compile(fullgraph=True) traces this hook
        stack[-1] = begin_condition(module, cond)
    return args, kwargs


def _exit_block(module: nn.Module) -> None:
    state = module.__dict__.get(_STATE)
    if state is None or not state["stack"]:
        return
    slot = state["stack"].pop()
    if slot is not None:
        end_condition(slot)


def _post_hook(module: nn.Module, args: Tuple[Any, ...], output: Any):
    _exit_block(module)
    return None


def _generate_with_cond(module: nn.Module, original, *args, **kwargs):
    cond = kwargs.pop(COND_KWARG, None)
    if cond is None:
        return original(*args, **kwargs)
    with cflora_condition(module, cond):
        return original(*args, **kwargs)


def cflora_cond_kwarg_enabled(model: nn.Module) -> bool:
    """Whether :func:`enable_cflora_cond_kwarg` is in effect on ``model``."""
    return _STATE in unwrap_model(model).__dict__


def enable_cflora_cond_kwarg(model: nn.Module) -> nn.Module:
    """Accept ``cflora_cond=`` in ``model(...)`` and ``model.generate(...)`` (idempotent; returns ``model``).

    ``model`` is the top-level module the caller invokes (a DDP / DataParallel wrapper is unwrapped: the
    keyword travels through the wrapper to the module). It must hold CFLoRA layers.

    With ``transformers.Trainer``, set ``TrainingArguments(remove_unused_columns=False)``: the Trainer
    keeps only the columns named in ``forward``'s signature and would drop ``cflora_cond`` before the
    collator sees it (the model then raises its "needs per-sample conditioning" error).
    """
    root = unwrap_model(model)
    if not cflora_layers(root):
        raise ValueError(
            "enable_cflora_cond_kwarg: the model has no CFLoRA layers; call inject_cflora(model, config) "
            "first"
        )
    if _STATE in root.__dict__:
        return model
    # no handles kept: a deepcopy of a RemovableHandle still points at the original module's hook dicts
    root.register_forward_pre_hook(_pre_hook, with_kwargs=True, prepend=True)
    root.register_forward_hook(_post_hook, always_call=True)
    state = {"stack": [], "generate": None}
    original = root.__dict__.get("generate")  # an instance-level generate someone installed before us
    if callable(getattr(root, "generate", None)):
        # a partial, not a closure: deepcopy / pickle of the model carry it over bound to the copy
        root.generate = functools.partial(_generate_with_cond, root, root.generate)
        state["generate"] = original
    object.__setattr__(root, _STATE, state)
    return model


def disable_cflora_cond_kwarg(model: nn.Module) -> nn.Module:
    """Remove what :func:`enable_cflora_cond_kwarg` installed (no-op when it is not installed)."""
    root = unwrap_model(model)
    state = root.__dict__.get(_STATE)
    if state is None:
        return model
    registered = (
        (root._forward_pre_hooks, (root._forward_pre_hooks_with_kwargs,), _pre_hook),
        (
            root._forward_hooks,
            (root._forward_hooks_always_called, root._forward_hooks_with_kwargs),
            _post_hook,
        ),
    )
    for hooks, extra, fn in registered:
        for hook_id in [i for i, h in hooks.items() if h is fn]:
            del hooks[hook_id]
            for d in extra:
                d.pop(hook_id, None)
    if isinstance(root.__dict__.get("generate"), functools.partial):
        del root.generate
        if state["generate"] is not None:
            root.generate = state["generate"]
    del root.__dict__[_STATE]
    return model
