"""`lsvcr synth`: a synthetic data set in the KuaiComt layout, with structure a text model can learn.

The generative story (all vectorised NumPy, deterministic for a seed):
- 20 topics, each with its own English vocabulary. Every user has sparse latent interests over the
  topics (Dirichlet, a few strong ones) that drift over the time window towards a second interest
  vector, plus a preferred comment style (funny, informative, emotional, critical, supportive,
  curious).
- A video has a topic, a heavy-tailed popularity, an English caption built from its topic's words
  (plus filler words and hashtags), a duration and `category` = the topic name. Videos of a topic
  share words, so text generalises where IDs with few interactions do not.
- A comment has a style and English text mixing its style's phrases with its video's topic words;
  like counts are lognormal (heavy-tailed) and grow with the video's popularity and the style appeal.
- Impressions follow the user's current interests (or popularity, for a share of them); clicks,
  long views and likes depend on the interest in the video's topic plus noise. Comment sections are
  opened more on liked videos; the comments a user likes or replies to follow the user's style and
  the comment's like count (popularity bias).

`lsvcr.data.synth_files.write_synthetic` writes the five KuaiComt tables (CSV or Parquet, or RecBole
atomic files), `SYNTHETIC.txt` and `synth.json` (the parameters), atomically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lsvcr.data.schema import RAW_TABLES

TOPICS: dict[str, list[str]] = {
    "cooking": "recipe kitchen noodles dumpling spicy sauce chef bake garlic wok soup delicious".split(),
    "pets": "puppy kitten cat dog paws fluffy leash bark meow adopt vet cute".split(),
    "travel": "beach mountain trip flight hotel backpack island sunset passport hike temple city".split(),
    "football": "goal striker penalty league match stadium keeper dribble derby referee tackle corner".split(),
    "basketball": "dunk hoop rebound court playoffs three-pointer assist jersey coach buzzer layup nba".split(),
    "gaming": "boss level quest console speedrun controller loot respawn multiplayer pixel arcade combo".split(),
    "music": "guitar song concert melody piano singer chorus beat album lyrics drums cover".split(),
    "fitness": "workout gym squat protein cardio muscle yoga stretch marathon reps plank sweat".split(),
    "fashion": "outfit dress sneakers style runway jacket makeup lipstick vintage designer model trend".split(),
    "tech": "smartphone laptop gadget chip battery unboxing review camera app software robot screen".split(),
    "cars": "engine drift racing supercar horsepower garage tires turbo wheel highway motor drive".split(),
    "comedy": "prank joke sketch funny skit parody laugh blooper standup silly meme roast".split(),
    "dance": "choreography dancer moves rhythm ballet hiphop spin stage routine tango salsa groove".split(),
    "science": "experiment physics chemistry atoms galaxy planet lab microscope rocket telescope dna theory".split(),
    "movies": "trailer actor scene director film cinema plot sequel villain hero premiere oscar".split(),
    "art": "painting sketch canvas brush watercolor sculpture gallery portrait ink mural artist pencil".split(),
    "finance": "stocks market invest savings budget crypto dividend bank loan trading wealth economy".split(),
    "parenting": "baby toddler family mom dad bedtime school diaper nursery kids homework lullaby".split(),
    "nature": "forest river waterfall wildlife birds flowers garden ocean rainforest leaves meadow storm".split(),
    "history": "ancient empire castle dynasty war museum pharaoh relic medieval emperor ruins legend".split(),
}
TOPIC_NAMES = list(TOPICS)
FILLER = "wow today look this new best really must see the and with my our amazing".split()
STYLES: dict[str, list[str]] = {
    "funny": "lol haha hilarious dying crying-laughing lmao joke comedy-gold too-funny rofl".split(),
    "informative": "actually fact note tip because explained source detail learned useful".split(),
    "emotional": "touching tears heart beautiful moved love memories grateful chills warm".split(),
    "critical": "overrated boring wrong disagree fake worse misleading clickbait meh disappointed".split(),
    "supportive": "great awesome keep-going proud well-done respect legend support bravo inspiring".split(),
    "curious": "how why what where question wonder anyone explain curious really".split(),
}
STYLE_NAMES = list(STYLES)
# How much each style tends to be liked by everyone (popularity of comment styles).
STYLE_APPEAL = np.array([0.4, 0.3, 0.2, -0.3, 0.0, -0.1])
# A user picks comments by Gumbel-top-k over these weights times preference(style) and log(1 + likes).
COMMENT_STYLE_WEIGHT, COMMENT_LIKES_WEIGHT = 3.0, 0.6

WINDOW_START_MS = 1_696_089_600_000  # 2023-09-30 16:00 UTC (KuaiComt's window starts 2023-09-30)
WINDOW_DAYS = 35
CHINA_OFFSET_MS = 8 * 3_600_000  # p_hourmin is local time (UTC+8)


@dataclass
class SynthParams:
    users: int = 800
    videos: int = 600
    comments_per_video: int = 10
    impressions_per_user: float = 200.0  # mean; lognormal across users
    like_rate: float = 0.28  # mean P(like | impression)
    comment_open_rate: float = 0.09  # mean P(comment interactions | impression)
    seed: int = 2024


PRESETS: dict[str, SynthParams] = {
    # Unit tests: prepare in well under 2 s.
    "tiny": SynthParams(users=120, videos=150, comments_per_video=8, impressions_per_user=100.0,
                        like_rate=0.3, comment_open_rate=0.12),
    # The demo: ~30 likes and ~29 comment interactions per user (KuaiComt: 1,002,672 / 34,701 users = 28.9);
    # the LLM can encode every text in minutes.
    "demo": SynthParams(comment_open_rate=0.165),
    # Benchmark scale: about 1M video impressions.
    "bench": SynthParams(users=8000, videos=20000, comments_per_video=10, impressions_per_user=135.0,
                         like_rate=0.1, comment_open_rate=0.03),
    # KuaiComt's published sizes (../shared/KUAICOMT_SCHEMA.md): 34,701 users, 82,452 videos, ~16.3M
    # comments, ~1.0M comment interactions (6.8M impressions). Rates pinned: issue #16 measured these.
    "kuaicomt": SynthParams(users=34_701, videos=82_452, comments_per_video=198, impressions_per_user=200.0,
                            like_rate=0.28, comment_open_rate=0.09, seed=7),
}


def _own_likes(user: np.ndarray, comment: np.ndarray, is_like: np.ndarray, num_comments: int) -> np.ndarray:
    """Per comment: how many distinct users of the data set liked it."""
    pairs = np.unique(user[is_like].astype(np.int64) * num_comments + comment[is_like])
    return np.bincount(pairs % num_comments, minlength=num_comments)


def _unique_ids(rng: np.random.Generator, count: int, low: int, max_gap: int) -> np.ndarray:
    """`count` distinct int64 ids that look like KuaiComt's (large, unordered)."""
    ids = low + np.cumsum(rng.integers(1, max_gap, size=count, dtype=np.int64))
    return rng.permutation(ids)


