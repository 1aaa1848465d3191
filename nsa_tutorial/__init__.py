"""nsa_tutorial: Native Sparse Attention, built stage by stage.

Each module is one stage of the course (see README.md's course map); this
package is what the notebooks build, complete and tested.
"""

from nsa_tutorial.attention import SparseAttention
from nsa_tutorial.norm import RMSNorm, rms_norm
from nsa_tutorial.rotary import RotaryEmbedding, apply_rotary, rotary_frequencies, rotate_pairs

__all__ = [
    "RMSNorm",
    "RotaryEmbedding",
    "SparseAttention",
    "apply_rotary",
    "rms_norm",
    "rotary_frequencies",
    "rotate_pairs",
]
