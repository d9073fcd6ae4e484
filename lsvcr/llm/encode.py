"""`lsvcr encode`: item texts and user-history prompts → LLM vectors, with vLLM on a pool of Ray actors.

    lsvcr encode --data PREPARED --model NAME|PATH --what items|users|all --out VECTORS

A Ray Data pipeline: rows → (users: `PromptRenderer`, CPU) → `VLLMEmbedder` actors, each holding one
vLLM engine (`LLM(runner="pooling")`) → the driver, which writes Parquet shards as they complete.
- items (METHOD 4.4, 5.4): every video caption and comment content, MEAN-pooled final hidden states.
  Distinct texts are encoded once, so identical texts get bit-identical vectors (and duplicates cost
  nothing); the result is scattered back to `videos/` and `comments/` keyed by raw id.
- users (frozen alignment, METHOD 4.4): the stage-1 prompt of every train sample of both tasks,
  the LAST prompt token's final hidden state → `users_video/`, `users_comment/` keyed by `sample_row`.
Raw (un-normalised) hidden states: the pooler's activation/normalisation is switched off, since the
heads (`llm_emb_mlp`, `contrast_adapter`) are trained on top of them.

Resume: every output table is cut into fixed row ranges of `encode.shard_size`; a shard is written to
a temporary file and renamed, inside `.OUT.partial/`; a re-run encodes only missing shards (no engine
starts at all when none is missing). The finished directory is renamed to OUT at the end.

The actors (`VLLMEmbedder`, `PromptRenderer`), their engine settings and why they are not `ray.data.llm`:
`lsvcr/llm/vllm_actors.py`.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lsvcr import storage
from lsvcr.config import EncodeConfig, LSVCRConfig
from lsvcr.data.prepared import COMMENTS_FILE, VIDEOS_FILE, load_manifest, read_table, read_videos, samples_file, table_path
from lsvcr.errors import ConfigError, DataError
from lsvcr.llm.prompts import ItemTexts, PromptBuilder, load_captions
from lsvcr.llm.vllm_actors import PromptRenderer, VLLMEmbedder, actor_kwargs, embedder_kwargs, engine_dtype
from lsvcr.vectors import (
    read_vectors_manifest, read_vectors_manifest_if_any, shard_file, shard_paths, write_hashed_vectors, write_vectors_manifest,
)

log = logging.getLogger("lsvcr.encode")

ITEM_POOLING = "MEAN"
USER_POOLING = "LAST"
USER_TABLES = {"video": "users_video", "comment": "users_comment"}


# ----------------------------------------------------------------------------- shards


@dataclass
class ShardedOutput:
    """One output table of `total_rows` rows cut into fixed ranges, written as `part-NNNNN.parquet`."""

    directory: Path
    total_rows: int
    shard_size: int
    key_column: str

    @property
    def num_shards(self) -> int:
        return -(-self.total_rows // self.shard_size)

    def path(self, shard: int) -> Path:
        return self.directory / shard_file(shard)

    def pending_shards(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.path(s).is_file()]

    def shard_rows(self, shard: int) -> np.ndarray:
        return np.arange(shard * self.shard_size, min((shard + 1) * self.shard_size, self.total_rows))

    def write(self, shard: int, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), pa.float32())
        table = pa.table({self.key_column: pa.array(keys, pa.int64()),
                          "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
        temp = self.path(shard).with_suffix(".tmp")
        pq.write_table(table, temp)
        temp.rename(self.path(shard))

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        table = pa.concat_tables([pq.read_table(self.path(s)) for s in range(self.num_shards)])
        column = table["vector"].combine_chunks()
        vectors = column.values.to_numpy(zero_copy_only=False).reshape(len(table), column.type.list_size)
        return table[self.key_column].to_numpy(), vectors


@dataclass
class Throughput:
    prompts: int = 0
    tokens: int = 0
    seconds: float = 0.0
    engine_start_seconds: float = 0.0  # until the first batch came back (imports, engine build, 1st batch)
    first_batch_prompts: int = 0
    first_batch_tokens: int = 0

    def summary(self) -> dict:
        """Overall rates (wall clock incl. start-up) and steady rates (after the first batch; None
        when the later batches came back within a second of the first: too short to be a rate)."""
        steady_seconds = self.seconds - self.engine_start_seconds
        later_prompts = self.prompts - self.first_batch_prompts
        steady = later_prompts > 0 and steady_seconds >= 1.0
        return asdict(self) | {
            "prompts_per_s": round(self.prompts / max(self.seconds, 1e-9), 2),
            "tokens_per_s": round(self.tokens / max(self.seconds, 1e-9), 1),
            "steady_prompts_per_s": round(later_prompts / steady_seconds, 2) if steady else None,
            "steady_tokens_per_s": round((self.tokens - self.first_batch_tokens) / steady_seconds, 1) if steady else None,
        }


# ----------------------------------------------------------------------------- the pipeline


def _blocks(table: pa.Table, rows_per_block: int):
    """A Ray dataset of many small blocks, so results stream back (and shards complete) as they go."""
    import ray

    return ray.data.from_arrow([table.slice(start, rows_per_block)
                                for start in range(0, table.num_rows, rows_per_block)])


def _run_pipeline(dataset, outputs: list[tuple[ShardedOutput, np.ndarray, np.ndarray]], total: int,
                  description: str) -> Throughput:
    """Stream the encoded rows back; `outputs` maps global row ranges to (sharded output, keys, offsets).

    Global row r belongs to output i when offsets[i] <= r < offsets[i+1]; each completed shard is
    written at once, so a killed run keeps every shard it finished.
    """
    from lsvcr.console import progress as progress_bar

    buffers: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    needed: dict[tuple[int, int], int] = {}
    offsets = np.array([0] + [len(keys) for _, keys, _ in outputs]).cumsum()
    for index, (output, _, pending) in enumerate(outputs):
        for shard in pending:
            needed[index, int(shard)] = len(output.shard_rows(int(shard)))
    throughput = Throughput()
    started = time.perf_counter()
    with progress_bar(total, description, unit="text") as progress:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            if throughput.prompts == 0:
                throughput.engine_start_seconds = time.perf_counter() - started
            rows, vectors = batch["row"].astype(np.int64), np.asarray(batch["vector"], dtype=np.float32)
            output_index = np.searchsorted(offsets, rows, side="right") - 1
            for index in np.unique(output_index):
                mine = output_index == index
                local = rows[mine] - offsets[index]
                output = outputs[index][0]
                shards = local // output.shard_size
                for shard in np.unique(shards):
                    key = (int(index), int(shard))
                    buffers.setdefault(key, []).append((local[shards == shard], vectors[mine][shards == shard]))
                    done = sum(len(r) for r, _ in buffers[key])
                    if done == needed[key]:
                        local_rows = np.concatenate([r for r, _ in buffers[key]])
                        order = np.argsort(local_rows)
                        block = np.concatenate([v for _, v in buffers.pop(key)])[order]
                        output.write(int(shard), outputs[index][1][local_rows[order]], block)
            if throughput.prompts == 0:
                throughput.first_batch_prompts, throughput.first_batch_tokens = len(rows), int(batch["tokens"].sum())
            throughput.prompts += len(rows)
            throughput.tokens += int(batch["tokens"].sum())
            progress.update(len(rows))
            tokens_per_s = round(throughput.tokens / (time.perf_counter() - started), 1)
            progress.set_postfix(tokens_per_s=tokens_per_s, refresh=False)  # the bar redraws at mininterval
    throughput.seconds = time.perf_counter() - started
    if buffers:
        raise DataError(f"encode: {len(buffers)} shard(s) incomplete after the pipeline ended")
    return throughput


def _distinct_item_texts(prepared_dir: Path) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Distinct texts (in first-seen order: videos, then comments) and, per item table, its raw ids
    and the index of each item's text in the distinct list."""
    manifest = load_manifest(prepared_dir)
    videos = read_videos(prepared_dir, ["video_id", "caption"])
    parts = {"videos": (videos["video_id"].to_numpy(), videos["caption"].fill_null("").to_numpy(zero_copy_only=False))}
    if manifest.get("has_comments"):
        comments = read_table(prepared_dir, COMMENTS_FILE, ["comment_id", "content"])
        parts["comments"] = (comments["comment_id"].to_numpy(),
                             comments["content"].fill_null("").to_numpy(zero_copy_only=False))
    all_texts = np.concatenate([texts for _, texts in parts.values()]).astype(str)
    distinct, first_index, inverse = np.unique(all_texts, return_index=True, return_inverse=True)
    order = np.argsort(first_index, kind="stable")  # first-seen order: stable when data is appended
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    text_index = rank[inverse]
    result, start = {}, 0
    for name, (ids, texts) in parts.items():
        result[name] = (ids, text_index[start:start + len(texts)])
        start += len(texts)
    return distinct[order], result


