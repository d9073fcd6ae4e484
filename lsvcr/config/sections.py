"""The configuration's sections: one dataclass per section, every field with its default and why.

Defaults are the paper's (../shared/LSVCR_METHOD.md), with the section cited beside each group; the YAML
side (loading, overrides, validation, the reference file) is `lsvcr.config.files`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PrepareConfig:
    """How raw KuaiComt-style tables become LSVCR samples (METHOD 1, 7.2, 8)."""

    video_signal: str = "like"  # like | long_view | click: which user_video_inter flag is a positive
    # Fall back to the next denser signal (like -> long_view -> click) when the median user has fewer.
    min_median_positives: int = 5
    min_targets_per_user: int = 3  # users with fewer video targets go to train only
    max_history: int = 50  # most recent items kept per history (stage 2 uses 50)
    max_comments_per_record: int = 8  # user comments kept per comment-history record
    comment_pool_size: int = 100  # candidate comments per video (top by likes), METHOD 1.5
    hot_comments: int = 3  # top comments per video used as "hot comments"
    video_negatives: int = 99  # frozen sampled candidates per valid/test sample (+1 positive)
    seed: int = 2024
    # 0: every train target. N > 0: only each user's N most recent train targets per task (histories still
    # use all earlier interactions); bounds the cost of per-sample work such as LLM history prompts.
    max_train_targets_per_user: int = 0
    # Order of a user's interactions with equal timestamps: raw_id (by raw video id) | file_order (as the
    # raw rows come, RecBole's stable sort). configs/movielens.yaml sets RecBole's protocol (docs/model.md).
    tie_break: str = "raw_id"
    # Video history of a video sample: time (interactions strictly before the target time) | position
    # (every earlier interaction in the sorted sequence, equal timestamps included: RecBole's prefixes).
    history_before: str = "time"
    # The video task's comment history may hold a record on the target video itself (the user opened its
    # comments before liking it). Counted in the manifest; true drops such records from that sample's history.
    exclude_target_video_comment_records: bool = False
    # comment_like_cnt is a snapshot that includes the data's own users' likes (the test user's too).
    # outside_users: subtract every is_like of user_comment_inter (one per user and comment), so no like of a
    # user in the data (no label) is in any like count; snapshot: the table's count as it is.
    like_counts: str = "outside_users"
    # Comment candidates of valid/test keep at least this many negatives (the authors train with 19).
    comment_min_negatives: int = 19


@dataclass
class ModelConfig:
    """The SR backbone (METHOD 2.1)."""

    mode: str = "id+text"  # id+text | text | id
    hidden_size: int = 64
    num_heads: int = 2
    inner_size: int = 256
    num_layers: int = 2
    num_mix_layers: int = 1
    hidden_dropout: float = 0.3
    attn_dropout: float = 0.3
    max_position: int = 50
    temperature: float = 0.07
    layer_norm_eps: float = 1e-8
    # "faithful": every layer attends to the input embeddings (METHOD 2.3 quirk); "standard": SASRec stacking.
    stacking: str = "faithful"
    # "lsvcr": the paper's backbone; "sasrec": the ID-only SASRec baseline (lsvcr/baselines.py).
    architecture: str = "lsvcr"
    # Beyond the paper (off = its F_v, METHOD 2.5): a learned pooling logit per distance from the latest history
    # item, so F_v can favour recent items in windows that are not full (docs/model.md, docs/results.md).
    pooling_recency_bias: bool = False
    # Beyond the paper (off = its scoring, METHOD 2.7): a learned logit r added to every video candidate already in
    # the user's history, so the model can learn how often users go back to a video (RepeatNet's repeat-or-explore,
    # reduced to one scalar; docs/model.md). It starts at 0 (the paper's scores) and is learned with the CE. The SASRec
    # baseline takes it too, so that a comparison can give both models the same term.
    repeat_logit: bool = False
    # Beyond the paper (off = the paper's scoring, METHOD 2.7): add w * z(log1p(comment like count)) to every
    # comment logit (w learned, starting at the popularity-only fit). The pipeline reports it as its own row.
    comment_like_prior: bool = False
    # Beyond the paper (false = its scoring): at inference (evaluation, serving), a video that is never a target of the
    # video task's training split is scored and read by its text alone, without its ID embedding. Training is the
    # paper's: the full softmax trains such a video only as a negative, so its ID ends up carrying that push down and
    # buries what its title says (docs/model.md, docs/results.md "Cold test items"). The set is taken from the
    # training split when fine-tuning starts and saved with the model. id+text, video task only (a comment model keeps
    # every ID).
    text_only_untrained_videos: bool = False
    # Text vectors wider than this (raw LLM states, e.g. the no-alignment ablation) pass through a freshly
    # initialised llm_emb_mlp (hidden -> 1024 -> GELU -> this), trained with the model, as the authors' stage 2
    # does for its 4096-d ChatGLM3 vectors (METHOD 3, 7.3). Aligned vectors already have this width (align.text_dim).
    text_mlp_dim: int = 256


@dataclass
class FinetuneConfig:
    """Stage 2: recommendation-oriented fine-tuning (METHOD 6.2)."""

    task: str = "video"  # video | comment
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 512
    max_epochs: int = 50
    # 0: every batch of the epoch. N > 0: only the first N batches of each epoch's shuffled order (the same on
    # every rank), then validation as usual: smoke runs and the KuaiComt-size Tune and scale measurements.
    max_steps_per_epoch: int = 0  # 0 = whole epochs; N = the first N batches of each shuffled epoch
    # Ray Train runs also checkpoint every N steps inside an epoch (0: at epoch ends only), so a lost worker
    # resumes at the last such step instead of the epoch's start (a KuaiComt video epoch is ~70 min on CPU).
    # The resumed run equals an uninterrupted one: each rank's sampling and dropout RNG states are saved too.
    # Not in Tune trials (a report there is a training iteration for the scheduler).
    checkpoint_every_steps: int = 0  # 0 = at epoch ends only; N = also every N steps of an epoch
    patience: int = 5  # validations without selection_metric improvement before stopping
    history_length: int = 50
    comment_negatives: int = 19  # same-video negatives per positive comment (20-way softmax)
    id_text_loss_weight: float = 0.1
    contrast_negatives: int = 99
    # Anchors of L_IT that share one draw of negatives: 1 = a draw per anchor (the official code); larger
    # blocks replace an [N, 99, 64] gather by one matmul per block (same negatives per anchor in expectation).
    contrast_negatives_shared_by: int = 256  # CPU speed; the paper's code: 1 (configs/paper.yaml)
    # L_IT's two directions (id->text, text->id) draw their negatives independently, as the official code does
    # (METHOD 2.8: two disjoint sets of 99 per anchor); false reuses one draw for both (half the sampling).
    contrast_negatives_per_direction: bool = True
    num_workers: int = 1  # Ray Train workers
    threads_per_worker: int = 1
    use_gpu: str = "auto"  # auto | true | false
    seed: int = 2024
    eval_batch_size: int = 1024
    full_ranking: bool = False  # also report full ranking over all videos
    selection_metric: str = "ndcg@5"  # valid metric that picks the best epoch (ndcg@K, recall@K, mrr)
    # sampled: valid on the frozen candidates; full: valid on full ranking over all videos (video task;
    # finetune.exclude_seen decides the history masking), RecBole's model selection.
    selection_ranking: str = "sampled"
    exclude_seen: bool = True  # in full ranking, drop videos already in the history
    checkpoints_to_keep: int = 2  # Ray Train CheckpointConfig(num_to_keep)
    max_failures: int = 2  # Ray Train FailureConfig: restarts from the latest checkpoint after a lost worker
    # Batches of similar history lengths (shuffled within buckets), padding trimmed: same samples, less compute.
    length_bucketing: bool = True
    # last: each training sample is trained at its history's last position (the paper, RecBole's prefixes).
    # all_positions (video task, video-only data, data.history_before: position): SASRec's original objective,
    # every position of a history window predicts its next item, so one window replaces up to history_length
    # samples (~7x less CPU per epoch on ml-100k); batch_size then counts windows. Windows step back by
    # target_stride through long histories: the k-th item is predicted from at least
    # min(k, history_length - target_stride + 1) earlier items (min(k, history_length) with `last`).
    train_targets: str = "last"  # last | all_positions (video-only data, RecBole prefixes; docs/model.md)
    target_stride: int = 10  # all_positions: windows step back this far through long histories
    # The video task's CE over all videos holds batch x (V+1) logits several times over (KuaiComt: 161 MB each).
    # N > 0: when they exceed N MB, a step takes the rows a chunk at a time (chunk logits <= N MB) and takes each
    # chunk's gradients with its loss (lsvcr.model.catalog_cross_entropy): same loss and gradients up to float
    # summation order, no recomputation. Below ~32k videos at batch 512 it is the one pass (every demo and
    # MovieLens run). At KuaiComt size (bench/bench_catalog_ce.py): 0.72 s against 1.08 s, and 123 MB kept
    # for the backward pass against 445 MB. 0: always one pass.
    max_logits_mb: float = 64.0  # video CE: largest logits chunk in MB; 0 = one pass
    # The Ray Train workers' memory allocator (set in their environment before they start). mimalloc (the
    # cmeel-mimalloc wheel's libmimalloc.so via LD_PRELOAD, never returning freed pages to the OS) reuses a step's
    # freed activations instead of keeping glibc's fragmented heaps: demo video steps at the same speed with 26%
    # less peak RSS (docs/results.md, Scale). system: the C library's malloc. auto: mimalloc where the wheel is
    # installed (Linux x86_64), else system.
    allocator: str = "auto"  # auto | mimalloc | system


@dataclass
class EncodeConfig:
    """LLM encoding with vLLM on Ray actors (METHOD 4.4, 5.4)."""

    model: str = "smollm2-135m"  # registry name or a local Hugging Face folder
    dtype: str = "auto"  # auto picks bf16 where supported, else float32
    max_model_len: int = 1024
    max_prompt_tokens: int = 768  # history prompts are truncated oldest-first to fit
    num_actors: int = 1
    batch_size: int = 64
    gpus_per_actor: float = 0.0
    kv_cache_gib: int = 1
    shard_size: int = 4096  # rows per output Parquet shard
    prompt_template: int = 0  # index of the paper's templates (0 or 1)
    language: str = "en"  # en | zh
    history_length: int = 20  # stage-1 history length in prompts
    cpus_per_actor: float = 1.0  # Ray CPUs (and torch/OMP threads) per vLLM actor
    max_text_tokens: int = 256  # item texts (captions, comments) are truncated to this many tokens
    # Users: encode the prompts of at most this many train samples (a seeded random subset, split across the
    # tasks in proportion; frozen alignment trains on it). -1: all. History prompts are the expensive part.
    max_user_samples: int = -1
    seed: int = 2024
    # llm: the model above (vLLM). hashed: hashed bag of words + fixed random projection (lsvcr.vectors),
    # items only, for scale and smoke runs on CPU; never reported as LLM results.
    encoder: str = "llm"
    hashed_dim: int = 64
    storage_dtype: str = "float32"  # float32 | float16 (VECTORS on disk and their memory maps)


@dataclass
class AlignConfig:
    """Stage 1: personalized preference alignment (METHOD 5)."""

    mode: str = "frozen"  # frozen (precomputed LLM vectors) | lora (LLM trained with a LoRA adapter)
    lr: float = 3e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 128
    history_length: int = 20
    rec_loss_weight: float = 1.0
    contrast_loss_weight: float = 0.5
    text_dim: int = 256  # output of the item-text MLP (llm_emb_mlp)
    # Beyond the paper, frozen mode only: standardize the LLM's item and user vectors per dimension (fixed
    # statistics of the encoded set) before the heads. Needed when a frozen LLM's states are nearly collinear
    # (SmolLM2 on MovieLens: stage 1 stayed at chance without it); configs/movielens.yaml turns it on.
    standardize_llm_vectors: bool = False
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    # None: every linear layer of each block of the chosen LLM (METHOD 4.1 for ChatGLM3).
    lora_target_modules: list[str] | None = None
    gradient_checkpointing: bool = False
    num_workers: int = 1
    threads_per_worker: int = 1
    use_gpu: str = "auto"
    checkpoint_every: int = 200  # steps
    max_steps: int = -1  # -1: run the epochs
    seed: int = 2024
    log_every: int = 10  # steps per train_log.jsonl row
    max_response_tokens: int = 64  # lora: target text tokens in the L_LM response
    bf16: bool = True  # lora: bf16 autocast where the device supports it
    max_failures: int = 2  # Ray Train restarts of the worker group from the latest checkpoint
    # View augmentation (METHOD 5.1; the authors' phis_aug_p, chis_aug_p, inter_aug_p): a sample's video /
    # comment history is in "aug mode" with these probabilities, and then each item with view_aug_item_p shows
    # the LLM and the SR model different hot comments / different halves of (own + popular other) comments.
    # 0 turns a part off.
    video_view_aug_p: float = 0.5
    comment_view_aug_p: float = 0.5
    view_aug_item_p: float = 0.3
    view_aug_popular: int = 10  # the popular pool the comment-record augmentation draws from (top 10 by likes)


@dataclass
class TuneConfig:
    """Ray Tune sweeps."""

    num_samples: int = 8
    scheduler: str = "asha"  # asha | none
    max_concurrent: int = 2
    max_epochs: int = 10
    grace_period: int = 2
    # CPUs reserved by each trial's driver function. It only waits on its Ray Train workers, which reserve
    # finetune.threads_per_worker CPUs each, so 0 lets trials share a small machine deliberately.
    cpus_per_trial: float = 0.0
    gpus_per_trial: float = 0.0  # GPUs per trial, split evenly across its finetune.num_workers Train workers
    seed: int = 2024


# Ray Serve's HTTP ingress is chosen by environment variables that Ray's processes read when they start, so
# they must be set before `ray.init` / `ray start` (lsvcr.runtime.apply_serve_ingress_environment; cluster.yaml).
# Our endpoints only read, so HAProxy may replay a request on another replica when its replica closed the
# connection without an answer (it died): `empty-response` and `junk-response` on top of Ray's `conn-failure`.
# Six retries, not HAProxy's three: Ray balances by leastconn, which favours a dead replica (its connections
# fail at once, so it holds none) until three errors mark it down, so three retries could all land on it and
# end in a 500 (seen in the replica-kill test on a loaded machine).
# Ray's RAY_SERVE_THROUGHPUT_OPTIMIZED=1 is faster still (955 vs 754 requests/s at 32 clients, measured side by
# side: bench/results/serve.json) but not on by default: with it replica kills cut responses (docs/serving.md).
SERVE_INGRESS_ENVIRONMENT: dict[str, dict[str, str]] = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1",
                "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response",
                "RAY_SERVE_HAPROXY_RETRIES": "6"},
    "proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0"},
}


@dataclass
class ServeConfig:
    """Ray Serve deployment of the SR backbone."""

    host: str = "127.0.0.1"
    port: int = 8000
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 10.0  # load above target this long adds a replica (Ray's default: 30)
    downscale_delay_s: float = 60.0  # load below target this long removes one (Ray's default: 600)
    num_cpus_per_replica: float = 1.0  # torch threads per replica = max(1, int(this))
    # @serve.batch, sized to the concurrency a replica sees (docs/serving.md): a batch closes when full
    # or `batch_wait_timeout_s` after its first request, and waits at all only on a busy replica (other
    # requests inside it: a lone request never waits); up to `max_ongoing_requests` wait per replica.
    # 0: a batch is what queued while the previous one computed; on CPU a 2 ms wait bought no throughput
    # (bench_serve --interleave-waits-ms 2 0) and cost a lone request its 2 ms.
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.0
    # Pin each replica's threads to its own num_cpus_per_replica cores (by its rank on the node, wrapping
    # around the node's cores; Linux), so replicas do not migrate between cores or share one. Three bench runs
    # (docs/serving.md): +4-33% requests/s at 32 clients over unpinned replicas in the same run; mixed at 8.
    pin_replica_cpus: bool = True
    max_ongoing_requests: int = 16
    # Extra replicas a rollout of a new model version (serve deploy / serve.run with a new MODEL dir) may start
    # before it stops old ones, as a percentage of the target count rounded up to whole replicas (Ray's
    # max_surge_percent). 0 (Ray's default): an old replica stops before its replacement starts, so a
    # one-replica deployment answers nothing until the new one runs (20 s on a loaded machine,
    # docs/serving.md). Positive: no such gap, but the extra replica needs room: on a full cluster without an
    # autoscaler the rollout waits, the old version serving, until there is room (a 2-core machine running
    # 2 one-core replicas never has it). serve/config.yaml, for autoscaling clusters, sets 25.
    max_surge_percent: int = 0
    # Ray Serve's per-request access log line in each replica (to its log file and, by Ray's default, stderr,
    # which Ray's log monitor then reads): 0.24-0.37 ms of CPU per request on the path and 15-20% of the
    # requests/s, interleaved in one cluster (docs/serving.md, "The access log"). Off by default; HAProxy can
    # log requests instead (RAY_SERVE_HAPROXY_LOG_TARGET). Replica errors are logged either way.
    access_log: bool = False
    # A replica projects every comment once for the comment records of histories (exact: the comment path is
    # linear) when that table, comments x hidden x 4 B, fits this; above it (KuaiComt: 8.5M comments, 2.2 GB
    # at hidden 64) each request projects the few rows it names from the memory-mapped text table. ~10% of a
    # served video request's CPU at 50k comments (docs/serving.md). 0: always per request.
    record_comment_table_max_mb: float = 256.0
    max_k: int = 200
    max_history_items: int = 1000  # longer requests are rejected; up to this, truncated to the model's limit
    max_body_bytes: int = 1_000_000
    # The HTTP ingress, a cluster-wide Ray setting read when Ray starts (SERVE_INGRESS_ENVIRONMENT above,
    # docs/serving.md). haproxy: HAProxy (Linux) sends each request straight to a replica's own HTTP server and
    # replays it on another replica if the first dies before answering; proxy: Serve's Python HTTP proxy.
    ingress: str = "haproxy"  # haproxy | proxy


@dataclass
class PathsConfig:
    """Where a pipeline run reads raw tables and keeps everything it writes."""

    raw: str = ""  # KuaiComt / RecBole / CSV tables; empty: generate the embedded synthetic data set
    synth_preset: str = "demo"  # preset used when `raw` is empty
    # Root of every stage output (prepared/, vectors/, aligned/, models/, report/): a local path or a
    # pyarrow-filesystem URI (s3://bucket/run, gs://..., file:///...). Never a node-local assumption.
    storage: str = "runs/demo"


@dataclass
class LSVCRConfig:
    data: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
