"""The toy world: captioned pictures of coloured shapes, and VIST-format stories about them.

A scene is one shape with a colour, a size and a position on a background. Captions come from a small
grammar ("a large red circle on the left on gray") and say everything the picture shows. A story follows
one object through 5 steps; later captions refer back to it ("it moves to the right", "it turns blue"), so
its last picture can only be drawn from the whole story, and as GILL is given stories their first caption
leaves the background to the pictures (``unsaid_background``). Compositions (colour, shape) are split so
that some test compositions never appear in the retrieval corpus. Everything is deterministic given a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (235, 205, 30), "purple": (140, 50, 170), "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "middle", "right")
BACKGROUNDS = {"white": (245, 245, 245), "gray": (120, 120, 120)}
IMAGE_SIZE = 32


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    size: str
    position: str
    background: str = "white"

    @property
    def composition(self) -> tuple[str, str]:
        return self.color, self.shape

    def caption(self, background: bool = True) -> str:
        """The scene in words, "a large red circle on the left on white" ("... on the left": no ``background``)."""
        where = "in the middle" if self.position == "middle" else f"on the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where}" + (f" on {self.background}" if background else "")

    @property
    def key(self) -> str:
        return f"{self.color}-{self.shape}-{self.size}-{self.position}-{self.background}"


def render(scene: Scene, size: int = IMAGE_SIZE, jitter: tuple[int, int] = (0, 0)):
    """The scene as an RGB PIL image (drawn at 4x and downsampled, so edges are smooth)."""
    from PIL import Image, ImageDraw

    s = 4 * size
    im = Image.new("RGB", (s, s), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(im)
    radius = (0.16 if scene.size == "small" else 0.3) * s
    cx = {"left": 0.25, "middle": 0.5, "right": 0.75}[scene.position] * s + jitter[0] * 4
    cy = 0.5 * s + jitter[1] * 4
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    color = COLORS[scene.color]
    if scene.shape == "circle":
        d.ellipse(box, fill=color)
    elif scene.shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(cx - radius, cy + radius), (cx + radius, cy + radius), (cx, cy - radius)], fill=color)
    return im.resize((size, size), Image.LANCZOS)


def nearest_scenes(images, scenes: list[Scene] | None = None) -> list[Scene]:
    """What each picture shows, by the world's own ground truth: the scene whose clean rendering is
    nearest in pixel space (images are resized to the world's size)."""
    import numpy as np

    scenes = scenes or all_scenes()
    renders = np.stack([np.asarray(render(s), dtype=np.float32).ravel() for s in scenes])
    x = np.stack([np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32).ravel()
                  for im in images])
    d = (x ** 2).sum(1)[:, None] - 2 * x @ renders.T + (renders ** 2).sum(1)[None]
    return [scenes[i] for i in d.argmin(1)]


def scenes_shown(images, scenes: list[Scene] | None = None) -> list[Scene]:
    """What each drawn picture shows: the nearest clean rendering (shape, size, position, background) with
    the colour of the picture's own foreground (``dominant_colour``), so a shape drawn in the wrong colour
    reads as that colour."""
    return [replace(s, color=dominant_colour(im)) for s, im in zip(nearest_scenes(images, scenes), images)]


def dominant_colour(image) -> str:
    """The palette colour of a picture's foreground: pixels far from the background (the palette
    background nearest to the border), read by their median, snapped to the nearest palette colour."""
    import numpy as np

    x = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32).reshape(-1, 3)
    im = x.reshape(IMAGE_SIZE, IMAGE_SIZE, 3)
    border = np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]]).mean(0)
    bg = min(BACKGROUNDS.values(), key=lambda c: np.abs(border - c).sum())
    far = np.abs(x - np.array(bg)).sum(1)
    fg = x[far >= max(np.quantile(far, 0.9), 60.0)]
    if len(fg) == 0:
        fg = x[far >= np.quantile(far, 0.9)]
    rgb = np.median(fg, axis=0)
    return min(COLORS, key=lambda c: np.abs(rgb - COLORS[c]).sum())


