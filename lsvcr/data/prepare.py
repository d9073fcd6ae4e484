"""`lsvcr prepare`: raw tables → the PREPARED/ format of docs/formats.md (METHOD 1, 7.2, 8, 9.5-9.6).

What becomes what:
- Video positives: user_video_inter rows whose `data.video_signal` flag is set (like by default,
  METHOD 1.1). If the median user has fewer than `data.min_median_positives` positives, the next denser
  signal is used (like → long_view → click) with a warning. A (user, video) pair counts once, at its
  first positive time. Video-only imports (RecBole, CSV) treat every interaction as a positive.
- Comment records: user_comment_inter grouped by (user, video); a record's time is its first
  interaction; a (user, comment) pair counts once, at its first interaction.
- Video samples: one per positive (target = the liked video). Comment samples: one per record
  (target = the record's video, pos_comments = all of the user's comments on it).
- Histories strictly precede the target time: liked videos with time < target, records whose first
  interaction < target, and inside each record only the comments interacted with before the target
  (the earliest `max_comments_per_record`). The last `max_history` items are kept.
- Samples whose two histories are both empty are dropped and counted (METHOD 9.5); a sample with one
  empty history is kept (the model handles an empty branch).
- Split, per user and task: leave-last-out by time (last → test, second-to-last → valid, the rest →
  train) for users with at least `min_targets_per_user` samples; other users' samples go to train.
  Ties in time are broken by the raw video id (`data.tie_break: file_order`: by raw row order, as
  RecBole's stable sort). `data.history_before: position` gives each video sample of the video task
  every earlier positive of the user in that order as its video history (RecBole's prefixes, equal
  timestamps included) instead of those strictly before its time.
- Each task's train samples end before the user's first valid/test time of the other task (stage 1 and
  2 train both tasks jointly: no train sample may hold another task's evaluation target).
- Candidates for valid/test are frozen with `data.seed` (METHOD 9.6): video task = target + 99 uniform
  negatives ≠ target; comment task = every positive + non-positive comments of the target video's
  pool (`hot_comments`, top `comment_pool_size` by likes), at most `comment_pool_size` in total but at
  least `comment_min_negatives` negatives, random (seeded) among the non-positives. Both shuffled.
  Positives and negatives come from the same population, the pool: interacted comments outside it stay
  in histories but are not positives (counted).
- Like counts leave out the data's own users' likes (`data.like_counts`), so no label is in them.
- Comments kept in comments.parquet: each video's pool plus every comment some user interacted with.

Everything is vectorised: sort + offsets + searchsorted, lists built with `ListArray.from_arrays`.
The steps live in `lsvcr.data.events` (positives, comment records, histories), `lsvcr.data.splits`
(splits, the train cap, candidates) and `lsvcr.data.comment_pools`; this module runs them and writes the
files under the names of `lsvcr.data.prepared`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from lsvcr.config import PrepareConfig
from lsvcr.data import schema
from lsvcr.data.comment_pools import comment_population_filter, index_comments
from lsvcr.data.events import (
    HistoryBuilder, Records, TimeKey, build_positives, build_records, choose_signal, expand_ranges, index_of,
    list_array, offsets_from_counts,
)
from lsvcr.data.importers import SYNTHETIC_MARKER, load_raw
from lsvcr.data.io import atomic_output_dir, write_json, write_parquet
from lsvcr.data.prepared import (
    COMMENTS_FILE, MANIFEST_FILE, USERS_FILE, USER_HISTORIES_FILE, VIDEOS_FILE, id_map_file, samples_file,
)
from lsvcr.data.splits import (
    assign_splits, candidate_rng, cap_train_at_first_eval, comment_candidates, video_candidates,
)
from lsvcr.errors import ConfigError, DataError

log = logging.getLogger("lsvcr.data")

SAMPLES_PER_CHUNK = 200_000
SPLIT_TEXT = (
    "leave-last-out by time per user and task: last target -> test, second-to-last -> valid, earlier -> "
    "train (users with fewer than {min_targets} targets: all train); ties broken by {tie_break}; "
    "{history}"
)
TIE_BREAK_TEXT = {"raw_id": "raw video id", "file_order": "raw row order (file order)"}
HISTORY_TEXT = {
    "time": "histories strictly precede the target time",
    "position": "video histories of video samples: every earlier positive in that order (equal timestamps "
                "included, RecBole's prefixes); other histories strictly precede the target time",
}
TRAIN_CAP_TEXT = (
    "train samples of each task end before the user's earliest valid/test target time of the other task "
    "(train target time < that time; the task's own split already puts its train targets first). Stage 1 "
    "and 2 train on both tasks jointly, so no train sample holds a valid/test target of either task in its "
    "histories or as its target"
)


def input_fingerprint(raw_dir: Path, config: PrepareConfig) -> str:
    """Hash of the data config and of the raw files' names, sizes and modification times."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                   for p in Path(raw_dir).iterdir() if p.is_file() and not p.name.startswith("."))
    text = json.dumps({"format_version": schema.FORMAT_VERSION, "config": dataclasses.asdict(config), "files": files})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _finished_manifest(out_dir: Path, fingerprint: str) -> dict | None:
    manifest_path = out_dir / MANIFEST_FILE
    if not (out_dir / "_SUCCESS").exists() or not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    return manifest if manifest.get("input_fingerprint") == fingerprint else None


