"""The toy world's build, as a recipe: tiny backbones trained from scratch on synthetic captioned shapes
(``training.toy.world``), then GILL on top of them with the project's own recipes.

    python -m training.toy --out toy-build                # the full build (seeded, CPU)
    python -m training.toy --out toy-small --small        # the reduced build the tests run
    python -m training.toy --out toy-build --install      # ... and ship it as the `toy` preset

Modules: ``plan`` (sizes and steps), ``data`` (the world's corpus, shards, stories, chats, LM text),
``backbones`` (the LM, the CLIP-style encoders, the diffusion model), ``gill`` (GILL, the index and the
decision head through training.train / index.build / training.train_decision), ``report`` (the eval, the
claims against chance and baselines, the picture grid) and ``install``.
"""