def _join_words(columns: list[pa.Array]) -> pa.Array:
    """Row-wise join of word columns with spaces; null words are skipped."""
    return pc.binary_join_element_wise(*columns, " ", null_handling="skip")


def _pick_words(rng: np.random.Generator, vocab: np.ndarray, rows: np.ndarray, keep_prob: float) -> pa.Array:
    """One word per row from `vocab[rows]` (a 2-d vocabulary), null with probability 1 - keep_prob."""
    index = rows * vocab.shape[1] + rng.integers(0, vocab.shape[1], size=len(rows))
    words = pa.array(vocab.ravel().tolist(), pa.string()).take(pa.array(index))
    return pc.if_else(pa.array(rng.random(len(rows)) >= keep_prob), pa.scalar(None, pa.string()), words)


def _sample_from_rows(rng: np.random.Generator, row_cdf: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Draw a column index per entry of `rows`, from the categorical distribution `row_cdf[row]`.

    row_cdf is (R, K) with each row a cumulative distribution ending at 1. Flattening with an offset of
    `row` per row turns all draws into one searchsorted call (no (N, K) matrix)."""
    num_columns = row_cdf.shape[1]
    flat = (row_cdf + np.arange(row_cdf.shape[0])[:, None]).ravel()
    position = np.searchsorted(flat, rows + rng.random(len(rows)) * (1 - 1e-9), side="right")
    return np.minimum(position - rows * num_columns, num_columns - 1)


def _calibrate_bias(logits: np.ndarray, target_rate: float) -> float:
    """The bias b with mean(sigmoid(logits - b)) == target_rate (bisection on an evenly strided sample)."""
    logits = logits[:: max(1, len(logits) // 50_000)]
    low, high = -30.0, 30.0
    for _ in range(40):
        middle = (low + high) / 2
        if np.mean(1 / (1 + np.exp(-(logits - middle)))) > target_rate:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _choose_comments(rng: np.random.Generator, record_user: np.ndarray, record_first_comment: np.ndarray,
                     record_pool_size: np.ndarray, record_size: np.ndarray, style_preference: np.ndarray,
                     comment_style: np.ndarray, comment_likes: np.ndarray,
                     max_pairs: int = 4_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Each record's `record_size` comments of its video's pool by Gumbel-top-k over the user's style
    preference and the comment's likes: (record, comment) pairs, by record, best score first.
    Scored `max_pairs` (record, candidate) pairs at a time: at KuaiComt size all pairs together are
    ~120M (several GB per array). The Gumbel noise is drawn chunk after chunk, the same stream as one draw,
    so the result does not depend on `max_pairs`."""
    pair_ends = np.cumsum(record_pool_size)
    chosen_records, chosen_comments = [], []
    start = 0
    while start < len(record_pool_size):
        first_pair = pair_ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(pair_ends, first_pair + max_pairs, side="right")))
        pool_size = record_pool_size[start:stop]
        pair_record = np.repeat(np.arange(start, stop), pool_size)
        pair_offsets = np.concatenate([[0], np.cumsum(pool_size)])
        pair_rank = np.arange(len(pair_record)) - pair_offsets[pair_record - start]
        pair_comment = record_first_comment[pair_record] + pair_rank
        score = (COMMENT_STYLE_WEIGHT * style_preference[record_user[pair_record], comment_style[pair_comment]]
                 + COMMENT_LIKES_WEIGHT * np.log1p(comment_likes[pair_comment])
                 + rng.gumbel(size=len(pair_record)))
        order = np.lexsort((-score, pair_record))
        rank_in_record = np.arange(len(order)) - pair_offsets[pair_record[order] - start]
        chosen = order[rank_in_record < record_size[pair_record[order]]]
        chosen_records.append(pair_record[chosen])
        chosen_comments.append(pair_comment[chosen])
        start = stop
    empty = np.zeros(0, dtype=np.int64)
    return np.concatenate([empty, *chosen_records]), np.concatenate([empty, *chosen_comments])


