"""Images with captions and question/answer pairs, made locally: the data of `slm quickstart vision`.

Five kinds of 32x32 RGB image, each with one caption (LLaVA's stage 1: projector pre-training) and questions
whose answers are in the picture (stage 2: visual instruction tuning):

    digit   scikit-learn's bundled handwritten digits (1,797 8x8 scans, UCI "optdigits"), scaled up
            "a handwritten digit 7"                      What digit is this? -> 7
    shape   one filled circle / square / triangle, four colours, in one of four corners (size and place jittered)
            "a red circle at the top left"               What shape is it? / What colour is it? / Where is it?
    count   one to four dots of one colour
            "three blue dots"                            How many dots are there? -> three
    bars    a bar chart of three bars of random heights
            "a bar chart of three bars, the tallest on the right, ..."   Which bar is the tallest? -> right
    stripes horizontal or vertical stripes of two colours
            "vertical stripes of green and yellow"       Are the stripes horizontal or vertical? -> vertical

Held out: a digit scan is in the test split when a hash of its index says so (about 20%, fixed), and the
rendered images of the two splits come from different random streams (seeds), so no test image is a training one.
Everything is a function of (split, n, seed): the same call gives the same images, captions and questions.
Each question's `options` are every answer its kind can have, so chance is 1 / len(options).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 32
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("one", "two", "three", "four")
BAR_PLACES = ("left", "middle", "right")
_BAR_WHERE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
DIGITS = tuple(str(d) for d in range(10))
KINDS = ("digit", "shape", "count", "bars", "stripes")
TEST_FRACTION = 0.2
MAX_PIXELS = 4096 * 4096  # an image is shrunk to IMAGE_SIZE anyway; a bigger one is refused, not decoded


@dataclass
class Example:
    image: np.ndarray  # (IMAGE_SIZE, IMAGE_SIZE, 3) uint8
    kind: str
    caption: str
    qa: list[dict] = field(default_factory=list)  # {"question", "answer", "options"}


def _pillow():
    try:
        from PIL import Image, ImageDraw
    except ImportError as e:
        raise ImportError("the vision data needs Pillow: pip install 'slmkit[vision]'") from e
    return Image, ImageDraw


def load_digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (1797, 8, 8) float in 0..16, and their labels (no download: it ships them)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the vision data's digits come with scikit-learn: pip install 'slmkit[vision]'") from e
    d = load_digits()
    return d.images, d.target


def digit_split(index: int) -> str:
    """'test' for about TEST_FRACTION of the scans, chosen by a hash of the index (fixed across runs and machines)."""
    h = int.from_bytes(hashlib.sha256(f"digit-{index}".encode()).digest()[:8], "big")
    return "test" if h / 2**64 < TEST_FRACTION else "train"


def digit_image(scan: np.ndarray) -> np.ndarray:
    """An 8x8 scan (0..16) as a 32x32 RGB image: white ink on black, bilinear up-scaling."""
    Image, _ = _pillow()
    small = Image.fromarray((scan * (255 / 16)).clip(0, 255).astype(np.uint8), mode="L")
    return np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).convert("RGB"))


def _canvas(rng: random.Random):
    Image, ImageDraw = _pillow()
    shade = rng.randint(0, 40)  # a dark background, slightly varied
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (shade, shade, shade))
    return img, ImageDraw.Draw(img)


def _jitter(rng: random.Random, colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def shape_example(rng: random.Random) -> Example:
    shape, colour, corner = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(CORNERS)
    img, draw = _canvas(rng)
    size = rng.randint(9, 14)
    half = IMAGE_SIZE // 2
    x0 = rng.randint(1, half - size) + (half if "right" in corner else 0)
    y0 = rng.randint(1, half - size) + (half if "bottom" in corner else 0)
    _draw_shape(draw, shape, (x0, y0, x0 + size, y0 + size), _jitter(rng, COLOURS[colour]))
    return Example(np.asarray(img), "shape", f"a {colour} {shape} at the {corner}", [
        {"question": "What shape is it?", "answer": shape, "options": list(SHAPES)},
        {"question": "What colour is the shape?", "answer": colour, "options": list(COLOURS)},
        {"question": "Where is the shape?", "answer": corner, "options": list(CORNERS)},
    ])


def count_example(rng: random.Random) -> Example:
    n, colour = rng.randint(1, 4), rng.choice(list(COLOURS))
    img, draw = _canvas(rng)
    cells = rng.sample([(cx, cy) for cx in range(3) for cy in range(3)], n)  # one dot per cell of a 3x3 grid
    fill = _jitter(rng, COLOURS[colour])
    for cx, cy in cells:
        r = rng.randint(2, 3)
        x, y = 5 + cx * 11 + rng.randint(-1, 1), 5 + cy * 11 + rng.randint(-1, 1)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    word = NUMBERS[n - 1]
    noun = "dot" if n == 1 else "dots"
    return Example(np.asarray(img), "count", f"{word} {colour} {noun}", [
        {"question": "How many dots are there?", "answer": word, "options": list(NUMBERS)},
        {"question": "What colour are the dots?", "answer": colour, "options": list(COLOURS)},
    ])


def bars_example(rng: random.Random) -> Example:
    heights = rng.sample(range(6, 29), 3)  # distinct, so one bar is the tallest
    img, draw = _canvas(rng)
    fill = _jitter(rng, COLOURS[rng.choice(list(COLOURS))])
    for i, h in enumerate(heights):
        x0 = 3 + i * 10
        draw.rectangle((x0, IMAGE_SIZE - 2 - h, x0 + 6, IMAGE_SIZE - 2), fill=fill)
    tallest = BAR_PLACES[heights.index(max(heights))]
    shortest = BAR_PLACES[heights.index(min(heights))]
    caption = f"a bar chart of three bars, the tallest {_BAR_WHERE[tallest]}, the shortest {_BAR_WHERE[shortest]}"
    return Example(np.asarray(img), "bars", caption, [
                       {"question": "Which bar is the tallest?", "answer": tallest, "options": list(BAR_PLACES)},
                       {"question": "Which bar is the shortest?", "answer": shortest, "options": list(BAR_PLACES)},
                   ])


def stripes_example(rng: random.Random) -> Example:
    a, b = rng.sample(list(COLOURS), 2)
    way = rng.choice(("horizontal", "vertical"))
    img, draw = _canvas(rng)
    width = rng.randint(3, 5)
    for i, start in enumerate(range(0, IMAGE_SIZE, width)):
        fill = _jitter(rng, COLOURS[a if i % 2 == 0 else b])
        box = (0, start, IMAGE_SIZE, start + width - 1) if way == "horizontal" else (start, 0, start + width - 1,
                                                                                    IMAGE_SIZE)
        draw.rectangle(box, fill=fill)
    return Example(np.asarray(img), "stripes", f"{way} stripes of {a} and {b}", [
        {"question": "Are the stripes horizontal or vertical?", "answer": way, "options": ["horizontal", "vertical"]},
    ])


RENDERERS = {"shape": shape_example, "count": count_example, "bars": bars_example, "stripes": stripes_example}


def make_examples(split: str, n_rendered: int, seed: int = 0, digits: bool = True) -> list[Example]:
    """The split's examples: every digit scan of the split (when `digits`) and `n_rendered` rendered images, the
    kinds in turn. Deterministic in (split, n_rendered, seed); the splits' rendered images never coincide."""
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r}: choose 'train' or 'test'")
    out = []
    if digits:
        scans, labels = load_digit_scans()
        for i, (scan, label) in enumerate(zip(scans, labels, strict=True)):
            if digit_split(i) == split:
                out.append(Example(digit_image(scan), "digit", f"a handwritten digit {label}", [
                    {"question": "What digit is this?", "answer": str(label), "options": list(DIGITS)}]))
    # one stream per (split, seed): train and test draw from different streams
    rng = random.Random(f"slmkit-vision-{split}-{seed}")
    kinds = list(RENDERERS)
    out += [RENDERERS[kinds[i % len(kinds)]](rng) for i in range(n_rendered)]
    return out


