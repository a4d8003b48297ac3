"""Issue 29, shots not frames: videos generated with PyAV (tiny, a few seconds) with known cut times, a black
intro, fades, a still scene, a variable frame rate, a rotated phone video, long GOPs, a long film under a frame
budget; and the files that must fail with a reason (truncated, audio only, not a video)."""
import numpy as np
import pytest

from mmsearch import shots, video
from mmsearch.datasets.synth import draw_scene
from mmsearch.datasets.synthvideo import Segment, write_audio_only, write_video
from mmsearch.errors import MediaError

STEP = video.SAMPLE_STEP_S
A = draw_scene([("red", "circle", (0.3, 0.5), 0.22)], "gray", 96)
B = draw_scene([("blue", "square", (0.7, 0.5), 0.22)], "beige", 96)
C = draw_scene([("yellow", "triangle", (0.5, 0.5), 0.25)], "teal", 96)
D = draw_scene([("green", "diamond", (0.5, 0.3), 0.2), ("purple", "circle", (0.5, 0.75), 0.15)], "gray", 96)
E = draw_scene([("orange", "square", (0.27, 0.5), 0.18), ("white", "circle", (0.73, 0.5), 0.18)], "teal", 96)
# a black intro, A with motion, B fading out to black, a black gap, C fading in, a still D, a hard cut to E;
# the cuts fall between the 0.5 s keyframes, so the sampling step is what the boundaries are checked against
SCENES = [Segment(1.2, (0, 0, 0)), Segment(2.7, A, moving_dot=True), Segment(3.4, B, fade_out=0.8),
          Segment(0.9, (0, 0, 0)), Segment(3.3, C, fade_in=0.6), Segment(12.6, D), Segment(2.4, E, moving_dot=True)]


def truth(info):
    """(start, end) of every scene that is not black."""
    return [(s, e) for (s, e, _), seg in zip(info["scenes"], SCENES) if not isinstance(seg.picture, tuple)]


def check_shots(got, want, fades=(0.8, 0.6)):
    assert len(got) == len(want), [(s.start_s, s.end_s) for s in got]
    for n, (s, (start, end)) in enumerate(zip(got, want)):
        slack = STEP + (fades[1] if n == 2 else 0)  # a fade-in's darkest frames count as black
        assert start - 1e-6 <= s.start_s <= start + slack + 1e-6, (n, s.start_s, start)
        end_slack = STEP + (fades[0] if n == 1 else 0)
        assert end - 1e-6 - end_slack <= s.end_s <= end + STEP + 1e-6, (n, s.end_s, end)
        assert start <= s.frame_s < end, (n, s.frame_s, start, end)  # its picture is of its own scene


@pytest.mark.parametrize("ext,kw", [(".mp4", {}), (".webm", {}), (".mkv", {"vfr": True}), (".avi", {})])
def test_shot_boundaries_within_one_sampling_step(tmp_path, ext, kw):
    """Black intro skipped, a fade is no cut and its black gap is no shot, a moving dot and a long still scene
    are one shot each; containers mp4 (H.264), webm (VP8), mkv at a variable frame rate, avi (MPEG-4)."""
    info = write_video(tmp_path / f"v{ext}", SCENES, size=(128, 72), **kw)
    got = video.read_shots(info["path"], 64)
    check_shots(got.shots, truth(info))
    assert (got.width, got.height) == (128, 72) and got.duration_s == pytest.approx(info["duration"], abs=0.2)
    assert got.sampled <= int(info["duration"] / STEP) + 2  # one frame a second at most, never every frame
    fade_b = got.shots[1]
    assert fade_b.frame_s < truth(info)[1][1] - 0.8  # B's picture is not one of its fading frames


def test_the_picture_of_a_shot_is_its_scene(tmp_path):
    info = write_video(tmp_path / "v.mp4", SCENES, size=(128, 72))
    got = video.read_shots(info["path"], 64)
    for s, pic in zip(got.shots, (A, B, C, D, E)):
        want = np.asarray(pic.resize((128, 72)).resize(s.image.size), np.float32)
        assert np.abs(np.asarray(s.image, np.float32) - want).mean() < 12


def test_a_long_gop_is_decoded_in_full(tmp_path):
    """Keyframes 20 s apart (longer than MAX_KEY_GAP_S): the frames between them are sampled, so the cuts
    inside the GOP are still found within one step."""
    segs = [Segment(4.3, A), Segment(5.4, B), Segment(4.1, C), Segment(6.2, E)]
    info = write_video(tmp_path / "v.mp4", segs, size=(128, 72), gop=200,
                       options={"x264-params": "scenecut=0:keyint=200:min-keyint=200"})
    got = video.read_shots(info["path"], 64)
    starts = [s.start_s for s in got.shots]
    assert len(starts) == 4
    for s, (start, _, _) in zip(starts, info["scenes"]):
        assert start <= s <= start + STEP + 1e-6