def generate(params: SynthParams, latents: dict[str, np.ndarray] | None = None) -> dict[str, pa.Table]:
    """The five KuaiComt tables, as Arrow tables with the documented schemas. A `latents` dict, if given,
    receives the hidden truths the comment choices were drawn from (for ceiling probes, never for training):
    user_id, style_preference [U, S], comment_id, comment_style [C], comment_choice_weights."""
    rng = np.random.default_rng(params.seed)
    num_topics, num_styles = len(TOPIC_NAMES), len(STYLE_NAMES)
    topic_vocab = np.array([words[:12] for words in TOPICS.values()])
    style_vocab = np.array([words[:10] for words in STYLES.values()])
    window_ms = WINDOW_DAYS * 86_400_000

    # Users: sparse interests that drift, a preferred comment style, an activity level.
    num_users = params.users
    user_ids = _unique_ids(rng, num_users, 100_000_000, 400_000)
    base_interest = rng.dirichlet(np.full(num_topics, 0.2), size=num_users)
    drift_interest = rng.dirichlet(np.full(num_topics, 0.2), size=num_users)
    drift_strength = rng.uniform(0.0, 0.4, size=num_users)
    style_preference = rng.dirichlet(np.full(num_styles, 0.4), size=num_users)
    activity = rng.lognormal(0.0, 0.5, size=num_users)
    impressions = np.maximum(5, np.round(activity / activity.mean() * params.impressions_per_user)).astype(np.int64)

    # Videos: topic (some topics more common), heavy-tailed popularity, upload before/within the window.
    num_videos = params.videos
    video_ids = _unique_ids(rng, num_videos, 10_000_000_000, 5_000_000)
    topic_share = rng.dirichlet(np.full(num_topics, 3.0))
    video_topic = rng.choice(num_topics, size=num_videos, p=topic_share)
    video_popularity = rng.lognormal(0.0, 1.2, size=num_videos)
    video_quality = rng.normal(0.0, 0.5, size=num_videos)
    upload_ms = WINDOW_START_MS + rng.uniform(-60, WINDOW_DAYS * 0.8, size=num_videos) * 86_400_000
    upload_day_ms = (upload_ms // 86_400_000) * 86_400_000
    duration_ms = np.round(np.clip(rng.lognormal(np.log(25_000), 0.7, size=num_videos), 3_000, 600_000))

    # Captions: 3-6 topic words, filler, 1-2 hashtags of the topic.
    caption_columns = [_pick_words(rng, topic_vocab, video_topic, keep) for keep in (1, 1, 1, 0.7, 0.5, 0.3)]
    filler_vocab = np.array([FILLER])
    no_topic = np.zeros(num_videos, dtype=np.int64)
    caption_columns.insert(1, _pick_words(rng, filler_vocab, no_topic, 0.6))
    caption_columns.insert(0, _pick_words(rng, filler_vocab, no_topic, 0.4))
    for keep in (1.0, 0.5):
        tags = _pick_words(rng, topic_vocab, video_topic, keep)
        caption_columns.append(pc.binary_join_element_wise("#", tags, ""))
    captions = _join_words(caption_columns)

    # Comments: per video a Poisson number (at least 1), a style, heavy-tailed likes.
    comments_per_video = np.maximum(1, rng.poisson(params.comments_per_video, size=num_videos))
    num_comments = int(comments_per_video.sum())
    comment_video = np.repeat(np.arange(num_videos), comments_per_video)
    comment_offsets = np.concatenate([[0], np.cumsum(comments_per_video)])
    comment_ids = _unique_ids(rng, num_comments, 100_000_000_000, 3_000_000)
    comment_style = rng.integers(0, num_styles, size=num_comments)
    like_mean = np.log1p(video_popularity[comment_video] * 20) + STYLE_APPEAL[comment_style]
    comment_likes = np.floor(rng.lognormal(like_mean, 1.3)).astype(np.int64)
    comment_topic = video_topic[comment_video]
    content = _join_words([
        _pick_words(rng, style_vocab, comment_style, 1.0),
        _pick_words(rng, topic_vocab, comment_topic, 0.9),
        _pick_words(rng, filler_vocab, np.zeros(num_comments, dtype=np.int64), 0.4),
        _pick_words(rng, topic_vocab, comment_topic, 0.6),
        _pick_words(rng, style_vocab, comment_style, 0.8),
        _pick_words(rng, topic_vocab, rng.integers(0, num_topics, size=num_comments), 0.15),  # noise
    ])

    # Impressions: user, time (sorted per user), topic by current interest or popularity.
    impression_user = np.repeat(np.arange(num_users), impressions)
    num_impressions = len(impression_user)
    time_fraction = rng.random(num_impressions)
    drift_weight = drift_strength[impression_user] * time_fraction
    use_drift = rng.random(num_impressions) < drift_weight
    interest_cdf = np.cumsum(np.concatenate([base_interest, drift_interest]), axis=1)
    interest_cdf /= interest_cdf[:, -1:]
    topic = _sample_from_rows(rng, interest_cdf, impression_user + use_drift * num_users)

    by_topic = np.argsort(video_topic, kind="stable")
    topic_counts = np.bincount(video_topic, minlength=num_topics)
    weights = video_popularity[by_topic] ** 0.7
    within_cumsum = np.cumsum(weights)
    topic_totals = np.bincount(video_topic, weights=video_popularity ** 0.7, minlength=num_topics)
    topic_before = np.concatenate([[0.0], np.cumsum(topic_totals)])[:-1]
    # Topics without videos: fall back to popularity over all videos.
    topic = np.where(topic_counts[topic] > 0, topic, -1)
    draw = rng.random(num_impressions)
    in_topic = topic >= 0
    target_mass = np.where(in_topic, topic_before[np.maximum(topic, 0)] + draw * topic_totals[np.maximum(topic, 0)],
                           draw * within_cumsum[-1])
    video_position = np.minimum(np.searchsorted(within_cumsum, target_mass, side="right"), num_videos - 1)
    by_popularity = rng.random(num_impressions) < 0.2  # popularity-driven feed slots
    global_cdf = np.cumsum(video_popularity) / video_popularity.sum()
    popular_video = np.minimum(np.searchsorted(global_cdf, rng.random(num_impressions), side="right"), num_videos - 1)
    impression_video = np.where(by_popularity | ~in_topic, popular_video, by_topic[video_position])
    # A feed rarely shows a user the same video twice: keep the first impression of each pair.
    _, first = np.unique(impression_user * num_videos + impression_video, return_index=True)
    first.sort()
    impression_user, impression_video = impression_user[first], impression_video[first]
    time_fraction, drift_weight = time_fraction[first], drift_weight[first]
    num_impressions = len(first)

    impression_ms = WINDOW_START_MS + time_fraction * window_ms
    uploaded = upload_ms[impression_video] + 3_600_000
    too_early = impression_ms < uploaded
    impression_ms = np.where(too_early, uploaded + rng.random(num_impressions) * (WINDOW_START_MS + window_ms - uploaded),
                             impression_ms)
    impression_ms = np.floor(impression_ms)

    # Feedback: interest in the video's topic at the impression time, quality, noise.
    shown_topic = video_topic[impression_video]
    interest_now = ((1 - drift_weight) * base_interest[impression_user, shown_topic]
                    + drift_weight * drift_interest[impression_user, shown_topic])
    affinity = 8.0 * np.sqrt(interest_now) + video_quality[impression_video] + rng.normal(0, 0.7, num_impressions)
    is_like = rng.random(num_impressions) < 1 / (1 + np.exp(-(affinity - _calibrate_bias(affinity, params.like_rate))))
    click_rate = min(0.95, params.like_rate * 2.2)
    is_click = is_like | (rng.random(num_impressions) < 1 / (1 + np.exp(-(affinity - _calibrate_bias(affinity, click_rate)))))
    watched_share = np.clip(rng.beta(1.2, 2.5, num_impressions) + 0.5 * is_like + 0.1 * affinity, 0.02, 3.0)
    video_duration = duration_ms[impression_video]
    play_time_ms = np.round(watched_share * video_duration)
    long_view = np.where(video_duration <= 18_000, play_time_ms >= video_duration, play_time_ms >= 18_000)

    open_logit = affinity + 1.5 * is_like
    opens_comments = rng.random(num_impressions) < 1 / (1 + np.exp(-(open_logit - _calibrate_bias(open_logit, params.comment_open_rate))))

    # Comment interactions: per opened section, 1 + Poisson(0.7) comments by Gumbel-top-k over
    # style preference and popularity.
    record_impression = np.flatnonzero(opens_comments)
    record_video = impression_video[record_impression]
    record_user = impression_user[record_impression]
    record_size = np.minimum(1 + rng.poisson(0.7, len(record_impression)), comments_per_video[record_video])
    if latents is not None:
        latents.update(user_id=user_ids, style_preference=style_preference, comment_id=comment_ids,
                       comment_style=comment_style,
                       comment_choice_weights=np.array([COMMENT_STYLE_WEIGHT, COMMENT_LIKES_WEIGHT]))
    chosen_record, chosen_comment = _choose_comments(
        rng, record_user, comment_offsets[record_video], comments_per_video[record_video], record_size,
        style_preference, comment_style, comment_likes)
    delays = rng.integers(3, 90, size=len(chosen_record))
    cumulative = np.cumsum(delays)
    record_first = np.concatenate([[0], np.cumsum(record_size)])[:-1]
    seconds_after = cumulative - (cumulative - delays)[record_first][chosen_record]
    comment_time_s = (impression_ms[record_impression][chosen_record] // 1000 + 2 + seconds_after).astype(np.int64)
    is_reply = rng.random(len(chosen_record)) < 0.15
    comment_is_like = ~is_reply | (rng.random(len(chosen_record)) < 0.3)
    record_seconds = np.zeros(len(record_impression), dtype=np.int64)
    np.maximum.at(record_seconds, chosen_record, seconds_after)
    comment_stay_time = np.zeros(num_impressions, dtype=np.int64)
    comment_stay_time[record_impression] = (record_seconds + 5) * 1000

    hour_minute_local = ((impression_ms + CHINA_OFFSET_MS) % 86_400_000) // 60_000
    user_video_inter = pa.table({
        "user_id": user_ids[impression_user],
        "video_id": video_ids[impression_video],
        "p_hourmin": (hour_minute_local // 60 * 100 + hour_minute_local % 60).astype(np.int64),
        "time_ms": impression_ms.astype(np.float64),
        "is_click": is_click.astype(np.int64),
        "is_like": is_like.astype(np.int64),
        "is_follow": (is_like & (rng.random(num_impressions) < 0.03)).astype(np.int64),
        "is_comment": (opens_comments & (rng.random(num_impressions) < 0.1)).astype(np.int64),
        "is_forward": (is_like & (rng.random(num_impressions) < 0.02)).astype(np.int64),
        "is_collect": (is_like & (rng.random(num_impressions) < 0.05)).astype(np.int64),
        "is_hate": (~is_click & (rng.random(num_impressions) < 0.01)).astype(np.int64),
        "long_view": long_view.astype(np.int64),
        "play_time_ms": play_time_ms.astype(np.float64),
        "duration_ms": video_duration.astype(np.float64),
        "profile_stay_time": np.where(is_like & (rng.random(num_impressions) < 0.05),
                                      rng.integers(1_000, 30_000, num_impressions), 0).astype(np.int64),
        "comment_stay_time": comment_stay_time,
    }, schema=RAW_TABLES["user_video_inter"].schema)
    user_comment_inter = pa.table({
        "user_id": user_ids[record_user[chosen_record]],
        "comment_id": comment_ids[chosen_comment],
        "time_stamp": comment_time_s,
        "photo_id": video_ids[record_video[chosen_record]],
        "is_like": comment_is_like.astype(np.int64),
        "is_reply": is_reply.astype(np.int64),
    }, schema=RAW_TABLES["user_comment_inter"].schema)
    video_features = pa.table({
        "video_id": video_ids,
        "author_id": _unique_ids(rng, num_videos, 1_000_000_000, 300_000),
        "video_type": np.where(rng.random(num_videos) < 0.05, "AD", "NORMAL"),
        "upload_dt": pc.strftime(pa.array(upload_day_ms.astype("datetime64[ms]")), format="%Y-%m-%d"),
        "caption": captions,
        "duration": duration_ms.astype(np.float64),
        "category": np.array(TOPIC_NAMES)[video_topic],
    }, schema=RAW_TABLES["video_features"].schema)
    comment_features = pa.table({
        "comment_id": comment_ids,
        "comment_content": content,
        "video_id": video_ids[comment_video],
        # A snapshot, as the real one: the crowd's likes plus the data set's own users' likes.
        "comment_like_cnt": comment_likes + _own_likes(record_user[chosen_record], chosen_comment, comment_is_like,
                                                       num_comments),
        "comment_reply_out": rng.poisson(comment_likes * 0.08).astype(np.int64),
        "show_comment_cnt_td": (comment_likes * rng.uniform(3, 12, num_comments)).astype(np.int64) + 10,
    }, schema=RAW_TABLES["comment_features"].schema)
    return {
        "user_video_inter": user_video_inter,
        "user_comment_inter": user_comment_inter,
        "video_features": video_features,
        "comment_features": comment_features,
        "user_features": _user_features(rng, user_ids, activity),
    }


def _user_features(rng: np.random.Generator, user_ids: np.ndarray, activity: np.ndarray) -> pa.Table:
    count = len(user_ids)
    degrees = np.array(["high_active", "full_active", "middle_active", "UNKNOWN"])
    follow_ranges = np.array(["0", "(0,10]", "(10,50]", "(50,100]", "(100,150]", "(150,250]", "(250,500]", "500+"])
    fans_ranges = np.array(["0", "[1,10)", "[10,100)", "[100,1k)", "[1k,5k)", "[5k,1w)", "[1w,10w)"])
    friend_ranges = np.array(["0", "[1,5)", "[5,30)", "[30,60)", "[60,120)", "[120,250)", "250+"])
    follow_count = np.floor(rng.lognormal(4.0, 1.2, count)).astype(np.int64)
    fans_count = np.floor(rng.lognormal(2.5, 1.8, count)).astype(np.int64)
    follow_bins = np.searchsorted([1, 11, 51, 101, 151, 251, 501], follow_count, side="right")
    fans_bins = np.minimum(np.searchsorted([1, 10, 100, 1_000, 5_000, 10_000], fans_count, side="right"), 6)
    feature_sizes = [2, 7, 55, 1686, 6, 10, 3, 53, 392, 7, 5, 7] + [2] * 8 + [5]
    columns = {
        "user_id": user_ids,
        "user_active_degree": degrees[np.clip(3 - np.round(activity).astype(int), 0, 3)],
        "is_live_author": (rng.random(count) < 0.05).astype(np.int64),
        "produce_video_num": rng.poisson(3, count).astype(np.int64),
        "follow_count": follow_count,
        "follow_user_num_range": follow_ranges[follow_bins],
        "fans_count": fans_count,
        "fans_user_num_range": fans_ranges[fans_bins],
        "friend_user_num_range": friend_ranges[rng.integers(0, 7, count)],
        "register_days": rng.integers(30, 3_000, count).astype(np.int64),
    }
    for i, size in enumerate(feature_sizes):
        columns[f"onehot_feat{i}"] = rng.integers(0, size, count).astype(np.int64)
    return pa.table(columns, schema=RAW_TABLES["user_features"].schema)
