"""Attention videos (dino.viz.video): frames round-trip through the writer; bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dino.errors import DinoError
from dino.models.backbones import build_backbone
from dino.viz.video import attention_video, read_frames, write_video

iio = pytest.importorskip("imageio.v3")
pytest.importorskip("av")


def _frames(n: int = 4, h: int = 32, w: int = 48) -> list[np.ndarray]:
    """Flat-coloured frames, distinct from one another (what lossy codecs keep well)."""
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (90, 90, 90)]
    return [np.full((h, w, 3), colors[i % len(colors)], np.uint8) for i in range(n)]


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_writer_round_trips_frames(tmp_path, suffix: str) -> None:
    frames = _frames()
    path = tmp_path / f"out{suffix}"
    assert write_video(iter(frames), path, fps=5) == 4
    back, fps = read_frames(path)
    back = [np.asarray(f) for f in back]
    assert len(back) == 4
    assert fps == pytest.approx(5, rel=0.05)
    for a, b in zip(frames, back, strict=True):
        assert b.shape == a.shape
        # GIF palettes and H.264 keep flat colours within a few levels
        assert np.abs(b.astype(int) - a.astype(int)).mean() < 6
    assert not list(tmp_path.glob(".*partial*"))


def test_odd_sides_are_cropped_for_h264(tmp_path) -> None:
    path = tmp_path / "odd.mp4"
    write_video(iter(_frames(2, 33, 47)), path, fps=4)
    back = [np.asarray(f) for f in read_frames(path)[0]]
    assert back[0].shape == (32, 46, 3)


def test_undecodable_video_is_one_sentence(tmp_path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video at all" * 10)
    with pytest.raises(DinoError, match=r"cannot decode .*broken\.mp4 as a video"):
        read_frames(bad)
    with pytest.raises(DinoError, match="does not exist"):
        read_frames(tmp_path / "missing.mp4")


def test_failed_write_keeps_the_earlier_file(tmp_path) -> None:
    path = tmp_path / "kept.gif"
    path.write_bytes(b"an earlier result")

    def broken():
        yield _frames(1)[0]
        raise DinoError("cannot decode a frame of clip.mp4 (truncated)")

    with pytest.raises(DinoError, match="truncated"):
        write_video(broken(), tmp_path / "kept.mp4", fps=5)
    with pytest.raises(DinoError, match="no frame"):
        write_video(iter([]), path, fps=5)
    assert path.read_bytes() == b"an earlier result"
    assert not (tmp_path / "kept.mp4").exists()
    with pytest.raises(DinoError, match="name the output .mp4 or .gif"):
        write_video(iter(_frames(1)), tmp_path / "x.avi", fps=5)


def test_attention_video_of_a_folder_of_frames(tmp_path) -> None:
    torch.manual_seed(0)
    vit = build_backbone("vit_pico", 8, 32, 2).eval()
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(_frames(3, 35, 40)):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    res = attention_video(vit, folder, tmp_path / "att.gif", mean=[0.5] * 3, std=[0.25] * 3)
    assert res["frames"] == 3 and res["fps"] == 10.0
    back = iio.imread(tmp_path / "att.gif", index=None)
    # frame 32x40 (cropped to the patch grid) | mean | 3 heads, with 2-px gaps
    assert back.shape == (3, 32, 5 * 40 + 4 * 2, 3)


def test_convnet_video_is_one_sentence(tmp_path) -> None:
    net = build_backbone("tv:resnet18").eval()
    with pytest.raises(DinoError, match="attention maps need a ViT backbone"):
        attention_video(net, tmp_path / "missing", tmp_path / "out.mp4")
    assert not (tmp_path / "out.mp4").exists()
