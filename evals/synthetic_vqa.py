"""Synthetic VQA: a small, deterministic visual question answering benchmark for CPU tests.

Each image is 168x168 px (12x12 = 144 patches of 14 px): a noisy, blotchy grey background with
a 3x3 grid of 56 px cells, 2-4 of which hold one object -- a circle, square or triangle in red,
green, blue, yellow, purple or cyan, radius 9-16 px, jittered inside its cell. Objects cover
about 13% of the patches (2x2 to 3x3 patches each), so every answer depends on a few small
regions of the image and on nothing else: a visual-token pruning method that drops the wrong
patches loses the answer, one that keeps the objects keeps it. The benchmark is meant to
measure that on CPU with a tiny trained LLaVA (`vlm_prune.fixture`).

Question types (`qtype`), all with one-word answers:

- ``color_of``  "what color is the {shape} ?"            (that shape occurs once)  -> a colour
- ``color_at``  "what color is the shape at the {cell} ?" (cell occupied)           -> a colour
- ``shape_at``  "what shape is at the {cell} ?"           (cell occupied)           -> a shape
- ``count``     "how many {color} shapes are there ?"                               -> zero..four
- ``exists``    "is there a {color} {shape} ?" (negatives are mostly hard: the colour or the
                shape is present, the pair is not)                                  -> yes / no
- ``relpos``    "is the {c1} {s1} left or right of the {c2} {s2} ?" (both colours occur once,
                in different columns)                                               -> left / right

Cells are single words: top-left, top-middle, top-right, middle-left, center, middle-right,
bottom-left, bottom-middle, bottom-right.

Splits are seeded and fully deterministic: ``make_split("test", n)`` gives the same images and
questions on every call, item i depends only on (seed, i) (so a shorter split is a prefix of a
longer one), qtypes go round-robin and each item's answer is drawn uniformly from its qtype's
answers before the scene is sampled, so answers are balanced. ``train_stream(seed)`` yields
fresh items forever; ``sample_scene`` / ``render`` / ``ask`` / ``patch_labels`` are the pieces a
trainer uses to ask several questions about one image.

Prompt (image first; the LlavaProcessor expands ``<image>`` to 144 tokens), answer predicted as
the next token after the colon::

    <s> <image> what shape is at the top-left ? answer :
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 168
PATCH = 14
GRID = 3
CELL = IMAGE_SIZE // GRID  # 56 px
MIN_R, MAX_R = 9, 16

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 165, 55),
    "blue": (45, 75, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 55, 190),
    "cyan": (40, 200, 215),
}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle"]
CELLS = [
    "top-left", "top-middle", "top-right",
    "middle-left", "center", "middle-right",
    "bottom-left", "bottom-middle", "bottom-right",
]
COUNT_WORDS = ["zero", "one", "two", "three", "four"]
# the 18 colour-shape classes, index = COLOR_NAMES.index(c) * 3 + SHAPES.index(s)
CLASSES = [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]

QTYPES = ["color_of", "color_at", "shape_at", "count", "exists", "relpos"]
ANSWERS = {
    "color_of": COLOR_NAMES,
    "color_at": COLOR_NAMES,
    "shape_at": SHAPES,
    "count": COUNT_WORDS,
    "exists": ["yes", "no"],
    "relpos": ["left", "right"],
}
ANSWER_WORDS = sorted({a for answers in ANSWERS.values() for a in answers})

SPLIT_SEEDS = {"train": 1000, "validation": 2000, "test": 3000}

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN, "<unk>"]
_TEMPLATE_WORDS = (
    "what color is the shape at ? how many shapes are there a left or right of answer :".split()
)


def vocabulary() -> dict[str, int]:
    """Word -> id: <pad>=0, <s>=1, </s>=2, <image>=3, <unk>=4, then every word the questions
    and answers use (template words, colours, shapes, cells, counts, yes/no, left/right)."""
    words: list[str] = list(SPECIAL_TOKENS)
    for w in _TEMPLATE_WORDS + COLOR_NAMES + SHAPES + CELLS + COUNT_WORDS + ["yes", "no", "left", "right"]:
        if w not in words:
            words.append(w)
    return {w: i for i, w in enumerate(words)}


def build_tokenizer():
    """A `PreTrainedTokenizerFast` over a `tokenizers` WordLevel model of `vocabulary()`.

    Whitespace-split words; <pad>/<s>/</s>/<image>/<unk> are special added tokens (so the
    processor's "<image><image>..." expansion splits into image tokens); no BOS is added
    automatically (prompts start with "<s>"); left padding is set in the constructor so it is saved.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def prompt(question: str) -> str:
    """The model prompt for a question: image first, the answer is the next token."""
    return f"<s> {IMAGE_TOKEN} {question} answer :"


# ----------------------------------------------------------------------------- scenes


@dataclass
class Obj:
    shape: str
    color: str
    cell: int  # 0..8, row-major
    cx: float
    cy: float
    r: int

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID

    @property
    def label(self) -> int:
        """Class index 0..17 (see CLASSES)."""
        return COLOR_NAMES.index(self.color) * len(SHAPES) + SHAPES.index(self.shape)


@dataclass
class VQAItem:
    image: Image.Image
    question: str
    answer: str
    qtype: str
    objects: list[Obj] = field(default_factory=list, repr=False)

    @property
    def prompt(self) -> str:
        return prompt(self.question)


def sample_scene(rng: np.random.Generator, n_objects: int | tuple[int, int] = (2, 4)) -> list[Obj]:
    """Objects for one image: n_objects (or uniform in the inclusive range) in distinct cells.

    Colours come from a random palette of 1-4 colours (so repeated colours, and counts up to
    four, are common); shapes are uniform.
    """
    if not isinstance(n_objects, int):
        n_objects = int(rng.integers(n_objects[0], n_objects[1] + 1))
    cells = rng.choice(GRID * GRID, size=n_objects, replace=False)
    palette = rng.choice(len(COLOR_NAMES), size=int(rng.integers(1, 5)), replace=False)
    objs = []
    for cell in cells:
        r = int(rng.integers(MIN_R, MAX_R + 1))
        slack = CELL / 2 - r - 3
        cx = (cell % GRID + 0.5) * CELL + rng.uniform(-slack, slack)
        cy = (cell // GRID + 0.5) * CELL + rng.uniform(-slack, slack)
        color = COLOR_NAMES[int(rng.choice(palette))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        objs.append(Obj(shape, color, int(cell), float(cx), float(cy), r))
    return objs


def _outline(o: Obj) -> tuple[str, list]:
    if o.shape == "circle":
        return "ellipse", [o.cx - o.r, o.cy - o.r, o.cx + o.r, o.cy + o.r]
    if o.shape == "square":
        h = o.r * 0.88
        return "rect", [o.cx - h, o.cy - h, o.cx + h, o.cy + h]
    R = o.r * 1.2  # triangle pointing up, circumradius R, centroid at (cx, cy)
    return "poly", [(o.cx, o.cy - R), (o.cx - R * 0.866, o.cy + R * 0.5), (o.cx + R * 0.866, o.cy + R * 0.5)]


def _draw(draw: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    kind, xy = _outline(o)
    if kind == "ellipse":
        draw.ellipse(xy, fill=fill)
    elif kind == "rect":
        draw.rectangle(xy, fill=fill)
    else:
        draw.polygon(xy, fill=fill)


def render(objs: list[Obj], rng: np.random.Generator) -> Image.Image:
    """The RGB image of a scene: blotchy grey background + pixel noise, jittered object colours."""
    base = rng.integers(95, 165)
    blotches = rng.integers(-25, 26, size=(6, 6, 1)).astype(np.float32)
    bg = np.asarray(
        Image.fromarray((blotches[:, :, 0] + 128).astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR),
        dtype=np.float32,
    ) - 128 + base
    tint = rng.integers(-8, 9, size=3)
    canvas = np.clip(bg[:, :, None] + tint, 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(img)
    for o in objs:
        fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLORS[o.color])
        _draw(draw, o, fill)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-18, 19, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def patch_labels(objs: list[Obj], min_cover: float = 0.15) -> np.ndarray:
    """(144,) int64 per-patch labels, row-major: 0 background, 1 + class index for a patch whose
    area the object covers by at least `min_cover` (objects never share a patch)."""
    side = IMAGE_SIZE // PATCH
    labels = np.zeros(side * side, dtype=np.int64)
    for o in objs:
        mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw(ImageDraw.Draw(mask), o, 255)
        cover = np.asarray(mask, dtype=np.float32).reshape(side, PATCH, side, PATCH).mean(axis=(1, 3)) / 255
        labels[cover.reshape(-1) >= min_cover] = 1 + o.label
    return labels


# ----------------------------------------------------------------------------- questions


def ask(objs: list[Obj], qtype: str, rng: np.random.Generator, answer: str | None = None):
    """(question, answer) of `qtype` about the scene, or None if it cannot be asked (with that
    answer). Without `answer`, the answer is uniform over those the scene allows."""
    colors = [o.color for o in objs]
    shapes = [o.shape for o in objs]

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    if qtype == "color_of":
        options = [o for o in objs if shapes.count(o.shape) == 1 and (answer is None or o.color == answer)]
        if not options:
            return None
        o = pick(options)
        return f"what color is the {o.shape} ?", o.color
    if qtype in ("color_at", "shape_at"):
        attr = "color" if qtype == "color_at" else "shape"
        if answer is None:
            answer = pick(sorted({getattr(o, attr) for o in objs}))
        options = [o for o in objs if getattr(o, attr) == answer]
        if not options:
            return None
        o = pick(options)
        if qtype == "color_at":
            return f"what color is the shape at the {CELLS[o.cell]} ?", o.color
        return f"what shape is at the {CELLS[o.cell]} ?", o.shape
    if qtype == "count":
        if answer is None:
            answer = pick(sorted({COUNT_WORDS[colors.count(c)] for c in COLOR_NAMES}))
        options = [c for c in COLOR_NAMES if COUNT_WORDS[colors.count(c)] == answer]
        if not options:
            return None
        return f"how many {pick(options)} shapes are there ?", answer
    if qtype == "exists":
        present = {(o.color, o.shape) for o in objs}
        hard = sorted(
            (c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present and (c in colors or s in shapes)
        )
        easy = sorted((c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present)
        if answer is None:
            answer = pick(["yes", "no"])
        if answer == "yes":
            c, s = pick(sorted(present))
        else:
            pool = hard if hard and rng.random() < 0.8 else easy
            if not pool:
                return None
            c, s = pick(pool)
        return f"is there a {c} {s} ?", answer
    if qtype == "relpos":
        unique = [o for o in objs if colors.count(o.color) == 1]
        pairs = [(a, b) for a in unique for b in unique if a.col != b.col]
        if answer is not None:
            pairs = [(a, b) for a, b in pairs if (a.col < b.col) == (answer == "left")]
        if not pairs:
            return None
        a, b = pick(pairs)
        return (
            f"is the {a.color} {a.shape} left or right of the {b.color} {b.shape} ?",
            "left" if a.col < b.col else "right",
        )
    raise ValueError(f"unknown qtype {qtype!r}; choose from {QTYPES}")


def make_item(rng: np.random.Generator, qtype: str, answer: str | None = None,
              n_objects: int | tuple[int, int] = (2, 4), max_tries: int = 500) -> VQAItem:
    """One item of `qtype` (with `answer` if given), sampling scenes until the question fits."""
    for _ in range(max_tries):
        objs = sample_scene(rng, n_objects)
        qa = ask(objs, qtype, rng, answer)
        if qa is not None:
            return VQAItem(render(objs, rng), qa[0], qa[1], qtype, objs)
    raise RuntimeError(f"could not make a {qtype} item with answer {answer!r}")


def make_split(name: str, n: int, seed: int | None = None, qtypes: list[str] | None = None) -> list[VQAItem]:
    """`n` items of split `name` ("train", "validation", "test"), deterministic in (name, seed).

    qtypes go round-robin (item i has qtypes[i % len(qtypes)]); each answer is uniform over the
    qtype's answers; item i depends only on (seed, i). `seed` defaults to SPLIT_SEEDS[name].
    """
    if seed is None:
        seed = SPLIT_SEEDS[name]
    qtypes = list(qtypes or QTYPES)
    items = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        qtype = qtypes[i % len(qtypes)]
        answers = ANSWERS[qtype]
        items.append(make_item(rng, qtype, answers[int(rng.integers(len(answers)))]))
    return items


def train_stream(seed: int = 0, qtypes: list[str] | None = None,
                 n_objects: int | tuple[int, int] = (2, 4)) -> Iterator[VQAItem]:
    """Fresh items forever (random qtype, answer uniform over what the scene allows)."""
    rng = np.random.default_rng([SPLIT_SEEDS["train"], 7, seed])
    qtypes = list(qtypes or QTYPES)
    while True:
        yield make_item(rng, qtypes[int(rng.integers(len(qtypes)))], None, n_objects)
