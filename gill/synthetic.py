"""The one tiny synthetic world of the library: the words and colours that the ``tiny-random`` preset (its
tokenizer's corpus and its four-picture retrieval corpus) and ``python -m gill demo`` are made of. (The
offline default model's world of coloured shapes is the toy build's own: training/toy/world.py.)"""

COLORS = {
    "red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40),
    "purple": (140, 40, 160), "orange": (240, 140, 20), "black": (10, 10, 10), "white": (245, 245, 245),
}
TINY_COLORS = ("red", "green", "blue", "yellow")  # tiny-random's words and pictures
SIZES = ("small", "large")
SHAPES = ("circle", "square", "triangle")
PLACES = ("on the left", "on the right", "in the middle", "moves to the right", "next to it")