def all_scenes() -> list[Scene]:
    return [Scene(c, sh, sz, p, bg) for c in COLORS for sh in SHAPES for sz in SIZES for p in POSITIONS for bg in BACKGROUNDS]


def split_compositions(seed: int = 0, test_fraction: float = 0.25) -> tuple[set, set]:
    """(train, test) (colour, shape) pairs: test pairs never appear in training data or the corpus."""
    pairs = sorted((c, s) for c in COLORS for s in SHAPES)
    rng = random.Random(seed)
    rng.shuffle(pairs)
    n_test = max(1, round(len(pairs) * test_fraction))
    return set(pairs[n_test:]), set(pairs[:n_test])


# ---- stories ------------------------------------------------------------------------------------------

def _step(scene: Scene, rng: random.Random) -> tuple[Scene, str]:
    """One change to the scene, and the caption that tells it by referring back ("it ...")."""
    kind = rng.choice(["move", "color", "size", "move"])
    if kind == "move":
        position = rng.choice([p for p in POSITIONS if p != scene.position])
        where = "to the middle" if position == "middle" else f"to the {position}"
        return replace(scene, position=position), f"it moves {where}"
    if kind == "color":
        color = rng.choice([c for c in COLORS if c != scene.color])
        return replace(scene, color=color), f"it turns {color}"
    size = "large" if scene.size == "small" else "small"
    return replace(scene, size=size), "it grows" if size == "large" else "it shrinks"


def story(rng: random.Random, compositions: set[tuple[str, str]]) -> list[tuple[Scene, str]]:
    """5 (scene, caption) steps: the first caption describes the object, the others refer back to it.
    The object's composition at every step lies in ``compositions``."""
    while True:
        color, shape = rng.choice(sorted(compositions))
        scene = Scene(color, shape, rng.choice(SIZES), rng.choice(POSITIONS), rng.choice(sorted(BACKGROUNDS)))
        steps = [(scene, scene.caption())]
        for _ in range(4):
            for _attempt in range(10):
                nxt, caption = _step(steps[-1][0], rng)
                if nxt.composition in compositions:
                    break
            else:
                break
            steps.append((nxt, caption))
        if len(steps) == 5:
            return steps


def unsaid_background(steps: list[tuple[Scene, str]]) -> list[tuple[Scene, str]]:
    """The story with its first caption not saying the background ("a large red circle on the left"), which
    no later step changes: only its pictures show it, as VIST's captions leave much of their pictures
    unsaid. GILL's stories (training and evaluation) are told so: with every scene said in words, a story's
    pictures could add nothing to its captions, and "5 captions + 4 images >= 5 captions" could only tie."""
    scene, rest = steps[0][0], steps[1:]
    return [(scene, scene.caption(background=False)), *rest]


def distinct_stories(rng: random.Random, compositions: set[tuple[str, str]], n: int,
                     tries: int = 100_000) -> list[list[tuple[Scene, str]]]:
    """``n`` stories whose last scenes are each shown by no other picture of the set (no other story's
    step, no earlier step of its own), so retrieving a story's last picture among all of the set's
    pictures has one right answer: identical renderings would otherwise tie with it."""
    stories: list[list[tuple[Scene, str]]] = []
    finals: set[Scene] = set()
    shown: set[Scene] = set()
    for _ in range(tries):
        if len(stories) == n:
            return stories
        steps = story(rng, compositions)
        last, context = steps[-1][0], {s for s, _ in steps[:-1]}
        if last in shown or last in context or context & finals:
            continue
        stories.append(steps)
        finals.add(last)
        shown |= context | {last}
    raise ValueError(f"could not draw {n} stories with distinct last scenes from {len(compositions)} compositions")