def test_rotated_phone_video_is_read_upright(tmp_path):
    """A phone held upright stores its frames sideways with a display matrix (rotation 90): the shot's
    picture, its size and frame_at are as displayed."""
    portrait = np.zeros((128, 72, 3), np.uint8)
    portrait[:64] = (220, 30, 30)  # red on top
    portrait[64:] = (30, 60, 220)  # blue below
    stored = np.ascontiguousarray(np.rot90(portrait, -1))  # turned clockwise: 72 high, 128 wide
    info = write_video(tmp_path / "phone.mp4", [Segment(3.0, stored)], size=(128, 72), rotation=90)
    got = video.read_shots(info["path"], 64)
    assert (got.width, got.height, got.rotation) == (72, 128, 90)
    for img in (got.shots[0].image, video.frame_at(info["path"], 1.0, 64)):
        arr = np.asarray(img, np.float32)
        assert arr.shape[0] > arr.shape[1]  # portrait
        top, bottom = arr[: arr.shape[0] // 4].mean((0, 1)), arr[-arr.shape[0] // 4:].mean((0, 1))
        assert top[0] > 150 and top[2] < 100 and bottom[2] > 150 and bottom[0] < 100


def test_frame_budget_bounds_a_long_video(tmp_path):
    """A 4-minute video with a budget of 20 frames: 20 frames sampled, spread over all of it; a still scene
    becomes segments of at most MAX_SHOT_S, so an open shot never holds more than that many pictures."""
    segs = [Segment(120.0, A), Segment(120.0, C)]
    info = write_video(tmp_path / "long.mp4", segs, size=(64, 64), fps=2, gop=1)
    got = video.read_shots(info["path"], 64, frames=20)
    assert got.sampled == 20
    assert got.shots[0].start_s == 0 and got.shots[-1].end_s == pytest.approx(240.0, abs=1)
    assert any(s.start_s == pytest.approx(120.0, abs=240 / 20 + 1e-6) for s in got.shots)  # the cut, within a step
    full = video.read_shots(info["path"], 64, frames=1000)
    assert max(s.end_s - s.start_s for s in full.shots) <= shots.MAX_SHOT_S + STEP + 1e-6
    assert len(full.shots) == 8  # two 120 s scenes, four segments each


def test_black_only_video_is_one_shot(tmp_path):
    info = write_video(tmp_path / "dark.mp4", [Segment(3.0, (0, 0, 0))], size=(64, 64))
    got = video.read_shots(info["path"], 64)
    assert len(got.shots) == 1 and got.shots[0].start_s == 0 and got.shots[0].end_s == pytest.approx(3.0, abs=0.2)


def test_bad_videos_fail_with_a_reason(tmp_path):
    info = write_video(tmp_path / "ok.mkv", SCENES[:3], size=(64, 64))
    data = (tmp_path / "ok.mkv").read_bytes()
    (tmp_path / "truncated.mkv").write_bytes(data[: len(data) // 2])
    mp4 = write_video(tmp_path / "ok.mp4", SCENES[:3], size=(64, 64))["path"]
    (tmp_path / "truncated.mp4").write_bytes(open(mp4, "rb").read()[:3000])
    write_audio_only(tmp_path / "voice.mp4")
    (tmp_path / "text.webm").write_text("not a video")
    (tmp_path / "empty.mov").write_bytes(b"")
    assert info["duration"] > 5
    expect = {"truncated.mkv": "truncated video", "truncated.mp4": "truncated", "voice.mp4": "no video stream",
              "text.webm": "not a video", "empty.mov": "empty file", "missing.avi": "file not found"}
    for name, reason in expect.items():
        with pytest.raises(MediaError) as err:
            video.read_shots(tmp_path / name, 64)
        assert reason in err.value.reason and str(tmp_path) not in err.value.reason, err.value.reason


def test_cut_rules_on_thumbnails():
    """The cutter's comparisons: a fade (brightness scaled) and a small motion are no cut; the same colours
    in other places (a swapped scene) and another scene are."""
    a = shots.thumbnail(np.asarray(A.resize((128, 72))))
    assert not shots.is_cut(a, a * 0.45)
    moved = shots.thumbnail(np.roll(np.asarray(A.resize((128, 72))), 4, axis=1))  # 4 px to the right
    assert not shots.is_cut(a, moved)
    swapped = shots.thumbnail(np.asarray(A.resize((128, 72)).transpose(0)))  # mirrored: the circle moves over
    assert shots.is_cut(a, swapped)
    assert shots.is_cut(a, shots.thumbnail(np.asarray(B.resize((128, 72)))))
    assert shots.is_blank(np.zeros((24, 24, 3))) and shots.is_blank(np.full((24, 24, 3), 250.0))
    assert not shots.is_blank(np.full((24, 24, 3), (0, 0, 200.0)))  # saturated blue is a colour, not black
