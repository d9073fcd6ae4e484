"""Probes behind docs/results.md's comment-task analysis: how much personal signal is there beyond like counts?

    OMP_NUM_THREADS=1 .venv/bin/python probes/comment_signal.py ceiling [--comment-open-rate 0.27]
    OMP_NUM_THREADS=1 .venv/bin/python probes/comment_signal.py model-free [--vectors DIR]
    OMP_NUM_THREADS=1 .venv/bin/python probes/comment_signal.py reader-vectors --out DIR [--pca 16]
    OMP_NUM_THREADS=1 .venv/bin/python probes/comment_signal.py train [--comment-open-rate 0.27]
        [--seeds 2024] [--vectors DIR] [--set finetune.lr=0.0003 --set model.temperature=0.2 ...]

Data: the demo preset (`--comment-open-rate` changes how often users open comment sections, i.e. how many
comment records they get), prepared once under --work, with all-MiniLM-L6-v2 text vectors.
- `ceiling`: what the data allows, from the generator's hidden truths (`synth.generate(latents=...)`):
  the generator's own noise-free choice score (oracle: the true style preference), and a "style reader"
  that knows each comment's style and estimates the user's preference from the styles of their past
  comments (Dirichlet(0.4) posterior mean, the generator's prior). Beating likes needs this signal.
  Also: how well a linear probe reads a comment's style from its text vector.
- `model-free`: ranks each test/valid sample's frozen comment candidates by
  `z(log(1 + likes)) + b·cos(candidate, mean of the user's past comments)` for b ∈ {1, 2, 3} (and the
  cosine alone), scored with the project's metrics (pessimistic ties), with the paired standard error of
  the gain over likes. No training: does the text carry taste beyond likes? Readers: the raw vectors; the
  vectors centered on their video's comment section (the shared part cannot rank one video's comments);
  those on their top 8/16/32 principal components.
- `train`: popularity by likes and by training interactions, then LSVCR `id+text` on the comment task
  (at most 20 epochs, patience 5, best valid epoch tested) with the `--set` overrides, per seed; also the
  personalization check (the test split with every sample given another sample's history), and the
  per-epoch valid NDCG@5 and training CE.
- `reader-vectors --out DIR [--pca 16]`: writes the model-free reader's features (section-centered, top-k
  PCs) as a VECTORS directory, so `train --vectors DIR` can test whether the model learns from them.
Prints one line per result; only `reader-vectors` writes anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lsvcr.baselines import build_model, fit_popularity  # noqa: E402
from lsvcr.sample_arrays import load_comment_pools, load_sample_arrays  # noqa: E402
from lsvcr.config import load_config  # noqa: E402
from lsvcr.data.prepared import is_prepared, read_comments, read_users, read_videos  # noqa: E402
from lsvcr.evaluate import evaluate_model, load_text_tables  # noqa: E402
from lsvcr.finetune import make_loop_config  # noqa: E402
from lsvcr.finetune_worker import train_loop_per_worker  # noqa: E402
from lsvcr.metrics import metric_sums  # noqa: E402
from lsvcr.model import like_prior  # noqa: E402
from lsvcr.vectors import is_vectors_dir  # noqa: E402

HERE = Path(__file__).resolve().parent


def demo_variant(work: Path, comment_open_rate: float | None) -> tuple[Path, Path]:
    """(PREPARED, VECTORS) of the demo preset, optionally with another comment_open_rate; built once."""
    from lsvcr.data.prepare import prepare
    from lsvcr.data.synth import PRESETS
    from lsvcr.data.synth_files import write_synthetic
    from lsvcr.vectors import write_minilm_vectors

    params = PRESETS["demo"] if comment_open_rate is None else dataclasses.replace(
        PRESETS["demo"], comment_open_rate=comment_open_rate)
    root = work / f"open_rate_{params.comment_open_rate}"
    prepared, vectors = root / "prepared", root / "vectors"
    if not is_prepared(prepared):
        write_synthetic(root / "raw", params, "parquet")
        prepare(root / "raw", prepared)
    if not is_vectors_dir(vectors):
        write_minilm_vectors(prepared, vectors)
    return prepared, vectors


def style_probe_accuracy(comment_vectors: np.ndarray, style: np.ndarray, seed: int = 0) -> float:
    """Held-out accuracy (80/20 split) of a linear softmax probe from standardized text vectors to comment style."""
    features = torch.from_numpy(comment_vectors).float()
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    labels = torch.from_numpy(style)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, held_out = order[: len(order) * 4 // 5], order[len(order) * 4 // 5:]
    probe = torch.nn.Linear(features.shape[1], int(style.max()) + 1)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200)

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(probe(features[train]), labels[train]) + 1e-3 * probe.weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return float((probe(features[held_out]).argmax(1) == labels[held_out]).float().mean())


def ceiling(prepared: Path, vectors: Path, comment_open_rate: float | None) -> None:
    from lsvcr.data.synth import PRESETS, generate
    from lsvcr.vectors import load_item_vectors

    params = PRESETS["demo"] if comment_open_rate is None else dataclasses.replace(
        PRESETS["demo"], comment_open_rate=comment_open_rate)
    latents: dict = {}
    generate(params, latents)
    comments = read_comments(prepared, ["comment_idx", "comment_id"])
    users = read_users(prepared).select(["user_idx", "user_id"])
    style_of_id = dict(zip(latents["comment_id"].tolist(), latents["comment_style"].tolist()))
    style = np.full(len(comments) + 1, -1)
    style[comments["comment_idx"].to_numpy()] = [style_of_id[c] for c in comments["comment_id"].to_pylist()]
    preference_of_id = dict(zip(latents["user_id"].tolist(), latents["style_preference"]))
    num_styles = latents["style_preference"].shape[1]
    preference = np.zeros((len(users) + 1, num_styles))
    preference[users["user_idx"].to_numpy()] = [preference_of_id[u] for u in users["user_id"].to_pylist()]
    _, comment_text = load_item_vectors(vectors, prepared)
    accuracy = style_probe_accuracy(comment_text[1:], style[1:])
    print(f"comment style from the text vectors in {vectors}: linear probe held-out accuracy {accuracy:.3f}")
    style_weight, likes_weight = latents["comment_choice_weights"]
    log_likes = np.log1p(load_comment_pools(prepared).comment_likes.astype(np.float64))
    for split in ("valid", "test"):
        arrays = load_sample_arrays(prepared, "comment", split, history_length=50)
        candidate_style = np.maximum(style[arrays.candidates], 0)
        past = arrays.comment_history_comments.reshape(len(arrays), -1)
        counts = np.stack([((style[past] == s) & (past != 0)).sum(axis=1) for s in range(num_styles)], axis=1)
        posterior = (counts + 0.4) / (counts.sum(axis=1, keepdims=True) + 0.4 * num_styles)
        rankers = {
            "likes only": log_likes[arrays.candidates],
            "style reader (past comments' styles) + likes": likes_weight * log_likes[arrays.candidates]
            + style_weight * np.take_along_axis(posterior, candidate_style, axis=1),
            "oracle (true style preference) + likes": likes_weight * log_likes[arrays.candidates]
            + style_weight * np.take_along_axis(preference[arrays.user], candidate_style, axis=1),
        }
        for name, scores in rankers.items():
            scores = np.where(arrays.candidates == 0, -np.inf, scores)
            sums = metric_sums(torch.from_numpy(scores), torch.from_numpy(arrays.labels), ("ndcg@5",))
            print(f"{split} {name}: ndcg@5 {sums['ndcg@5'] / sums['count']:.4f}", flush=True)


def section_centered(comment_text: np.ndarray, comment_pool: np.ndarray) -> np.ndarray:
    """Each comment vector minus the mean vector of its video's comment section (row 0 stays 0): the
    part every candidate of one video shares (mostly the video's topic) cannot rank them."""
    centered = comment_text.astype(np.float64)
    for pool in comment_pool[1:]:
        section = pool[pool != 0]
        if len(section):
            centered[section] -= comment_text[section].mean(axis=0)
    centered[0] = 0.0
    return centered


def top_components(vectors: np.ndarray, k: int) -> np.ndarray:
    """Rows projected on the top-k principal axes of rows 1: (row 0, the pad, stays 0)."""
    _, axes = np.linalg.eigh(np.cov(vectors[1:].T))
    projected = vectors @ axes[:, ::-1][:, :k]
    projected[0] = 0.0
    return projected


def per_sample_ndcg5(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    scores_t, labels_t = torch.from_numpy(scores), torch.from_numpy(labels)
    return np.array([metric_sums(scores_t[i:i + 1], labels_t[i:i + 1], ("ndcg@5",))["ndcg@5"]
                     for i in range(len(labels))])


def model_free(prepared: Path, vectors: Path) -> None:
    """Rank by `z(log(1 + likes)) + b·cos(candidate, sum of the user's past comments)` (b = 0: popularity by
    likes) with the raw text vectors and with unsupervised readers of them: comment-section centering, then
    the top-k principal components. Test rows also give the paired standard error of the gain over likes."""
    from lsvcr.vectors import load_item_vectors

    _, comment_text = load_item_vectors(vectors, prepared)
    tables = load_comment_pools(prepared)
    prior = like_prior(torch.from_numpy(tables.comment_likes)).numpy()
    centered = section_centered(comment_text, tables.comment_pool)
    readers = {"raw vectors": comment_text, "section-centered": centered,
               **{f"section-centered, top {k} PCs": top_components(centered, k) for k in (8, 16, 32)}}
    splits = {split: load_sample_arrays(prepared, "comment", split, history_length=50) for split in ("valid", "test")}
    likes_of = {split: per_sample_ndcg5(np.where(arrays.candidates == 0, -np.inf, prior[arrays.candidates]), arrays.labels)
                for split, arrays in splits.items()}
    for name, table in readers.items():
        table = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-9)
        for split, arrays in splits.items():
            past = arrays.comment_history_comments.reshape(len(arrays), -1)
            profile = (table[past] * (past != 0)[..., None]).sum(axis=1)
            profile /= np.maximum(np.linalg.norm(profile, axis=1, keepdims=True), 1e-9)
            similarity = np.einsum("nmd,nd->nm", table[arrays.candidates], profile)
            likes = likes_of[split]
            text_alone = per_sample_ndcg5(np.where(arrays.candidates == 0, -np.inf, similarity), arrays.labels)
            results = [f"text alone {text_alone.mean():.4f}"]
            for b in (1.0, 2.0, 3.0):
                scores = np.where(arrays.candidates == 0, -np.inf, prior[arrays.candidates] + b * similarity)
                gain = per_sample_ndcg5(scores, arrays.labels) - likes
                results.append(f"b={b:.0f} {likes.mean() + gain.mean():.4f} (gain {gain.mean():+.4f} ± "
                               f"{gain.std(ddof=1) / np.sqrt(len(gain)):.4f})")
            print(f"{split} {name}: likes only {likes.mean():.4f}; " + "; ".join(results), flush=True)


def write_reader_vectors(prepared: Path, vectors: Path, out: Path, k: int) -> None:
    """A VECTORS directory of the section-centered comment vectors on their top-k PCs (videos: centered, on
    their own top-k PCs; k = 0: centered comments, every vector at full width): the model-free reader's
    features, for `train --vectors OUT`."""

    from lsvcr.vectors import load_item_vectors, write_item_vectors

    video_text, comment_text = load_item_vectors(vectors, prepared)
    comments = section_centered(comment_text, load_comment_pools(prepared).comment_pool)
    videos = video_text
    if k > 0:
        comments, videos = top_components(comments, k), top_components(video_text - video_text[1:].mean(axis=0), k)
    video_ids = read_videos(prepared, ["video_id"])["video_id"].to_numpy()
    comment_ids = read_comments(prepared, ["comment_id"])["comment_id"].to_numpy()
    write_item_vectors(out, video_ids, videos[1:], comment_ids, comments[1:],
                       {"model": f"section-centered, top {k} PCs, of {vectors}" if k else f"section-centered {vectors}"})
    print(f"wrote {out}", flush=True)


def train(prepared: Path, vectors: Path, seeds: list[int], overrides: list[str]) -> None:
    base = load_config(None, ["finetune.task=comment"])
    for signal in ("likes", "train_interactions"):
        metrics = evaluate_model(fit_popularity(prepared, signal), "comment", prepared, base, progress=False)
        print(f"popularity by {signal}: valid ndcg@5 {metrics['valid']['ndcg@5']:.4f} "
              f"test {metrics['test']['ndcg@5']:.4f}", flush=True)
    tables = load_comment_pools(prepared)
    for seed in seeds:
        config = load_config(None, ["finetune.task=comment", "finetune.max_epochs=20", "finetune.patience=5",
                                    f"finetune.seed={seed}", *overrides])
        torch.manual_seed(seed)
        state = train_loop_per_worker(make_loop_config(config, prepared, vectors, report_to="local"))
        video_text, comment_text = load_text_tables(config, prepared, vectors)
        model = build_model(config.model, tables.num_videos, video_text, comment_text,
                            torch.from_numpy(tables.comment_likes))
        model.load_state_dict(state["best_state"])
        metrics = evaluate_model(model, "comment", prepared, config, progress=False, tables=tables)
        swapped = evaluate_model(model, "comment", prepared, config, splits=("test",), progress=False,
                                 swapped_histories=True, tables=tables)
        print("  per epoch: valid ndcg@5 " + " ".join(f"{row['valid_ndcg@5']:.4f}" for row in state["history"])
              + "; train CE " + " ".join(f"{row['train_ce']:.3f}" for row in state["history"]), flush=True)
        print(f"LSVCR {config.model.mode} seed {seed} {' '.join(overrides) or '(defaults)'}: best epoch "
              f"{state['best_epoch']}, valid ndcg@5 {metrics['valid']['ndcg@5']:.4f} "
              f"test {metrics['test']['ndcg@5']:.4f}, test with another user's history "
              f"{swapped['test']['ndcg@5']:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["ceiling", "model-free", "train", "reader-vectors"])
    parser.add_argument("--comment-open-rate", type=float, default=None, help="default: the demo preset's (0.09)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2024])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--vectors", default=None,
                        help="VECTORS of the same PREPARED to use instead of the MiniLM ones (ceiling, model-free, "
                             "train, reader-vectors)")
    parser.add_argument("--pca", type=int, default=16, help="reader-vectors: principal components kept (0: centering only)")
    parser.add_argument("--out", default=None, help="reader-vectors: the VECTORS directory to write")
    parser.add_argument("--work", default=str(HERE / "tmp" / "comment_signal"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    prepared, vectors = demo_variant(Path(args.work), args.comment_open_rate)
    vectors = Path(args.vectors) if args.vectors else vectors
    if args.probe == "ceiling":
        ceiling(prepared, vectors, args.comment_open_rate)
    elif args.probe == "model-free":
        model_free(prepared, vectors)
    elif args.probe == "reader-vectors":
        if not args.out:
            parser.error("reader-vectors needs --out DIR")
        write_reader_vectors(prepared, vectors, Path(args.out), args.pca)
    else:
        train(prepared, vectors, args.seeds, args.overrides)


if __name__ == "__main__":
    main()
