"""SigLIP vision tower parity with transformers' SiglipVisionModel (random weights, fp32)."""

import pytest
import torch
from tiny_models import randomize, rel_err, siglip_hf_config

from r4b.engine.model import SiglipConfig, SiglipVisionModel

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair():
    hf_cfg = siglip_hf_config(layers=3)
    ref = randomize(transformers.SiglipVisionModel(hf_cfg).eval())
    model = SiglipVisionModel(SiglipConfig.from_hf(hf_cfg.to_dict())).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return ref, model


def test_last_hidden_state_matches(pair):
    ref, model = pair
    px = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(px)
        want = ref(pixel_values=px).last_hidden_state
    assert got.shape == (3, 16, 32)
    assert rel_err(got, want) <= 1e-5


def test_hidden_states_of_each_layer_match(pair):
    ref, model = pair
    px = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(pixel_values=px, output_hidden_states=True).hidden_states  # embeddings + 3 layers
        got = model.hidden_states(px, [0, 1, -2, -1])
    for g, w in zip(got, [want[0], want[1], want[-2], want[-1]], strict=True):
        assert rel_err(g, w) <= 1e-5


def test_tiles_do_not_attend_to_each_other(pair):
    _, model = pair
    px = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        both = model(px)
        alone = model(px[1:])
    assert rel_err(both[1], alone[0]) <= 1e-5


def test_wrong_pixel_shape_raises(pair):
    _, model = pair
    with pytest.raises(ValueError, match=r"pixel_values must be \(N, 3, 28, 28\)"):
        model(torch.randn(1, 3, 32, 32))
