"""nsa_tutorial: Native Sparse Attention, built stage by stage.

Each module is one stage of the course (see README.md's course map); this
package is what the notebooks build, complete and tested.

Shapes in docstrings and einops patterns use one set of letters everywhere:

    b       batch
    h       heads: query heads, or key/value heads in a pattern with (h g)
    hq, hk  query heads and key/value heads, where both appear
    g       query heads per key/value head (the GQA group)
    n       tokens of the sequence
    i, j    queries and keys, where they differ from n (a chunk, a decoding step)
    d       head size (dim_head); `dim` is the model width
    w       blocks: compressed blocks or selection blocks
    l       tokens of one block (compression block, selection block, stride, window chunk)
    s       selected slots per query (up to top-n)
    m       memory tokens
    c       chunks of the sliding window
    f, r    rotary frequencies (d / 2) and the two members of a rotated pair
    branch  the three branches of Eq. 5: compressed, selected, sliding
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
