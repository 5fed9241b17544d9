"""cosmiclite: take apart, run and extend CosmicMan (CVPR 2024) in Jupyter.

One concept of the paper per module: `protocol` (Sec. 3.2.2), `captions` and `discretize` (Sec. 4.2),
`masks` (Sec. 4.2), `attention` (Sec. 4.1, 4.3), `hola` (Eq. 3), `train` (Eq. 4) and `scaling` (its memory per
GPU across a node), `judge`/`metrics` (Sec. 5.1).
"""
from .protocol import Annotation, AnnotationError, Protocol, load_protocol

__version__ = "0.1.0"
__all__ = ["Annotation", "AnnotationError", "Protocol", "load_protocol"]