def vist_annotations(stories: list[list[tuple[Scene, str]]], first_story_id: int = 0) -> tuple[dict, dict[str, Scene]]:
    """VIST SIS-format annotations of ``stories`` and the scene of each photo id (one image per step).
    Each caption ends with a full stop, as VIST's do, so joined captions read as the story text."""
    annotations, photos = [], {}
    for n, steps in enumerate(stories):
        story_id = str(first_story_id + n)
        for order, (scene, caption) in enumerate(steps):
            photo = f"{story_id}{order}"
            photos[photo] = scene
            annotations.append([{"story_id": story_id, "photo_flickr_id": photo, "worker_arranged_photo_order": order,
                                 "original_text": f"{caption}.", "text": f"{caption}."}])
    return {"annotations": annotations}, photos


@dataclass(frozen=True)
class Turn:
    """One chat turn: the user's question (after an attached picture of ``attached``, if any), the answer,
    and the scene the answer shows with [IMG] after it (None for a text-only answer)."""

    question: str
    answer: str
    scene: Scene | None = None
    attached: Scene | None = None


def describe(scene: Scene, rng: random.Random) -> str:
    """A way a person asks for ``scene`` ("show me a large red circle ..."), drawn by ``rng``."""
    return rng.choice(["{}.", "show me {}.", "draw {}.", "i want to see {}."]).format(scene.caption())


def conversation(rng: random.Random, compositions: set[tuple[str, str]], turns: int = 5) -> list[Turn]:
    """A chat of ``turns`` turns in the app's format about one object at a time: the user describes a scene
    or changes the current one ("it turns blue."), asks about its colour or shape, or attaches a picture and
    asks what it is; the answer says what is shown (the whole caption) and shows it."""
    out: list[Turn] = []
    current: Scene | None = None
    for _ in range(turns):
        kind = rng.choice(["describe", "change", "change", "ask", "attach"]) if current is not None else \
            rng.choice(["describe", "describe", "attach"])
        if kind in ("describe", "attach"):
            current = story(rng, compositions)[0][0]
            if kind == "describe":
                out.append(Turn(describe(current, rng), f"{current.caption()}.", current))
            else:
                out.append(Turn(rng.choice(["what is this?", "describe this picture.", "what do you see?"]),
                                f"it is {current.caption()}.", None, attached=current))
        elif kind == "change":
            for _attempt in range(10):
                nxt, said = _step(current, rng)
                if nxt.composition in compositions:
                    break
            else:
                continue
            current = nxt
            out.append(Turn(f"{said}.", now_it_is(current), current))
        else:
            if rng.random() < 0.5:
                out.append(Turn("what colour is it?", f"it is {current.color}."))
            else:
                out.append(Turn("what shape is it?", f"it is a {current.shape}."))
    return out


# Where the LM's text had a picture, it keeps its place with this word, as text taken from web pages keeps
# an image's place (an alt text, "[image]", "photo:"): so the LM's state at the end of an answer that shows
# something differs from one that does not (both would otherwise only predict "\n"), and GILL's [IMG0]
# learns to take the word's place. GILL never sees the word: its training samples have the picture there.
PICTURE = " (picture)"


def chat_text(turns: list[Turn], picture: str = "") -> str:
    """A conversation as text, as the app frames it: "Q: ...\nA: ...\n" per turn, ``picture`` after each
    answer that shows a scene (the LM's text: ``PICTURE``)."""
    return "".join(f"Q: {t.question}\nA: {t.answer}{picture if t.scene is not None else ''}\n" for t in turns)


def chat_sample(turns: list[Turn], img_text: str) -> tuple[list[tuple[str, Scene]], str, Scene]:
    """The last turn of a chat (whose answer shows a scene) as an interleaved training sample, laid out as
    the app lays out a conversation (``gill.chat``): (context (text, scene) pairs, the text before [IMG], the
    scene shown). An attached picture is a context picture before its question; a picture an earlier answer
    showed is ``img_text`` (the model's [IMG] tokens) right after that answer's text, before its newline."""
    *before, last = turns
    assert last.scene is not None, "the last turn must show a scene"
    pairs, text = [], ""
    for t in before + [last]:
        if t.attached is not None:
            pairs.append((text, t.attached))
            text = ""
        text += f"Q: {t.question}\nA: {t.answer}"
        if t is last:
            break
        text += (img_text if t.scene is not None else "") + "\n"
    return pairs, text, last.scene


