"""Frames of the torch envs, drawn with torch ops for all envs at once, and GIFs of episodes.

A :class:`Canvas` maps a rectangle of the world onto a pixel grid (``y`` up, as in the envs);
its shapes are boolean masks over ``(num_envs, height, width)`` painted with ``torch.where``, so a
frame of every env costs a few tensor ops on the env's device. No anti-aliasing: these frames are
for looking at a policy, not for learning from pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crl_fast.envs.base import GoalObs, TorchGoalVectorEnv, checked_frames

Colour = tuple[int, int, int]


class Canvas:
    """Pixels of the world rectangle ``lo``-``hi`` at ``pixels_per_unit``; ``x`` and ``y`` hold
    the world coordinates of the pixel centres, shaped to broadcast over ``(n, height, width)``."""

    def __init__(
        self,
        lo: tuple[float, float],
        hi: tuple[float, float],
        pixels_per_unit: float,
        device: torch.device | str,
    ) -> None:
        self.width = round((hi[0] - lo[0]) * pixels_per_unit)
        self.height = round((hi[1] - lo[1]) * pixels_per_unit)
        centre = torch.arange(max(self.width, self.height), device=device) + 0.5
        self.x = (lo[0] + centre[: self.width] / pixels_per_unit).view(1, 1, -1)
        self.y = (hi[1] - centre[: self.height] / pixels_per_unit).view(1, -1, 1)

    def fill(self, num_envs: int, background: torch.Tensor | Colour) -> torch.Tensor:
        """``num_envs`` uint8 frames ``(n, height, width, 3)`` of one colour or a
        ``(height, width, 3)`` image."""
        device = self.x.device
        image = torch.as_tensor(background, dtype=torch.uint8, device=device)
        image = image.expand(self.height, self.width, 3)
        return image.expand(num_envs, -1, -1, -1).clone()

    @staticmethod
    def paint(frames: torch.Tensor, mask: torch.Tensor, colour: Colour) -> torch.Tensor:
        """``frames`` with ``colour`` where ``mask`` ``(n or 1, height, width)``."""
        paint = torch.tensor(colour, dtype=torch.uint8, device=frames.device)
        return torch.where(mask.unsqueeze(-1), paint, frames)

    def disc(self, centre: torch.Tensor, radius: float) -> torch.Tensor:
        """Pixels within ``radius`` of each env's ``centre`` ``(n, 2)``."""
        dx, dy = self.x - centre[:, 0, None, None], self.y - centre[:, 1, None, None]
        return dx.square() + dy.square() <= radius**2

    def square(self, centre: torch.Tensor, half_size: float) -> torch.Tensor:
        """Pixels of the axis-aligned square of ``half_size`` around each env's ``centre``."""
        dx, dy = self.x - centre[:, 0, None, None], self.y - centre[:, 1, None, None]
        return torch.maximum(dx.abs(), dy.abs()) <= half_size

    def segment(self, start: torch.Tensor, end: torch.Tensor, half_width: float) -> torch.Tensor:
        """Pixels within ``half_width`` of the segment ``start``-``end`` (each ``(n, 2)``)."""
        sx, sy = start[:, 0, None, None], start[:, 1, None, None]
        ex, ey = end[:, 0, None, None] - sx, end[:, 1, None, None] - sy
        px, py = self.x - sx, self.y - sy
        t = ((px * ex + py * ey) / (ex.square() + ey.square()).clamp_min(1e-12)).clamp(0, 1)
        return (px - t * ex).square() + (py - t * ey).square() <= half_width**2


def tile(frames: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
    """Frames of equal shape side by side, ``gap`` white pixels apart."""
    height, _, channels = frames[0].shape
    spacer = np.full((height, gap, channels), 255, dtype=np.uint8)
    parts = [part for frame in frames for part in (frame, spacer)][:-1]
    return np.concatenate(parts, axis=1)


def gif_path(path: str | Path) -> Path:
    """``path`` if it names a ``.gif`` file, else a ValueError (a GIF under another name would
    mislead a viewer, and Pillow picks the format by the suffix)."""
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"the video is a GIF: give a path ending in .gif, got {str(path)!r}")
    if path.is_dir():  # checked before an evaluation films it, not when the GIF is written
        raise ValueError(f"the video path {str(path)!r} is a directory")
    return path


def save_gif(frames: Sequence[np.ndarray], path: str | Path, fps: float) -> Path:
    """Write ``frames`` (``(height, width, 3)`` uint8) as a looping GIF; needs Pillow (the
    ``plot`` extra brings it with matplotlib)."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("writing a GIF needs Pillow: pip install 'crl-fast[plot]'") from error
    path = gif_path(path)
    if not frames:
        raise ValueError("no frames to write")
    images = [Image.fromarray(frame) for frame in frames]
    duration_ms = round(1000 / fps)
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path


class FirstEpisodes:
    """A film of the first episode of envs ``0..count-1`` of ``env``, side by side: call it with
    the reset's observations (``info`` None), then with each step's. Each env is drawn from its
    reset to its final observation, then held there while the others go on; frames stop once
    all have ended. ``frames`` holds the tiles (host uint8 arrays)."""

    def __init__(self, env: TorchGoalVectorEnv, count: int) -> None:
        self.env, self.count = env, count
        self.ended = torch.zeros(count, dtype=torch.bool, device=env.device)
        self.frames: list[np.ndarray] = []
        self._last: torch.Tensor | None = None

    def __call__(self, obs: GoalObs, info: dict[str, Any] | None) -> None:
        if self.ended.all():
            return
        k = self.count
        shown = {key: value[:k] for key, value in obs.items()}
        if info is not None:  # an env that ended in this step is shown in its final state
            done = info["_final_obs"][:k, None]
            for key, value in shown.items():
                shown[key] = torch.where(done, info["final_obs"][key][:k], value)
        pictures = checked_frames(self.env, shown)
        if self._last is not None:  # envs whose episode ended before stay as they ended
            pictures = torch.where(self.ended[:, None, None, None], self._last, pictures)
        if info is not None:
            self.ended |= info["_final_obs"][:k]
        self._last = pictures
        self.frames.append(tile(list(pictures.cpu().numpy())))
