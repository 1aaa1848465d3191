"""The compressed and selected branches built from stages 02-04 equal the reference's,
float32, atol 1e-5, across configurations and awkward sequence lengths."""

import contextlib
import io

import pytest
import torch
from grids import BRANCH_PARITY, config_id
from reference_branches import our_branches, reference_branch

from nsa_tutorial import fine_attention as fine_attention_module


@pytest.mark.parametrize("path", ["dense", "gathered"])
@pytest.mark.parametrize("config", BRANCH_PARITY, ids=config_id)
def test_branches_equal_the_reference(config, path, monkeypatch):
    monkeypatch.setattr(fine_attention_module, "DENSE_MAX_SEQ_LEN", 10**9 if path == "dense" else 0)
    for n in (1, 5, 17, 33):
        x = torch.randn(2, n, config["heads"] * 8)
        for branch in ("compressed", "selected"):
            with contextlib.redirect_stdout(io.StringIO()):  # it prints when 0 blocks are selected
                model, expected = reference_branch(config, branch, x)
            ours = our_branches(model, x)[branch]
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5, msg=f"{branch}, n={n}")
