"""Choose the DANN/CDAN recipe for ``bench/dann_digits.py`` without target labels.

Runs a small grid of recipe variants on both digit pairs and picks, per method, the variant with
the highest mean *label-free* target score (information maximisation: class diversity minus mean
prediction entropy on the unlabelled target evaluation images, ``test/target/im_score``). Target
accuracy is recorded for the report but plays no part in the choice.

    python bench/dann_sweep.py --jobs 16 --accelerator gpu --seeds 0 1

Writes ``bench/results/dann_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dann_digits import DIGITS, PAIRS, RESULTS  # noqa: E402

AUGMENT = {"degrees": 10.0, "translate": 0.1, "scale": [0.9, 1.1]}
NO_DROPOUT = {"lenet_dropout": 0.0}  # the LeNet of the first sweep, before builtin:lenet dropped channels
CHOSEN = {"bottleneck": 256, "augment": AUGMENT}  # the recipe after the second round
VARIANTS: dict[str, tuple[dict, int]] = {  # name: (DANNModule arguments and recipe keys, steps)
    "plain": (NO_DROPOUT, 5000),
    "bottleneck256": ({"bottleneck": 256, **NO_DROPOUT}, 5000),
    "disc500": ({"discriminator_hidden": 500, **NO_DROPOUT}, 5000),
    "separate_batches": ({"joint_batch": False, **NO_DROPOUT}, 5000),
    "steps10k": (NO_DROPOUT, 10000),
    "bottleneck256_steps10k": ({"bottleneck": 256, **NO_DROPOUT}, 10000),
    # second round (CPU, DANN on one seed): channel dropout 0.5 in LeNet, augmentation, both
    "bottleneck256_dropout": ({"bottleneck": 256}, 5000),
    "bottleneck256_augment": ({"bottleneck": 256, "augment": AUGMENT, **NO_DROPOUT}, 5000),
    "bottleneck256_dropout_augment": ({"bottleneck": 256, "augment": AUGMENT}, 5000),
    # third round (CPU, DANN, seed 0): the discriminator of that recipe (2 × 1024 above) made cheaper
    "disc_1x100": ({**CHOSEN, "discriminator_hidden": 100, "discriminator_layers": 1}, 5000),
    "disc_1x1024": ({**CHOSEN, "discriminator_layers": 1}, 5000),
    "disc_2x256": ({**CHOSEN, "discriminator_hidden": 256}, 5000),
}
# every variant not naming its own discriminator has DANNModule's default, 2 × 1024 (as when it was run)
DEFAULT_DISCRIMINATOR = {"discriminator_hidden": 1024, "discriminator_layers": 2}
BASELINE_VARIANTS = ("plain", "bottleneck256")  # source-only and oracle: the adversary-free knobs only

_domains = None


def _init(root: str, threads: int) -> None:
    global _domains
    import torch

    from bench.dann_digits import Domains

    torch.set_num_threads(threads)
    _domains = Domains(Path(root))


def _run(job: tuple) -> dict:
    from bench.dann_digits import run_once

    pair, method, variant, seed, accelerator, scale = job
    arguments, steps = VARIANTS[variant]
    steps = max(1, round(steps * scale))
    recipe = {"batch_size": 64, **DEFAULT_DISCRIMINATOR, **arguments}
    result = run_once(_domains, pair, method, seed, steps, recipe, accelerator)
    print(
        f"{pair} {method} {variant} seed {seed}: acc {result['target_acc']:.2f} im {result['im_score']:.4f} "
        f"{result['seconds']:.0f} s",
        flush=True,
    )
    return {"pair": pair, "method": method, "variant": variant, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", default=str(DIGITS))
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every variant's steps (smoke tests)")
    parser.add_argument("--output", default=str(RESULTS / "dann_sweep.json"))
    args = parser.parse_args()
    jobs = []
    for variant in sorted(VARIANTS, key=lambda v: -VARIANTS[v][1]):  # long runs first
        methods = ["dann", "cdan"] + (["source_only", "oracle"] if variant in BASELINE_VARIANTS else [])
        jobs += [
            (p, m, variant, s, args.accelerator, args.steps_scale) for p in PAIRS for m in methods for s in args.seeds
        ]
    start = time.perf_counter()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    with (
        get_context("spawn").Pool(args.jobs, _init, (args.digits, args.threads)) as pool,
        output.with_suffix(".jsonl").open("w") as partial,
    ):  # every finished run at once, should time run out
        for run in pool.imap_unordered(_run, jobs, chunksize=1):
            runs.append(run)
            partial.write(json.dumps(run) + "\n")
            partial.flush()
    chosen = {}
    for method in ("dann", "cdan"):
        scores = {
            v: statistics.fmean(r["im_score"] for r in runs if r["method"] == method and r["variant"] == v)
            for v in VARIANTS
        }
        chosen[method] = {"variant": max(scores, key=scores.get), "mean_im_score": scores}
    output.write_text(
        json.dumps(
            {
                "selection": "per method, the variant with the highest mean test/target/im_score (no target labels)",
                "chosen": chosen,
                "variants": VARIANTS,
                "accelerator": args.accelerator,
                "seeds": args.seeds,
                "wall_seconds": time.perf_counter() - start,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(json.dumps(chosen, indent=2))


if __name__ == "__main__":
    main()