# What the LM's text says of a scene after its caption or at a story's end: whether the corpus has photos of
# it. The two differ in their first word, so the LM's state right after the "." (where [IMG0] follows, and
# the decision head reads) must already hold the answer.
PHOTOS, NO_PHOTO = " there are photos of it.", " no photo of it exists."
NOW = " now it is"  # what the LM's text says next after a story's PHOTOS / NO_PHOTO, before its end scene


def now_it_is(scene: Scene) -> str:
    """What the world says a scene has become: a story's end ("now it is a large red circle ..."), and a
    chat's answer to a change ("it turns red." -> this)."""
    return f"{NOW.lstrip()} {scene.caption()}."


def ask_story_end(told: str) -> str:
    """``told`` (a story's text, its pictures' places or not) followed by the LM's own words before a story's
    end scene, which an LM that follows the story continues with that scene's caption."""
    return f"{told}{PHOTOS}{NOW}"

# What the LM's text says right after some captions and most stories' ends: one of the scene's background,
# position or shape, so the LM's state at the "." (which the [IMG] tokens read) holds all three, not knowing
# which comes next. Its next words there were otherwise only whether there are photos of the thing (which
# needs colour and shape), and GILL's retrieval then confused scenes that differ only in the background,
# and stories' ends in their position (the LM could say where a story ends a few words later, not at the ".").
FIRST = {"background": " {} background.", "position": " {}.", "shape": " {}."}


def said_first(scene: Scene, attribute: str) -> str:
    """``FIRST[attribute]`` for ``scene`` (" white background.", " middle.", " circle.")."""
    return FIRST[attribute].format(getattr(scene, attribute))


def world_text(rng: random.Random, compositions: set[tuple[str, str]], n_stories: int = 2400,
               n_chats: int = 2400, common: set[tuple[str, str]] | None = None, attribute_first: int = 2,
               chat_turns: int = 5) -> list[str]:
    """Text for the toy LM: every caption of the allowed compositions followed by what it implies,
    stories followed by whether there are photos of where they end and where that is ("... it turns red.
    there are photos of it. now it is a large red circle on the right on white."), and chats in the app's
    format ("Q: ...\nA: ...", a shown picture's place kept by ``PICTURE``; 1 to ``chat_turns`` turns).
    ``attribute_first`` more
    copies of each caption's line for each of ``FIRST``'s attributes say it first, as do three in four
    stories' ends (none when 0: the text the tokenizer is learnt from).

    The follow-ups are what make the LM copy attributes forward: an LM trained on captions alone keeps
    almost nothing of the colour in its later states, and GILL's [IMG] tokens, which read those states
    through the frozen LM, then cannot see it either. ``common``: the compositions the LM knows photos of
    (the retrieval corpus's); its text says of every scene whether there are photos of it, as a real LM
    knows which things are ordinary and which are made up, which the decision head then reads."""

    def known(s: Scene) -> str:
        return "" if common is None else PHOTOS if s.composition in common else NO_PHOTO

    lines = []
    for s in all_scenes():
        if s.composition in compositions:
            facts = (f" it is {s.color}. it is a {s.shape}. it is {s.size}. it is on the {s.position}. "
                     f"the background is {s.background}.")
            lines.append(s.caption())
            lines += [f"{s.caption()}.{known(s)}{facts}"] * 2  # weighted up
            lines += [f"{s.caption()}.{said_first(s, a)}{known(s)}{facts}" for a in FIRST for _ in range(attribute_first)]
    for i in range(n_stories):  # whether a story ends in a thing there are photos of, and where it ends
        steps = story(rng, compositions)
        end = steps[-1][0]
        k = i % (len(FIRST) + 1)  # which attribute this story's end says first, if any
        first = said_first(end, list(FIRST)[k - 1]) if attribute_first and k else ""
        lines.append(". ".join(c for _, c in steps) + f".{first}{known(end)} {now_it_is(end)}")
    for _ in range(n_chats):
        lines.append(chat_text(conversation(rng, compositions, rng.randint(1, chat_turns)), picture=PICTURE))
    return lines
