"""The tiny offline default: a random Qwen-Image-Edit written in the diffusers folder layout (`tiny_model`) and a
generated dataset of edit pairs (`data`); `python -m demo` writes both for `make demo`. Neither stage imports
this package: real checkpoints and the tiny one load through the same `from_pretrained` code (shared/models.py).
"""