def prepare(
    raw_dir: str | Path, out_dir: str | Path, config: PrepareConfig | None = None, force: bool = False
) -> dict:
    """Read, validate and convert `raw_dir`; write PREPARED/ atomically to `out_dir`. Returns the manifest.

    A finished `out_dir` made from the same raw files and config is kept as it is (unless `force`)."""
    config = config or PrepareConfig()
    started = time.perf_counter()
    raw_path, out_path = Path(raw_dir).resolve(), Path(out_dir).resolve()
    if out_path == raw_path or out_path in raw_path.parents:
        raise ConfigError(f"--out {out_dir} would replace the raw data in {raw_dir}: choose another directory")
    fingerprint = input_fingerprint(raw_path, config) if raw_path.is_dir() else ""
    finished = None if force or not fingerprint else _finished_manifest(out_path, fingerprint)
    if finished is not None:
        log.info("%s is up to date (same raw files and data config): kept; --force recomputes it", out_dir)
        return finished
    raw = load_raw(raw_dir)
    filters: list[str] = []

    # Entities: dense 1-based indices in raw-id order; 0 is padding.
    videos = raw.videos.take(pc.sort_indices(raw.videos, [("video_id", "ascending")]))
    video_ids = videos.column("video_id").to_numpy()
    num_videos = len(video_ids)
    if num_videos < 2:
        raise DataError("table video_features: at least 2 videos are needed")
    user_sources = [raw.interactions.column("user_id").to_numpy()]
    if raw.has_comments:
        user_sources.append(raw.comment_interactions.column("user_id").to_numpy())
    user_ids = np.unique(np.concatenate(user_sources))
    num_users = len(user_ids)
    interaction_user = index_of(user_ids, raw.interactions.column("user_id").to_numpy())
    interaction_video = index_of(video_ids, raw.interactions.column("video_id").to_numpy())

    signal, notes = choose_signal(raw, interaction_user, num_users, config)
    filters.extend(notes)
    positives, duplicate_positives = build_positives(raw, signal, interaction_user, interaction_video,
                                                     config.tie_break)
    filters.append(f"video positives: rows with {signal}; {duplicate_positives} repeated (user, video) positives "
                   "dropped (first kept)")

    comments_table = records = None
    hot_counts = np.zeros(num_videos, np.int64)
    hot_values = np.zeros(0, np.int32)
    like_rule = None
    if raw.has_comments:
        comments_table, hot_counts, hot_values, interaction_comment, like_rule = index_comments(
            raw, video_ids, config.comment_pool_size, filters, config.like_counts, config.hot_comments)
        records, duplicate_comment_interactions = build_records(
            raw,
            index_of(user_ids, raw.comment_interactions.column("user_id").to_numpy()),
            index_of(video_ids, raw.comment_interactions.column("video_id").to_numpy()),
            interaction_comment,
        )
        filters.append(f"comment interactions: {duplicate_comment_interactions} repeated (user, comment) "
                       "interactions dropped (first kept)")

    all_times = [positives.time_ms] + ([records.first_time_ms, records.comment_time_ms] if records else [])
    time_key = TimeKey.covering(*all_times, num_groups=max(num_users, len(records.user) if records else 0) + 1)
    builder = HistoryBuilder(positives, records, config, time_key)
    end_of_data = time_key.time_min + time_key.stride - 1

    tasks = {"video": (positives.user, positives.video, positives.time_ms)}
    if records is not None:
        tasks["comment"] = (records.user, records.video, records.first_time_ms)

    counts: dict = {
        "users": num_users, "videos": num_videos,
        "comments": comments_table.num_rows if comments_table is not None else 0,
        "interactions": raw.interactions.num_rows,
        "video_positives": len(positives.user),
        "comment_interactions": raw.comment_interactions.num_rows if raw.has_comments else 0,
        "comment_records": len(records.user) if records is not None else 0,
        "dropped_both_histories_empty": {},
    }
    pool_member = np.zeros(counts["comments"] + 1, bool)
    pool_member[hot_values] = True
    sample_indices, splits = {}, {}
    for task, (user, video, target_time) in tasks.items():
        # Samples are already sorted by (user, time, raw video id): positives and records are.
        positions = np.arange(len(user)) if task == "video" else None  # video samples are the positives
        _, video_count = builder.video_slices(user, target_time, positions)
        _, record_count = builder.record_slices(user, target_time)
        keep = (video_count > 0) | (record_count > 0)
        counts["dropped_both_histories_empty"][task] = int((~keep).sum())
        if task == "comment":
            population = comment_population_filter(records, pool_member, hot_counts, counts)
            counts["dropped_outside_comment_population"] = int((keep & ~population).sum())
            keep = keep & population
        sample_indices[task] = np.flatnonzero(keep)
        splits[task] = assign_splits(user[sample_indices[task]], config.min_targets_per_user)
    counts["dropped_train_after_first_eval"] = cap_train_at_first_eval(
        {task: tasks[task][0][rows] for task, rows in sample_indices.items()},
        {task: tasks[task][2][rows] for task, rows in sample_indices.items()},
        splits, num_users, config.max_train_targets_per_user)
    if config.max_train_targets_per_user > 0:
        counts["dropped_old_train_targets"] = {
            task: int((split == -1).sum()) - counts["dropped_train_after_first_eval"][task]
            for task, split in splits.items()}
    video_user, video_target, video_time = tasks["video"]
    video_rows = sample_indices["video"]
    counts["video_samples_with_target_in_comment_history"] = int(builder.target_records(
        video_user[video_rows], video_time[video_rows], video_target[video_rows]).sum())
    if config.exclude_target_video_comment_records:
        filters.append(f"video task: {counts['video_samples_with_target_in_comment_history']} samples had a "
                       "comment-history record on their own target video; those records are excluded "
                       "(data.exclude_target_video_comment_records)")
    with atomic_output_dir(out_dir) as temporary:
        for task, (user, video, target_time) in tasks.items():
            sample_index, split = sample_indices[task], splits[task]
            counts[f"{task}_samples"] = {}
            for split_id, split_name in enumerate(schema.SPLITS):
                rows = sample_index[split == split_id]
                counts[f"{task}_samples"][split_name] = len(rows)
                _write_samples(temporary / samples_file(task, split_name), task, split_name, rows,
                               user, video, target_time, records, builder, config, num_videos,
                               hot_counts, hot_values, pool_member)

        hot_comments = list_array(hot_counts, hot_values)
        write_parquet(pa.table({
            "video_idx": np.arange(1, num_videos + 1, dtype=np.int32),
            "video_id": video_ids,
            "caption": videos.column("caption"),
            "category": videos.column("category"),
            "hot_comments": hot_comments,
        }), temporary / VIDEOS_FILE, schema.VIDEOS)
        if comments_table is not None:
            write_parquet(comments_table, temporary / COMMENTS_FILE, schema.COMMENTS)
        user_idx = np.arange(1, num_users + 1, dtype=np.int32)
        write_parquet(pa.table({"user_idx": user_idx, "user_id": user_ids}), temporary / USERS_FILE, schema.USERS)
        histories = builder.columns(user_idx, np.full(num_users, end_of_data, np.int64))
        write_parquet(pa.table({"user_idx": user_idx, "user_id": user_ids, **histories}),
                      temporary / USER_HISTORIES_FILE, schema.USER_HISTORIES)
        for name, mapping in raw.id_maps.items():
            write_parquet(mapping, temporary / id_map_file(name), schema.ID_MAP)

        if config.max_train_targets_per_user > 0:
            filters.append(f"train: only each user's {config.max_train_targets_per_user} most recent train targets "
                           "per task (data.max_train_targets_per_user)")
        manifest = {
            "format_version": schema.FORMAT_VERSION,
            "source": raw.source,
            "raw_dir": str(Path(raw_dir).resolve()),
            "synthetic": raw.synthetic,
            "has_comments": raw.has_comments,
            "video_signal": signal,
            "counts": counts,
            "filters": filters + [
                "samples whose video history and comment history are both empty are dropped (METHOD 9.5)"],
            "split": SPLIT_TEXT.format(min_targets=config.min_targets_per_user,
                                       tie_break=TIE_BREAK_TEXT[config.tie_break],
                                       history=HISTORY_TEXT[config.history_before]),
            "train_cap": TRAIN_CAP_TEXT,
            "like_counts": like_rule,
            "protocol": {
                "video": f"1 positive + {min(config.video_negatives, num_videos - 1)} uniform random negatives "
                         "(distinct, != target, history items not excluded), frozen by data.seed, shuffled",
                "comment": f"all positives in the target video's pool (top {config.comment_pool_size} by likes; "
                           "positives outside it are not positives) + random non-positive comments of that pool, "
                           f"at most {config.comment_pool_size} candidates but at least "
                           f"{config.comment_min_negatives} negatives when the pool has them, frozen by "
                           "data.seed, shuffled",
                "seed": config.seed,
            },
            "id_maps": {name: id_map_file(name) for name in raw.id_maps},
            "config": dataclasses.asdict(config),
            "input_fingerprint": fingerprint,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if not raw.has_comments:
            manifest["filters"].append("no comment tables: comment task disabled")
            del manifest["protocol"]["comment"]
        write_json(manifest, temporary / MANIFEST_FILE)
        if raw.synthetic:
            (temporary / SYNTHETIC_MARKER).write_text(
                f"SYNTHETIC DATA: prepared from the simulated data set in {manifest['raw_dir']} (lsvcr synth); "
                "results on it say nothing about real users.\n")
    log.info("prepared %s → %s in %.1f s: %s", raw_dir, out_dir, time.perf_counter() - started,
             json.dumps({k: v for k, v in counts.items() if k.endswith("samples")}))
    return manifest


def _write_samples(
    path: Path, task: str, split: str, rows: np.ndarray, user: np.ndarray, video: np.ndarray,
    target_time: np.ndarray, records: Records | None, builder: HistoryBuilder, config: PrepareConfig,
    num_videos: int, hot_counts: np.ndarray, hot_values: np.ndarray, pool_member: np.ndarray,
) -> None:
    """Build and write one samples file in chunks (bounded memory, 32-bit list offsets)."""
    target_schema = schema.sample_schema(task, split)
    rng = candidate_rng(config.seed, task, split)
    hot_offsets = offsets_from_counts(hot_counts)
    chunks = [rows[i:i + SAMPLES_PER_CHUNK] for i in range(0, len(rows), SAMPLES_PER_CHUNK)] or [rows]
    with pq.ParquetWriter(path, target_schema, compression="zstd") as writer:
        for chunk in tqdm(chunks, desc=f"{task}/{split}", disable=len(chunks) < 3, unit="chunk"):
            columns = {
                "user_idx": pa.array(user[chunk].astype(np.int32)),
                "target_video": pa.array(video[chunk].astype(np.int32)),
                "target_time_ms": pa.array(target_time[chunk].astype(np.int64)),
                **builder.columns(user[chunk], target_time[chunk], chunk if task == "video" else None,
                                  video[chunk] if task == "video" and config.exclude_target_video_comment_records
                                  else None),
            }
            if task == "comment":
                # Positives and negatives come from one population: the target video's pool.
                record_counts = np.diff(records.comment_offsets)[chunk]
                interacted = records.comment[expand_ranges(records.comment_offsets[chunk], record_counts)]
                in_pool = pool_member[interacted]
                positives = interacted[in_pool]
                positive_counts = np.bincount(np.repeat(np.arange(len(chunk)), record_counts)[in_pool],
                                              minlength=len(chunk))
                columns["pos_comments"] = list_array(positive_counts, positives)
            if split != "train":
                if task == "video":
                    candidates, labels = video_candidates(video[chunk], num_videos, config.video_negatives, rng)
                else:
                    target = video[chunk] - 1
                    pool_counts = hot_counts[target]
                    pool = hot_values[expand_ranges(hot_offsets[target], pool_counts)]
                    candidates, labels = comment_candidates(
                        positive_counts, positives, pool_counts, pool, config.comment_pool_size,
                        config.comment_min_negatives, len(pool_member) - 1, rng)
                columns["candidates"], columns["labels"] = candidates, labels
            writer.write_table(pa.table(columns, schema=target_schema))