def encode_items(prepared_dir: Path, partial: Path, model_path: Path, settings: EncodeConfig) -> dict:
    """Every caption and comment → `videos/`, `comments/` (MEAN pooling); returns manifest parts."""
    distinct, items = _distinct_item_texts(prepared_dir)
    texts_output = ShardedOutput(partial / "_distinct_texts", len(distinct), settings.shard_size, "text_row")
    pending = texts_output.pending_shards()
    throughput = Throughput()
    if pending:
        rows = np.concatenate([texts_output.shard_rows(s) for s in pending])
        log.info("items: %d distinct texts, %d of %d shards to encode", len(distinct), len(pending),
                 texts_output.num_shards)
        dataset = _blocks(pa.table({"row": rows, "text": pa.array(distinct[rows].tolist(), pa.string())}),
                          settings.batch_size)
        dataset = dataset.map_batches(
            VLLMEmbedder, fn_constructor_kwargs=embedder_kwargs(model_path, ITEM_POOLING, settings, settings.max_text_tokens),
            **actor_kwargs(settings))
        throughput = _run_pipeline(dataset, [(texts_output, np.arange(len(distinct)), np.array(pending))],
                                   len(rows), "encode items")
        log.info("items: %s", throughput.summary())
    _, text_vectors = texts_output.read()
    for name, (ids, text_index) in items.items():
        output = ShardedOutput(partial / name, len(ids), settings.shard_size, f"{name[:-1]}_id")
        for shard in output.pending_shards():
            rows = output.shard_rows(shard)
            output.write(shard, ids[rows], text_vectors[text_index[rows]])
    return {"dim": int(text_vectors.shape[1]), "counts": {name: int(len(ids)) for name, (ids, _) in items.items()}
            | {"distinct_texts": int(len(distinct))}, "throughput": throughput.summary() if pending else None}


