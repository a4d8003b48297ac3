"""Video moments in search results: group a ranked list of rows per video, the best moment first.

A video's shots are rows like photos, so the ANN search, the filters and the re-ranker rank them as
photos. Grouping then folds every shot of one video into the hit of its best-ranked shot, which keeps
the next matching shots as its `moments` (best first, the best itself included): a result page lists
each video once, at the rank of its best moment.
"""
from __future__ import annotations

from typing import Optional

MAX_MOMENTS = 8  # moments kept per video hit
GROUP_DEPTH = 4  # search this many candidates per hit asked for, so grouping can still fill a page


def group_key(row_id: int, times: dict) -> tuple:
    t = times.get(row_id)
    return ("video", t["video_id"]) if t else ("row", row_id)


def count_groups(ids, times: dict) -> int:
    return len({group_key(i, times) for i in ids})


def moment(row_id: int, score: float, t: dict) -> dict:
    return {"id": row_id, "score": score, "start_s": t["start_s"], "end_s": t["end_s"], "frame_s": t["frame_s"]}


def group(ordered: list[tuple], times: dict, page_end: int, max_moments: int = MAX_MOMENTS) -> list[tuple]:
    """ordered: [(id, final, similarity, itm)] best first; times: shot_times of the video rows among them.
    Returns [(id, final, similarity, itm, moments or None)] best first, one entry per video or photo. A
    video's further moments are kept when they score at least halfway from what the hit at `page_end`
    (the last one the caller shows) scores to what the video's best moment scores: each would have made
    the page on its own, and is closer to the best moment than to the page's weakest hit."""
    out: list[list] = []
    where: dict = {}
    for entry in ordered:
        i, final = entry[0], entry[1]
        key = group_key(i, times)
        if key[0] == "row":
            out.append([*entry, None])
            continue
        if key not in where:
            where[key] = len(out)
            out.append([*entry, []])
        moments = out[where[key]][4]
        if len(moments) < max_moments:
            moments.append(moment(i, final, times[i]))
    if out:
        floor = out[min(page_end, len(out)) - 1][1]
        for g in out:
            if g[4]:
                bar = floor + 0.5 * max(0.0, g[1] - floor)
                g[4] = g[4][:1] + [m for m in g[4][1:] if m["score"] >= bar]
    return [tuple(g) for g in out]


def clock(seconds: Optional[float]) -> str:
    """01:23, or 1:02:03 past an hour (how the CLI table shows a moment)."""
    if seconds is None:
        return ""
    s = int(max(0.0, seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"
