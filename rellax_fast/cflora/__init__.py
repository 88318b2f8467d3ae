"""CFLoRA config, layers, interaction generators, inject/merge/save/load and HF hooks.

Typical use (any Hugging Face model)::

    from rellax_fast import CFLoRAConfig, inject_cflora, cflora_condition
    inject_cflora(model, CFLoRAConfig(r=8, alpha=16, interaction="full", cond_dim=64,
                                      target_modules=["q_proj", "v_proj"]))
    print_trainable_parameters(model)
    with cflora_condition(model, cond):          # cond: (batch, 64)
        loss = model(**batch).loss
    loss.backward()
    save_cflora(model, "adapter")                # load_cflora(fresh_model, "adapter") restores it
    with disable_adapter(model):                 # the base model, exactly
        base_logits = model(**batch).logits
"""

from .adapters import (
    active_cflora_adapter,
    add_cflora_adapter,
    cflora_adapter_names,
    delete_cflora_adapter,
    set_cflora_adapter,
)
from .conditioning import (
    cflora_checkpoint_context_fn,
    cflora_condition,
    cflora_layers,
    clear_cflora_condition,
)
from .config import CFLoRAConfig
from .hooks import disable_cflora_cond_kwarg, enable_cflora_cond_kwarg
from .interaction import (
    INTERACTION_KINDS,
    INTERACTIONS,
    FullInteraction,
    IdentityInteraction,
    InteractionGenerator,
    MoEInteraction,
    RecRank1Interaction,
    StaticInteraction,
    build_interaction,
    register_interaction,
)
from .layers import CFLoRALinear
from .model import (
    cflora_enabled,
    cflora_trainable_parameters,
    disable_adapter,
    get_cflora_config,
    inject_cflora,
    merge_and_unload,
    merge_cflora,
    print_trainable_parameters,
    set_cflora_backend,
    set_cflora_enabled,
    unload,
    unmerge_cflora,
)
from .patch import apply_cflora, cflora_patched_modules, revert_cflora
from .persistence import (
    AdapterFileError,
    cflora_state_dict,
    export_peft_lora,
    load_cflora,
    load_peft_lora,
    save_cflora,
)

__all__ = [
    "INTERACTIONS",
    "INTERACTION_KINDS",
    "register_interaction",
    "IdentityInteraction",
    "CFLoRAConfig",
    "CFLoRALinear",
    "InteractionGenerator",
    "StaticInteraction",
    "FullInteraction",
    "MoEInteraction",
    "RecRank1Interaction",
    "build_interaction",
    "inject_cflora",
    "cflora_condition",
    "cflora_checkpoint_context_fn",
    "clear_cflora_condition",
    "cflora_layers",
    "cflora_trainable_parameters",
    "get_cflora_config",
    "set_cflora_backend",
    "merge_cflora",
    "unmerge_cflora",
    "merge_and_unload",
    "unload",
    "disable_adapter",
    "add_cflora_adapter",
    "set_cflora_adapter",
    "delete_cflora_adapter",
    "cflora_adapter_names",
    "active_cflora_adapter",
    "cflora_enabled",
    "set_cflora_enabled",
    "print_trainable_parameters",
    "AdapterFileError",
    "save_cflora",
    "load_cflora",
    "cflora_state_dict",
    "load_peft_lora",
    "export_peft_lora",
    "enable_cflora_cond_kwarg",
    "disable_cflora_cond_kwarg",
    "apply_cflora",
    "revert_cflora",
    "cflora_patched_modules",
]
