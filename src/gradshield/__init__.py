"""gradshield: gradient-based adversarial defenses and their honest evaluation.

Images are float32 NCHW tensors in [0, 1]; every model normalises inside itself.
"""

__version__ = "0.1.0"