def user_sample_rows(num_rows: int, total_rows: int, max_samples: int, seed: int) -> np.ndarray:
    """The train samples whose prompts are encoded: all, or a seeded random subset of this task's
    share of `encode.max_user_samples` (sorted; frozen alignment then trains on that subset)."""
    if max_samples <= 0 or total_rows <= max_samples:
        return np.arange(num_rows)
    share = int(round(max_samples * num_rows / total_rows))
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=share, replace=False))


PROMPT_COLUMNS = ["target_video", "video_history", "comment_history_videos", "comment_history_comments"]


def _user_samples(prepared_dir: Path, settings: EncodeConfig,
                  columns: list[str] = PROMPT_COLUMNS) -> dict[str, tuple[pa.Table, np.ndarray]]:
    """{task: (`columns` of its train samples, the rows of them to encode)} for the tasks the data set has."""
    tasks = ("video", "comment") if load_manifest(prepared_dir).get("has_comments") else ("video",)
    samples = {task: read_table(prepared_dir, samples_file(task, "train"), columns) for task in tasks}
    total = sum(table.num_rows for table in samples.values())
    return {task: (table, user_sample_rows(table.num_rows, total, settings.max_user_samples, settings.seed))
            for task, table in samples.items()}


def check_prompt_budget(prepared_dir: Path, model_path: Path, settings: EncodeConfig) -> None:
    """Fail before any encoding (not inside a Ray Data worker) if a user prompt's template cannot fit
    `encode.max_prompt_tokens` with the real tokenizer."""
    from transformers import AutoTokenizer

    texts = ItemTexts(captions=load_captions(prepared_dir), contents=np.array([""], dtype=object),
                      hot_comments=np.zeros((1, 1), dtype=np.int64))
    builder = PromptBuilder(AutoTokenizer.from_pretrained(model_path), texts, language=settings.language,
                            max_prompt_tokens=settings.max_prompt_tokens)
    for task, (table, selected) in _user_samples(prepared_dir, settings, ["target_video"]).items():
        if len(selected):
            builder.check_budget(task, table["target_video"].to_numpy()[selected], settings.prompt_template)