def qa_items(examples: list[Example]) -> list[tuple[int, dict]]:
    """(example index, question) for every question of every example."""
    return [(i, q) for i, ex in enumerate(examples) for q in ex.qa]


def chance(items: list[tuple[int, dict]]) -> float:
    """The accuracy of answering each question with one of its options at random."""
    return sum(1 / len(q["options"]) for _, q in items) / max(1, len(items))


def all_text(examples: list[Example]) -> list[str]:
    """Every caption, question and answer: what the decoder's tokenizer and text pre-training read."""
    return [t for ex in examples for t in [ex.caption] + [s for q in ex.qa for s in (q["question"], q["answer"])]]


def read_image(source, size: int = IMAGE_SIZE, name: str | None = None) -> np.ndarray:
    """An image file (a path) or its bytes as a uint8 (size, size, 3) RGB array, resized bilinearly as the
    training images were drawn (a 32x32 PNG from `make_examples` comes back unchanged). `name` names the source
    in the error when `source` is bytes."""
    import io
    from pathlib import Path
    Image, _ = _pillow()
    where = name or (str(source) if not isinstance(source, bytes | bytearray) else "the image")
    if not isinstance(source, bytes | bytearray) and not Path(source).is_file():
        raise FileNotFoundError(f"{source}: no such image file")
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source)
        too_big = img.width * img.height > MAX_PIXELS  # the header is read, not the pixels: refuse before decoding
        if not too_big:
            img.load()
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, ... for what it cannot decode
        raise ValueError(f"{where}: not an image Pillow can read ({type(e).__name__}); give a PNG, JPEG, GIF, "
                         "BMP or WebP file") from None
    if too_big:
        raise ValueError(f"{where}: {img.width}x{img.height} pixels is more than this reader decodes "
                         f"({MAX_PIXELS:,}); scale the image down first")
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def write_png(image: np.ndarray) -> bytes:
    """A uint8 (S, S, 3) array as PNG bytes (the test split's images as files, for `slm generate --image`)."""
    import io
    Image, _ = _pillow()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
