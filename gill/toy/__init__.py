"""The offline toy world: a synthetic world of captioned shapes, its tiny backbones and the GILL trained on
them (built by ``python -m training.toy``)."""
