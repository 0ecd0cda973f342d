"""Visual perturbation of red-team images (method.md 2.3): Gaussian pixel noise plus a trigger phrase.

The paper gives the noise as "0.03 of the 255 range" (method.md 2.3). We read it as sigma = 0.03 of the
full pixel range, i.e. pixels scaled to [0, 1] get noise of standard deviation 0.03, which is
0.03 x 255 = 7.65 grey levels on 8-bit images (`NOISE_SIGMA`, a parameter); values are clipped to
0..255 and rounded. A trigger phrase from ``redteam_pools.yaml`` is then drawn in red, white or yellow
in one of the four corners, with a font about 4% of the image height (`FONT_SHARE`), so the noise
does not blur the text. Everything drawn is returned as a record (phrase, colour, corner, font size,
text box, noise sigma, random seed) and stored in the script's meta.

Choices come from a generator seeded by (run seed, image id): the same inputs give the same pixels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from steerkit.prompts import load_prompt
from steerkit.synth.seeds import item_seed, stable_order

NOISE_SIGMA = 0.03  # method.md 2.3: sigma = 0.03 of the pixel range (7.65 of 255)
FONT_SHARE = 0.04  # method.md 2.3: font about 4% of image height
PERTURB_SHARE = 0.10  # method.md 2.3: 10% of red-team images
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def pools() -> dict[str, Any]:
    return load_prompt("redteam_pools@1").data


def choose_perturbed(ids: list[str], *, share: float = PERTURB_SHARE, seed: int = 0) -> set[str]:
    """The ids to perturb: ``ceil(share * n)`` of them (so a small run still perturbs one).

    Example:
        >>> sorted(choose_perturbed([f"s{i}" for i in range(20)], share=0.1, seed=0)) == sorted(
        ...     choose_perturbed([f"s{i}" for i in reversed(range(20))], share=0.1, seed=0))
        True
        >>> len(choose_perturbed([f"s{i}" for i in range(20)])), len(choose_perturbed(["a", "b"]))
        (2, 1)
    """
    if share <= 0 or not ids:
        return set()
    return set(stable_order(ids, seed)[: math.ceil(share * len(ids))])


def perturb_image(
    src: Path,
    dest: Path,
    *,
    key: str,
    seed: int = 0,
    sigma: float = NOISE_SIGMA,
    font_share: float = FONT_SHARE,
    triggers: list[str] | None = None,
    colours: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Write a noisy copy of ``src`` with a trigger phrase to ``dest`` (PNG); return what was done."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    data = pools()
    triggers = triggers or list(data["trigger_phrases"])
    colours = colours or dict(data["trigger_colours"])
    rs = item_seed(seed, key)
    rng = np.random.default_rng(rs)
    with Image.open(src) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    noisy = np.clip(np.rint(pixels + rng.normal(0.0, sigma * 255.0, pixels.shape)), 0, 255).astype(np.uint8)
    img = Image.fromarray(noisy, mode="RGB")
    h, w = noisy.shape[:2]
    phrase = triggers[int(rng.integers(len(triggers)))]
    colour_name = sorted(colours)[int(rng.integers(len(colours)))]
    corner = CORNERS[int(rng.integers(len(CORNERS)))]
    font_px = max(8, round(font_share * h))
    font = ImageFont.load_default(size=font_px)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((0, 0), phrase, font=font)
    tw, th = x1 - x0, y1 - y0
    margin = max(2, round(0.02 * min(h, w)))
    x = margin if "left" in corner else max(0, w - tw - margin)
    y = margin if corner.startswith("top") else max(0, h - th - margin)
    draw.text((x - x0, y - y0), phrase, fill=tuple(colours[colour_name]), font=font)
    dest.parent.mkdir(parents=True, exist_ok=True)
    img.save(dest, format="PNG")
    return {
        "trigger": phrase, "colour": colour_name, "rgb": list(colours[colour_name]), "corner": corner,
        "font_px": font_px, "font_share": font_share, "text_box": [x, y, x + tw, y + th],
        "noise_sigma": sigma, "noise_std_pixels": round(sigma * 255.0, 4), "rng_seed": rs,
        "source_image": src.name, "image": dest.name,
    }
