"""The LLM prompts of stage 1 (METHOD 4.2): a user's two histories as numbered lines in the paper's
templates, in English or the original Chinese, cut to a token budget by dropping the OLDEST lines.

Lines (numbered from 1 within each history, joined by "\\n"):
    video history:    "1. Video title: {title}; Hot comment: {comment}"
    comment history:  "1. Video title: {title}; User-interacted comments: {'c1', 'c2'}"
(the comment list is Python's list repr with [] replaced by {}, as in the official data.py).

Two templates per task (index 0: video history first; 1: comment history first). Training picks one
uniformly at random, evaluation and the frozen-LLM encoding use template 0 (`encode.prompt_template`).
The prompt is used raw, without the model's chat template, as the paper feeds the instruction text.

Budget: the prompt must fit `max_prompt_tokens` tokens of the real tokenizer. Lines are dropped
oldest-first across both histories by recency rank (the oldest line of either history goes first;
at equal age the video line goes first), chosen for all prompts at once from per-line token counts,
then checked by tokenizing the rendered prompts (numbers and joins make counts slightly non-additive)
and trimmed further where still too long.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lsvcr.data.prepared import COMMENTS_FILE, has_comments, read_table, read_videos
from lsvcr.errors import ConfigError
from lsvcr.history_views import STAGE_ONE_COMMENTS_PER_RECORD, hot_comment_picks, record_comments_for
from lsvcr.sample_arrays import HOT_COMMENTS, first_items_padded, last_items_padded, last_records_padded

TASKS = ("video", "comment")

# --- the paper's templates (official prompt.py), Chinese originals and English translations -------

_ZH_VIDEO_FIRST = (
    "在短视频平台上，用户的视频交互历史由一系列按交互时间顺序排列的点赞短视频组成，"
    "每个短视频包含视频标题和一个相关的热门评论。评论区交互历史则包含多个短视频下的评论交互记录，"
    "每条记录包含视频标题和用户交互评论。"
)
_ZH_COMMENT_FIRST = (
    "在短视频平台上，用户的评论区交互历史包含多个短视频下的评论交互记录，"
    "每条记录包含视频标题和用户交互评论。视频交互历史则由一系列按交互时间顺序排列的点赞短视频组成，"
    "每个短视频包含视频标题和一个相关的热门评论。"
)
_EN_VIDEO_FIRST = (
    "On the short-video platform, a user's video interaction history consists of a series of liked short "
    "videos in chronological order of interaction; each short video contains the video title and one related "
    "hot comment. The comment-section interaction history contains comment interaction records under several "
    "short videos; each record contains the video title and the user's interacted comments. "
)
_EN_COMMENT_FIRST = (
    "On the short-video platform, a user's comment-section interaction history contains comment interaction "
    "records under several short videos; each record contains the video title and the user's interacted "
    "comments. The video interaction history consists of a series of liked short videos in chronological "
    "order of interaction; each short video contains the video title and one related hot comment. "
)

TEMPLATES: dict[tuple[str, str], tuple[str, str]] = {
    ("video", "zh"): (
        _ZH_VIDEO_FIRST + "现在，一个用户的短视频交互历史如下：\n{photo_his}\n\n"
        "评论区交互历史如下：\n{comment_his}\n\n请基于他的短视频交互历史和评论区交互历史记录为他推荐下一个视频：\n",
        _ZH_COMMENT_FIRST + "现在，一个用户的评论区交互历史如下：\n{comment_his}\n\n"
        "短视频交互历史如下：\n{photo_his}\n\n请基于他的评论区交互历史记录和短视频交互历史为他推荐下一个视频：\n",
    ),
    ("comment", "zh"): (
        _ZH_VIDEO_FIRST + "一个用户的短视频交互历史如下：\n{photo_his}\n\n"
        "评论区交互历史如下：\n{comment_his}\n\n现在他正在观看视频：{photo}\n"
        "请根据他的短视频和评论区交互记录以及当前视频内容生成一条其可能交互的评论：\n",
        _ZH_COMMENT_FIRST + "一个用户的评论区交互历史如下：\n{comment_his}\n\n"
        "短视频交互历史如下：\n{photo_his}\n\n现在他正在观看视频：{photo}\n"
        "请根据他的评论区和短视频交互记录以及当前视频内容生成一条其可能交互的评论：\n",
    ),
    ("video", "en"): (
        _EN_VIDEO_FIRST + "Now, a user's short-video interaction history is as follows:\n{photo_his}\n\n"
        "The comment-section interaction history is as follows:\n{comment_his}\n\n"
        "Based on his short-video interaction history and comment-section interaction history, "
        "recommend the next video for him:\n",
        _EN_COMMENT_FIRST + "Now, a user's comment-section interaction history is as follows:\n{comment_his}\n\n"
        "The short-video interaction history is as follows:\n{photo_his}\n\n"
        "Based on his comment-section interaction history and short-video interaction history, "
        "recommend the next video for him:\n",
    ),
    ("comment", "en"): (
        _EN_VIDEO_FIRST + "A user's short-video interaction history is as follows:\n{photo_his}\n\n"
        "The comment-section interaction history is as follows:\n{comment_his}\n\n"
        "Now he is watching the video: {photo}\n"
        "Based on his short-video and comment-section interaction records and the current video content, "
        "generate a comment he is likely to interact with:\n",
        _EN_COMMENT_FIRST + "A user's comment-section interaction history is as follows:\n{comment_his}\n\n"
        "The short-video interaction history is as follows:\n{photo_his}\n\n"
        "Now he is watching the video: {photo}\n"
        "Based on his comment-section and short-video interaction records and the current video content, "
        "generate a comment he is likely to interact with:\n",
    ),
}

LINE_FORMATS: dict[str, tuple[str, str]] = {  # (video-history body, comment-history body)
    "zh": ("视频标题：{title}；热门评论：{comment}", "视频标题：{title}；用户交互评论：{comments}"),
    "en": ("Video title: {title}; Hot comment: {comment}", "Video title: {title}; User-interacted comments: {comments}"),
}


def template(task: str, language: str, index: int) -> str:
    if (task, language) not in TEMPLATES:
        raise ConfigError(f"no prompt template for task={task!r}, language={language!r} "
                          f"(tasks: {', '.join(TASKS)}; languages: en, zh)")
    if index not in (0, 1):
        raise ConfigError(f"encode.prompt_template must be 0 or 1; got {index}")
    return TEMPLATES[task, language][index]


def comment_list_text(comments: list[str]) -> str:
    """`['a', 'b']` → `{'a', 'b'}` (the official rendering of a record's comments)."""
    return "{" + repr(list(comments))[1:-1] + "}"


# --- item texts of a PREPARED directory ---------------------------------------------------------


@dataclass
class ItemTexts:
    """Texts by PREPARED index (row 0 = padding = empty string) and each video's comment pool."""

    captions: np.ndarray  # object [V+1]
    contents: np.ndarray  # object [C+1]
    hot_comments: np.ndarray  # int64 [V+1, P] comment_idx by likes desc, 0-padded


def _captions(videos) -> np.ndarray:
    captions = np.empty(videos.num_rows + 1, dtype=object)
    captions[0] = ""
    captions[videos["video_idx"].to_numpy()] = videos["caption"].fill_null("").to_numpy(zero_copy_only=False)
    return captions


def load_captions(prepared_dir: str | Path) -> np.ndarray:
    """Video captions by PREPARED index (row 0 = ""), without reading the comment texts."""
    return _captions(read_videos(prepared_dir, ["video_idx", "caption"]))


def load_item_texts(prepared_dir: str | Path) -> ItemTexts:
    videos = read_videos(prepared_dir, ["video_idx", "caption", "hot_comments"])
    captions = _captions(videos)
    pool = first_items_padded(videos["hot_comments"])
    hot_comments = np.zeros((videos.num_rows + 1, pool.shape[1]), dtype=np.int64)
    hot_comments[videos["video_idx"].to_numpy()] = pool
    contents = np.array([""], dtype=object)
    if has_comments(prepared_dir):
        comments = read_table(prepared_dir, COMMENTS_FILE, ["comment_idx", "content"])
        contents = np.empty(comments.num_rows + 1, dtype=object)
        contents[0] = ""
        contents[comments["comment_idx"].to_numpy()] = comments["content"].fill_null("").to_numpy(zero_copy_only=False)
    return ItemTexts(captions=captions, contents=contents, hot_comments=hot_comments)


# --- prompt building ----------------------------------------------------------------------------


@dataclass
class PromptHistories:
    """Padded index arrays of a set of samples (0 = padding, right-padded, oldest first)."""

    video_history: np.ndarray  # [N, Lv] video_idx
    hot_comment: np.ndarray  # [N, Lv] comment_idx shown with each history video (0: none)
    comment_history_videos: np.ndarray  # [N, Lc] video_idx of each record
    comment_history_comments: np.ndarray  # [N, Lc, K] the user's comments in each record (≤3 shown)
    current_video: np.ndarray  # [N] the video being watched (comment task; ignored for video)


class PromptBuilder:
    """Renders stage-1 prompts for many samples at once under a token budget."""

    def __init__(self, tokenizer, texts: ItemTexts, *, language: str = "en", max_prompt_tokens: int = 768,
                 comments_per_record: int = 3):
        if language not in LINE_FORMATS:
            raise ConfigError(f"encode.language must be one of {', '.join(LINE_FORMATS)}; got {language!r}")
        self.tokenizer = tokenizer
        self.texts = texts
        self.language = language
        self.max_prompt_tokens = max_prompt_tokens
        self.comments_per_record = comments_per_record

    def _count(self, strings: list[str]) -> np.ndarray:
        if not strings:
            return np.zeros(0, dtype=np.int64)
        ids = self.tokenizer(strings, add_special_tokens=False)["input_ids"]
        return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(strings))

    def _bodies(self, histories: PromptHistories) -> tuple[np.ndarray, np.ndarray]:
        """Line bodies (without the "i. " number) as object arrays [N, Lv] and [N, Lc]; '' at padding."""
        video_format, comment_format = LINE_FORMATS[self.language]
        captions, contents = self.texts.captions, self.texts.contents
        video_bodies = np.full(histories.video_history.shape, "", dtype=object)
        valid = histories.video_history != 0
        video_bodies[valid] = [
            video_format.format(title=title, comment=comment)
            for title, comment in zip(captions[histories.video_history[valid]], contents[histories.hot_comment[valid]])
        ]
        comment_bodies = np.full(histories.comment_history_videos.shape, "", dtype=object)
        valid = histories.comment_history_videos != 0
        shown = histories.comment_history_comments[valid][:, : self.comments_per_record]
        comment_bodies[valid] = [
            comment_format.format(title=title, comments=comment_list_text([contents[c] for c in row if c != 0]))
            for title, row in zip(captions[histories.comment_history_videos[valid]], shown)
        ]
        return video_bodies, comment_bodies

    def _line_costs(self, bodies: np.ndarray) -> np.ndarray:
        """Tokens of each line incl. its "i. " number and the joining newline (0 at padding)."""
        costs = np.zeros(bodies.shape, dtype=np.int64)
        valid = bodies != ""
        if valid.any():  # the same video line recurs across users: tokenize each distinct body once
            distinct, inverse = np.unique(bodies[valid].astype(str), return_inverse=True)
            costs[valid] = self._count(distinct.tolist())[inverse] + 4  # "12. " ≈ 3 tokens + "\n"
        return costs

    @staticmethod
    def _keep_by_recency(video_costs: np.ndarray, comment_costs: np.ndarray, budget: np.ndarray):
        """Masks of kept lines: oldest dropped first across both histories (vectorised over prompts).

        A line's age rank is its distance from the newest line of its history. Ranks are kept from
        0 upward while the cumulative cost fits; at the first rank that does not fit, the comment line
        (dropped after the video line of the same age) is kept alone if it fits.
        """
        count = len(budget)
        width = max(video_costs.shape[1], comment_costs.shape[1], 1)

        def by_rank(costs: np.ndarray) -> np.ndarray:  # [N, L≥1] oldest-first → [N, width] newest-first
            lengths = (costs > 0).sum(axis=1)
            rank = np.arange(width)[None, :]
            index = np.clip(lengths[:, None] - 1 - rank, 0, None)
            gathered = np.take_along_axis(costs, np.minimum(index, costs.shape[1] - 1), axis=1)
            return np.where(rank < lengths[:, None], gathered, 0)

        video_by_rank, comment_by_rank = by_rank(video_costs), by_rank(comment_costs)
        cumulative = np.cumsum(video_by_rank + comment_by_rank, axis=1)
        full_ranks = (cumulative <= budget[:, None]).sum(axis=1)  # ranks 0..full_ranks-1 fit entirely
        spent = np.where(full_ranks > 0, cumulative[np.arange(count), np.maximum(full_ranks - 1, 0)], 0)
        partial_rank = np.minimum(full_ranks, width - 1)
        extra_comment = (full_ranks < width) & (
            spent + comment_by_rank[np.arange(count), partial_rank] <= budget
        ) & (comment_by_rank[np.arange(count), partial_rank] > 0)

        def mask(costs: np.ndarray, ranks_kept: np.ndarray) -> np.ndarray:
            lengths = (costs > 0).sum(axis=1)
            position_rank = lengths[:, None] - 1 - np.arange(costs.shape[1])[None, :]
            return (position_rank >= 0) & (position_rank < ranks_kept[:, None])

        return mask(video_costs, full_ranks), mask(comment_costs, full_ranks + extra_comment)

    @staticmethod
    def _numbered(bodies: np.ndarray, keep: np.ndarray) -> list[str]:
        return ["\n".join(f"{i}. {body}" for i, body in enumerate(row[kept], start=1))
                for row, kept in zip(bodies, keep)]

    def history_budget(self, task: str, current_titles: np.ndarray, template_index: np.ndarray) -> np.ndarray:
        """Tokens left for the history lines of each prompt once its template (and current title) is
        rendered; a ConfigError when even the bare template does not fit `max_prompt_tokens`."""
        skeletons = [template(task, self.language, int(t)).format(photo_his="", comment_his="", photo=title)
                     for t, title in zip(template_index, current_titles)]
        budget = self.max_prompt_tokens - self._count(skeletons)
        if (budget < 0).any():
            with_title = " with the longest current-video title" if task == "comment" else ""
            raise ConfigError(f"encode.max_prompt_tokens={self.max_prompt_tokens} is smaller than the {task} prompt "
                              f"template itself ({int(self.max_prompt_tokens - budget.min())} tokens{with_title}): "
                              "raise it")
        return budget

    def check_budget(self, task: str, current_videos: np.ndarray, template_index: int) -> None:
        """The template-fits check of `build`, run once per distinct current video (a cheap pre-flight on
        the driver, so a too-small budget is reported before any encoding starts)."""
        titles = self.texts.captions[np.unique(current_videos)] if task == "comment" else np.full(1, "", dtype=object)
        self.history_budget(task, titles, np.full(len(titles), template_index, dtype=np.int64))

    def build(self, task: str, histories: PromptHistories, template_index: int | np.ndarray = 0) -> list[str]:
        """One prompt per row; `template_index` a scalar or one 0/1 per row."""
        templates = (template(task, self.language, 0), template(task, self.language, 1))
        count = len(histories.video_history)
        template_index = np.broadcast_to(np.asarray(template_index, dtype=np.int64), (count,))
        current_titles = (self.texts.captions[histories.current_video] if task == "comment"
                          else np.full(count, "", dtype=object))
        budget = self.history_budget(task, current_titles, template_index)
        video_bodies, comment_bodies = self._bodies(histories)
        video_costs, comment_costs = self._line_costs(video_bodies), self._line_costs(comment_bodies)
        video_keep, comment_keep = self._keep_by_recency(video_costs, comment_costs, budget)

        def render(rows: np.ndarray) -> list[str]:
            return [templates[template_index[r]].format(photo_his=video_text, comment_his=comment_text,
                                                        photo=current_titles[r])
                    for r, video_text, comment_text in zip(
                        rows, self._numbered(video_bodies[rows], video_keep[rows]),
                        self._numbered(comment_bodies[rows], comment_keep[rows]))]

        prompts = np.array(render(np.arange(count)) if count else [], dtype=object)
        # The estimate is close but not exact: drop one more oldest line where still too long.
        for _ in range(video_costs.shape[1] + comment_costs.shape[1] + 1):
            over = np.flatnonzero(self._count(list(prompts)) > self.max_prompt_tokens)
            if len(over) == 0:
                break
            budget[over] -= np.maximum(1, (video_costs[over].max(axis=1) + comment_costs[over].max(axis=1)) // 2)
            video_keep[over], comment_keep[over] = self._keep_by_recency(
                video_costs[over], comment_costs[over], budget[over])
            prompts[over] = render(over)
        return list(prompts)


def histories_from_samples(table, texts: ItemTexts, history_length: int, *, rng: np.random.Generator | None = None,
                           max_comments_per_record: int = 64) -> PromptHistories:
    """Sample rows (PREPARED `*_samples.*.parquet` as an Arrow table) → padded prompt histories.

    `rng=None` (encoding, evaluation): the top hot comment and the record's first 3 comments;
    with an `rng` (training): a random hot comment among the top 3 and a random subset of ≤3 comments.
    The rule is `lsvcr.history_views`' (`hot_comment_picks`, `record_comments_for`), so the SR model of frozen
    alignment (`make_batch(..., deterministic_views=True)`) sees exactly what these prompts show.
    """
    video_history = last_items_padded(table["video_history"], history_length)
    hot_count = np.minimum((texts.hot_comments != 0).sum(axis=1), HOT_COMMENTS)
    hot_comment = hot_comment_picks(video_history, texts.hot_comments, hot_count, rng)
    records = record_comments_for(
        last_records_padded(table["comment_history_comments"], history_length, max_comments_per_record), rng,
        STAGE_ONE_COMMENTS_PER_RECORD)
    return PromptHistories(
        video_history=video_history,
        hot_comment=hot_comment,
        comment_history_videos=last_items_padded(table["comment_history_videos"], history_length),
        comment_history_comments=records,
        current_video=table["target_video"].to_numpy().astype(np.int64),
    )
