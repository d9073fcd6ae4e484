"""Full-ranking evaluation speed: 1,000 users ranked over all of 2,000 videos (target < 2 s).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_eval.py [--users 1000] [--videos 2000] [--repeats 5]

What is timed is the production path `lsvcr.evaluate.evaluate_arrays(full_ranking=True)`: batching
from padded arrays, the `id+text` LSVCR model's user vectors (both histories, 50 + 50 items, 8
comments per record, 384-d text tables), one matmul against every video, masking of the videos
already seen, and the pessimistic-tie metrics. Histories are random (lengths uniform in 1..50):
compute does not depend on the values, and the model is untrained (timing only).
Results: bench/results/eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lsvcr.sample_arrays import CommentPools, SampleArrays  # noqa: E402
from lsvcr.config import ModelConfig  # noqa: E402
from lsvcr.evaluate import evaluate_arrays  # noqa: E402
from lsvcr.model import LSVCRModel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "eval.json"


def random_histories(rng: np.random.Generator, users: int, videos: int, comments: int, length: int,
                     per_record: int) -> SampleArrays:
    def padded(max_value: int, shape: tuple[int, ...], lengths: np.ndarray) -> np.ndarray:
        values = rng.integers(1, max_value + 1, shape)
        values[np.arange(shape[1])[None, :] >= lengths[:, None]] = 0
        return values

    video_lengths = rng.integers(1, length + 1, users)
    record_lengths = rng.integers(1, length + 1, users)
    record_videos = padded(videos, (users, length), record_lengths)
    record_comments = rng.integers(1, comments + 1, (users, length, per_record)) * (record_videos != 0)[..., None]
    return SampleArrays(
        task="video", split="test", user=np.arange(1, users + 1), target_video=rng.integers(1, videos + 1, users),
        video_history=padded(videos, (users, length), video_lengths), comment_history_videos=record_videos,
        comment_history_comments=record_comments, pos_comments=None, candidates=None, labels=None,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--videos", type=int, default=2000)
    parser.add_argument("--comments", type=int, default=20000)
    parser.add_argument("--text-dim", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    video_text = torch.randn(args.videos + 1, args.text_dim)
    comment_text = torch.randn(args.comments + 1, args.text_dim)
    video_text[0] = comment_text[0] = 0
    model = LSVCRModel(ModelConfig(comment_like_prior=False), args.videos, video_text, comment_text).eval()
    arrays = random_histories(rng, args.users, args.videos, args.comments, 50, 8)
    pool = np.zeros((args.videos + 1, 3), dtype=np.int64)
    pool[1:] = rng.integers(1, args.comments + 1, (args.videos, 3))
    tables = CommentPools(args.videos, args.comments, pool, np.full(args.videos + 1, 3), np.zeros(args.comments + 1))

    evaluate_arrays(model, arrays, tables, batch_size=args.batch_size, full_ranking=True)  # warm-up
    seconds, cpu_seconds = [], []
    for _ in range(args.repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        accumulator = evaluate_arrays(model, arrays, tables, batch_size=args.batch_size, full_ranking=True)
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
    assert accumulator.result()["samples"] == args.users
    result = {
        "benchmark": "full-ranking evaluation (lsvcr.evaluate.evaluate_arrays, full_ranking=True, exclude_seen)",
        "users": args.users, "videos": args.videos, "model": "LSVCR id+text, hidden 64, 2 layers, history 50+50",
        "threads": args.threads, "batch_size": args.batch_size, "repeats": args.repeats,
        "seconds_median": statistics.median(seconds), "seconds_min": min(seconds), "seconds_all": seconds,
        # CPU seconds of this process: what the work costs when the shared machine is busy (wall >> CPU).
        "cpu_seconds_median": statistics.median(cpu_seconds), "cpu_seconds_all": cpu_seconds,
        "users_per_second": args.users / statistics.median(seconds), "target_seconds": 2.0,
        "meets_target": statistics.median(seconds) < 2.0,
        "load_average_1m_after": os.getloadavg()[0], "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"full ranking of {args.users} users over {args.videos} videos: median {result['seconds_median']:.3f} s "
          f"wall, {result['cpu_seconds_median']:.3f} s CPU (min wall {result['seconds_min']:.3f} s; target < 2 s; "
          f"load avg {result['load_average_1m_after']:.1f} on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
