"""A training run for the kill-and-resume test, runnable as a subprocess:

    python resume_worker.py MODEL_DIR RUN_DIR [--slow SECONDS] [--resume]

Builds the same tiny dataset and ReLLaX model as tests/train/test_resume.py and trains it; ``--slow``
sleeps before each batch so that the parent can SIGKILL it mid-epoch after a checkpoint exists.
"""

import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])

from test_resume import _config, _dataset, _model  # noqa: E402

from rellax_fast.train.trainer import PromptDataset, predict_proba, train_model  # noqa: E402


def main(argv):
    model_dir, run_dir = argv[0], argv[1]
    slow = float(argv[argv.index("--slow") + 1]) if "--slow" in argv else 0.0
    torch.set_num_threads(1)
    data, collator = _dataset(model_dir)
    if slow:
        original = PromptDataset.batch

        def slow_batch(self, indices):
            time.sleep(slow)
            return original(self, indices)

        PromptDataset.batch = slow_batch
    res = train_model(
        _model(model_dir, collator, 0),
        data,
        _config(save_every_steps=1),
        run_dir,
        resume="--resume" in argv,
        log=lambda *_: None,
    )
    PromptDataset.batch = original if slow else PromptDataset.batch
    probs = predict_proba(res["model"], data, progress=False)
    torch.save(
        {
            "losses": res["losses"],
            "probs": probs,
            "resumed_from": res["resumed_from"],
            "state": {k: v.detach().clone() for k, v in res["model"].trainable_state().items()},
        },
        f"{run_dir}/result.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
