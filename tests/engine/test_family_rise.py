"""DF-RISE in batches equals one mask per UNet (transformer) call on every family's latents: SDXL (added
conditioning on every call), SD3 (velocity, CFG), FLUX (velocity, one branch, packed inside the call) against the
unmasked prediction (eps) and against the step's x_{t_next} (x_prev); read off by the ratio and by the regression
estimator (whose covariates are built from each family's latent and reference)."""

from __future__ import annotations

import pytest
import torch

from difflens.engine import rise
from difflens.engine.options import RiseOptions
from tests.engine.family_steps import first_state


@pytest.mark.parametrize("estimator", ["ratio", "regression"])
@pytest.mark.parametrize(("model", "guidance", "target"), [
    ("tiny_sdxl", 5.0, "eps"), ("tiny_sd3", 5.0, "eps"), ("tiny_flux", 3.5, "eps"), ("tiny_flux", 3.5, "x_prev")])
def test_df_rise_in_batches_equals_one_mask_per_call(request, model, guidance, target, estimator):
    m = request.getfixturevalue(model)
    state = first_state(m, guidance)
    opts = RiseOptions(num_masks=8 if estimator == "ratio" else 16, batch_size=8, target=target, estimator=estimator)
    masks = rise.make_masks(opts, (16, 16), m.device)
    batched, single = rise.explain_step(state, opts, masks), rise.explain_step_reference(state, opts, masks)
    for name in batched:
        torch.testing.assert_close(batched[name], single[name], rtol=0, atol=1e-5)
    assert batched["rise_raw"].abs().sum() > 0 and torch.isfinite(batched["rise"]).all()
