"""`--learner-notebook NN` (used by `make check NB=NN`) points test_exercises.py at the
functions in the learner's notebooks/NN_*.ipynb instead of the package and solutions."""

from __future__ import annotations

# First, before any test module imports a package that imports triton (the reference
# native-sparse-attention-pytorch does): nsa_tutorial.kernels must set TRITON_INTERPRET.
import nsa_tutorial.kernels  # noqa: F401


def pytest_addoption(parser):
    parser.addoption(
        "--learner-notebook",
        metavar="NN",
        default=None,
        help="check the exercises of notebooks/NN_*.ipynb (as `make check NB=NN` does)",
    )
