"""Multi-task learning against single-task models of the same size, on two real problems (issue 5).

1. ``energy``: heating and cooling load of 768 buildings from 8 numeric features
   (``../shared/data/tabular/energy_efficiency/ENB2012_data.csv``), an MLP trunk; seeded 5-fold
   cross-validation, RMSE (and MAE, R²) per task on each held-out fold, mean ± std over folds.
2. ``sentences``: sentiment (binary) and source site (amazon / imdb / yelp) of the 3,000 UCI sentences
   (``../shared/data/text/uci_sentences/``, all three files), the pretrained MiniLM trunk fine-tuned;
   one seeded split, 80/20 stratified by site × sentiment; accuracy (and macro-F1) per task on the 20 %.

Methods: every loss weighting of :mod:`tlmodules.weighting` (``static`` with weights 1 is ``equal``, so it
is left out) on one shared trunk, and ``single_task``: one model per task with the same trunk and head,
through the very same ``MultiTaskModule`` pipeline (a task list of one). Its seconds and parameters are the
sum of its two models: the price of two trunks.

    python bench/multitask.py                      # both problems (about 20 minutes on 2 cores)
    python bench/multitask.py --problems energy --folds 2

Writes ``bench/results/multitask.json``: ``results[problem][method][task] = {metric: mean}`` (and
``{metric}_std`` over folds for energy), ``seconds[problem][method]`` (training wall time, summed over
folds) and ``parameters[problem][method]``; and ``bench/results/multitask.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from sklearn.model_selection import KFold, train_test_split  # noqa: E402

from bench.common import MINILM, RESULTS, SHARED, read_tsv  # noqa: E402
from datamodules import MultiTaskDataModule  # noqa: E402
from tlmodules import MultiTaskModule  # noqa: E402

ENERGY = SHARED / "tabular" / "energy_efficiency" / "ENB2012_data.csv"
SENTENCES = SHARED / "text" / "uci_sentences"
SITES = {"amazon": "amazon_cells_labelled.txt", "imdb": "imdb_labelled.txt", "yelp": "yelp_labelled.txt"}
WEIGHTINGS = ("equal", "uncertainty", "dwa", "rlw")
METHODS = (*WEIGHTINGS, "single_task")

ENERGY_TASKS = [
    {"name": "heating", "kind": "regression", "column": "heatload"},
    {"name": "cooling", "kind": "regression", "column": "coolload"},
]
SENTENCE_TASKS = [
    {"name": "sentiment", "kind": "binary", "column": "sentiment"},
    {"name": "site", "kind": "multiclass", "column": "site"},
]
# hyperparameters per problem, the same for every method
ENERGY_SETTINGS = {
    "model": {"trunk_hidden": 64, "trunk_depth": 2, "lr": 3e-3, "weight_decay": 1e-4, "lr_schedule": "cosine"},
    "batch_size": 64,
    "epochs": 200,
}
SENTENCE_SETTINGS = {
    "model": {
        "backbone": MINILM,
        "lr": 1e-3,
        "backbone_lr_ratio": 0.05,
        "weight_decay": 0.01,
        "lr_schedule": "linear",
        "warmup_fraction": 0.1,
    },
    "batch_size": 16,
    "epochs": 1,
    "max_length": 64,
}


# -- data: seeded splits written to a scratch folder (never into the repository) -------------------------------
def energy_folds(folder: Path, folds: int, seed: int) -> list[tuple[Path, Path]]:
    """``folds`` (train.csv, test.csv) pairs of a seeded shuffled K-fold split of the energy table."""
    with ENERGY.open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    pairs = []
    for k, (train_idx, test_idx) in enumerate(KFold(folds, shuffle=True, random_state=seed).split(rows)):
        paths = []
        for name, indices in (("train", train_idx), ("test", test_idx)):
            path = folder / f"energy_fold{k}_{name}.csv"
            with path.open("w", newline="") as handle:
                csv.writer(handle).writerows([header, *(rows[i] for i in indices)])
            paths.append(path)
        pairs.append((paths[0], paths[1]))
    return pairs


def sentence_split(folder: Path, seed: int) -> tuple[Path, Path]:
    """All 3,000 sentences with their sentiment and site, split 80/20 stratified by site × sentiment (JSONL)."""
    records = [
        {"text": text, "sentiment": int(label), "site": site}
        for site, file in SITES.items()
        for text, label in read_tsv(SENTENCES / file, 0, 1)
    ]
    strata = [f"{r['site']}-{r['sentiment']}" for r in records]
    train, test = train_test_split(records, test_size=0.2, random_state=seed, stratify=strata)
    paths = []
    for name, part in (("train", train), ("test", test)):
        path = folder / f"sentences_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        paths.append(path)
    return paths[0], paths[1]


# -- one training run -------------------------------------------------------------------------------------------
def train_and_test(
    train_file: Path, test_file: Path, tasks: list[dict], weighting: str, settings: dict, input_kind: str, seed: int
) -> dict:
    """Train one MultiTaskModule on ``tasks`` and test it: ``{"metrics", "seconds", "parameters"}``."""
    pl.seed_everything(seed, workers=True)
    text = input_kind == "text"
    data = MultiTaskDataModule(
        train_file=str(train_file),
        test_file=str(test_file),
        tasks=tasks,
        input_kind=input_kind,
        text_column="text" if text else None,
        backbone=settings["model"].get("backbone"),
        max_length=settings.get("max_length", 128),
        val_fraction=0.0,
        seed=seed,
        batch_size=settings["batch_size"],
        num_workers=0,
    )
    model = MultiTaskModule(weighting=weighting, **settings["model"])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=settings["epochs"],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    tested = {k: float(v) for d in trainer.test(model, datamodule=data, verbose=False) for k, v in d.items()}
    metrics: dict[str, dict[str, float]] = {}
    for key, value in tested.items():  # test/<task>/<metric>
        parts = key.split("/")
        if len(parts) == 3 and parts[1] in model.task_names:
            metrics.setdefault(parts[1], {})[parts[2]] = value
    return {"metrics": metrics, "seconds": seconds, "parameters": sum(p.numel() for p in model.parameters())}


def run_method(method: str, train_file: Path, test_file: Path, tasks: list[dict], **common) -> dict:
    """A weighting on one shared trunk, or (``single_task``) one model per task, metrics merged."""
    if method != "single_task":
        return train_and_test(train_file, test_file, tasks, method, **common)
    runs = [train_and_test(train_file, test_file, [task], "equal", **common) for task in tasks]
    return {
        "metrics": {name: m for run in runs for name, m in run["metrics"].items()},
        "seconds": sum(run["seconds"] for run in runs),
        "parameters": sum(run["parameters"] for run in runs),
    }


# -- the two problems -------------------------------------------------------------------------------------------
def energy(methods: list[str], folds: int, seed: int, folder: Path, log, settings: dict = ENERGY_SETTINGS) -> dict:
    splits = energy_folds(folder, folds, seed)
    out: dict = {}
    for method in methods:
        runs = []
        for k, (train_file, test_file) in enumerate(splits):
            run = run_method(
                method, train_file, test_file, ENERGY_TASKS, settings=settings, input_kind="numeric", seed=seed
            )
            rmse = {t: round(m["rmse"], 3) for t, m in run["metrics"].items()}
            log(f"energy {method} fold {k}: RMSE {rmse} in {run['seconds']:.0f} s")
            runs.append(run)
        metrics: dict = {}
        for task in (t["name"] for t in ENERGY_TASKS):
            for metric in runs[0]["metrics"][task]:
                values = [r["metrics"][task][metric] for r in runs]
                metrics.setdefault(task, {})[metric] = statistics.fmean(values)
                metrics[task][f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[method] = {
            "metrics": metrics,
            "seconds": sum(r["seconds"] for r in runs),
            "parameters": runs[0]["parameters"],
        }
    return out


def sentences(methods: list[str], seed: int, folder: Path, log) -> dict:
    train_file, test_file = sentence_split(folder, seed)
    out: dict = {}
    for method in methods:
        run = run_method(
            method, train_file, test_file, SENTENCE_TASKS, settings=SENTENCE_SETTINGS, input_kind="text", seed=seed
        )
        accuracy = {t: round(m["acc"], 4) for t, m in run["metrics"].items()}
        log(f"sentences {method}: accuracy {accuracy} in {run['seconds']:.0f} s")
        out[method] = run
    return out


# -- report -----------------------------------------------------------------------------------------------------
def markdown(results: dict, seconds: dict, parameters: dict, threads: int, folds: int) -> str:
    lines = [f"torch threads = {threads}. Training seconds: all folds together (energy).", ""]
    for problem in (p for p in results if p.startswith("energy")):
        lines += [
            f"**{problem}** ({folds}-fold CV, RMSE mean ± std over folds; lower is better)",
            "",
            "| method | heating RMSE | cooling RMSE | heating R² | cooling R² | parameters | train s |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, m in results[problem].items():
            h, c = m["heating"], m["cooling"]
            lines.append(
                f"| {method} | {h['rmse']:.3f} ± {h['rmse_std']:.3f} | {c['rmse']:.3f} ± {c['rmse_std']:.3f} | "
                f"{h['r2']:.4f} | {c['r2']:.4f} | {parameters[problem][method]:,} | {seconds[problem][method]:.0f} |"
            )
        lines.append("")
    if "sentences" in results:
        lines += [
            "**sentences** (80/20 stratified split, test accuracy / macro-F1; higher is better)",
            "",
            "| method | sentiment acc | sentiment F1 | site acc | site macro-F1 | parameters | train s |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, m in results["sentences"].items():
            s, t = m["sentiment"], m["site"]
            lines.append(
                f"| {method} | {s['acc']:.4f} | {s['f1_macro']:.4f} | {t['acc']:.4f} | {t['f1_macro']:.4f} | "
                f"{parameters['sentences'][method]:,} | {seconds['sentences'][method]:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", default=["energy", "sentences"], choices=["energy", "sentences"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (set deliberately)")
    parser.add_argument(
        "--energy-head-hidden",
        type=int,
        default=0,
        help="hidden units of every energy head (0: linear heads); results go under 'energy_head<N>'",
    )
    parser.add_argument("--output", default=str(RESULTS / "multitask.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for path in (ENERGY, SENTENCES):
        if not path.exists():
            parser.error(f"{path} is missing: the benchmark reads the shared data folder")
    output = Path(args.output)
    previous = json.loads(output.read_text()) if output.exists() else {}
    results, seconds, parameters = (dict(previous.get(k, {})) for k in ("results", "seconds", "parameters"))
    with tempfile.TemporaryDirectory() as tmp:
        for problem in args.problems:
            if problem == "energy":
                settings = ENERGY_SETTINGS
                if args.energy_head_hidden > 0:  # task-specific capacity on top of the shared trunk
                    model = {**ENERGY_SETTINGS["model"], "head": "mlp", "head_hidden": args.energy_head_hidden}
                    settings = {**ENERGY_SETTINGS, "model": model}
                    problem = f"energy_head{args.energy_head_hidden}"
                runs = energy(args.methods, args.folds, args.seed, Path(tmp), print, settings)
            else:
                runs = sentences(args.methods, args.seed, Path(tmp), print)
            # methods run now replace their earlier figures; the others of an earlier invocation stay
            results[problem] = {**results.get(problem, {}), **{m: r["metrics"] for m, r in runs.items()}}
            seconds[problem] = {**seconds.get(problem, {}), **{m: round(r["seconds"], 1) for m, r in runs.items()}}
            parameters[problem] = {**parameters.get(problem, {}), **{m: r["parameters"] for m, r in runs.items()}}
    meta = {
        "threads": args.threads,
        "folds": args.folds,
        "seed": args.seed,
        "energy_settings": ENERGY_SETTINGS,
        "sentence_settings": SENTENCE_SETTINGS,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": results, "seconds": seconds, "parameters": parameters}
    output.write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(results, seconds, parameters, args.threads, args.folds)
    output.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