def encode_users(prepared_dir: Path, partial: Path, model_path: Path, settings: EncodeConfig) -> dict:
    """The stage-1 prompt of the train samples of both tasks → `users_video/`, `users_comment/` (LAST)."""
    import ray.data

    samples = _user_samples(prepared_dir, settings)
    outputs, pieces, offset, counts = [], [], 0, {}
    for task, (table, selected) in samples.items():
        output = ShardedOutput(partial / USER_TABLES[task], len(selected), settings.shard_size, "sample_row")
        pending = np.array(output.pending_shards(), dtype=np.int64)
        outputs.append((output, selected, pending))
        positions = (np.concatenate([output.shard_rows(int(s)) for s in pending]) if len(pending)
                     else np.zeros(0, np.int64))
        if len(positions):
            piece = table.take(selected[positions])
            pieces.append(piece.append_column("row", pa.array(positions + offset, pa.int64()))
                          .append_column("task", pa.array([task] * len(positions), pa.string())))
        offset += len(selected)
        counts[USER_TABLES[task]] = int(len(selected))
    if not pieces:
        return {"counts": counts, "throughput": None}
    work = pa.concat_tables(pieces)
    log.info("users: %d prompts to encode (%s)", work.num_rows, counts)
    dataset = _blocks(work, settings.batch_size)
    dataset = dataset.map_batches(
        PromptRenderer, fn_constructor_kwargs=dict(prepared_dir=str(prepared_dir), model_path=str(model_path),
                                                   settings=asdict(settings)),
        batch_format="pyarrow", batch_size=settings.batch_size, compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.25)
    dataset = dataset.map_batches(
        VLLMEmbedder, fn_constructor_kwargs=embedder_kwargs(model_path, USER_POOLING, settings, settings.max_model_len),
        **actor_kwargs(settings))
    throughput = _run_pipeline(dataset, outputs, work.num_rows, "encode users")
    log.info("users: %s", throughput.summary())
    return {"counts": counts, "throughput": throughput.summary()}


def run_encode(config: LSVCRConfig, prepared_dir: str | Path, out_dir: str | Path, what: str = "all",
               model: str | None = None) -> dict:
    """Encode into `out_dir` (VECTORS format); resumable; returns the manifest."""
    from lsvcr.llm.registry import resolve_model
    from lsvcr.runtime import ensure_ray

    if what not in ("items", "users", "all"):
        raise ConfigError(f"--what must be items, users or all; got {what!r}")
    settings = config.encode
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    table_path(prepared_dir, VIDEOS_FILE)  # a clear error before any engine starts
    if settings.encoder == "hashed":
        return _run_hashed_encode(settings, prepared_dir, out_dir, what)
    if settings.encoder != "llm":
        raise ConfigError(f"encode.encoder must be llm or hashed; got {settings.encoder!r}")
    if settings.storage_dtype != "float32":
        raise ConfigError("encode.storage_dtype=float16 is available with encode.encoder=hashed only")
    model_name = model or settings.model
    model_path = resolve_model(model_name)
    if what in ("users", "all"):
        check_prompt_budget(prepared_dir, model_path, settings)
    partial = storage.partial_dir(out_dir)
    if out_dir.is_dir():  # add missing parts to a finished directory: continue from its files
        if partial.exists():
            shutil.rmtree(partial)
        out_dir.rename(partial)
    partial.mkdir(parents=True, exist_ok=True)
    manifest = read_vectors_manifest_if_any(partial)
    manifest.update({"format_version": 1, "model": model_name, "model_path": str(model_path), "dtype": engine_dtype(settings),
                     "pooling": ITEM_POOLING.lower(), "user_pooling": USER_POOLING.lower(),
                     "prompt_template": settings.prompt_template, "language": settings.language,
                     "max_prompt_tokens": settings.max_prompt_tokens, "history_length": settings.history_length})
    manifest.setdefault("counts", {})
    manifest.setdefault("throughput", {})
    ensure_ray()
    if what in ("items", "all"):
        items = encode_items(prepared_dir, partial, model_path, settings)
        manifest["dim"] = items["dim"]
        manifest["counts"].update(items["counts"])
        if items["throughput"]:
            manifest["throughput"]["items"] = items["throughput"]
    if what in ("users", "all"):
        users = encode_users(prepared_dir, partial, model_path, settings)
        manifest["counts"].update(users["counts"])
        if users["throughput"]:
            manifest["throughput"]["users"] = users["throughput"]
        if "dim" not in manifest:
            manifest["dim"] = int(pq.read_schema(shard_paths(partial, "users_video")[0])
                                  .field("vector").type.list_size)
    write_vectors_manifest(partial, manifest)
    storage.promote(partial, out_dir)
    return manifest


def _run_hashed_encode(settings: EncodeConfig, prepared_dir: Path, out_dir: Path, what: str) -> dict:
    """`encode.encoder=hashed`: the items with `lsvcr.vectors.write_hashed_vectors` (scale/smoke runs)."""
    if what != "items":
        raise ConfigError("encode.encoder=hashed encodes items only (--what items): user prompts need the LLM")
    partial = storage.partial_dir(out_dir)
    if partial.exists():
        shutil.rmtree(partial)
    started = time.perf_counter()
    write_hashed_vectors(prepared_dir, partial, settings.hashed_dim, settings.seed, settings.storage_dtype)
    manifest = read_vectors_manifest(partial)
    manifest.update(format_version=1, throughput={"items": {"seconds": round(time.perf_counter() - started, 2)}})
    write_vectors_manifest(partial, manifest)
    storage.promote(partial, out_dir)
    return manifest
