"""R-4B multimodal parity with transformers' LlavaOnevisionForConditionalGeneration whose projector is replaced
in memory by R-4B's (pre_norm LayerNorm -> Linear -> GELU -> Linear): tiny SigLIP + tiny Qwen3, random
weights, fp32, checkpoints in the R-4B hub layout and the legacy LLaVA layout; AnyRes tiles, unpadding,
downsampling and newlines; image token counts vs transformers' LLaVA-OneVision image processor.
"""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_models import (
    MEAN,
    PINPOINTS,
    STD,
    RefR4BProjector,
    hf_llava_config,
    image,
    prompt,
    randomize,
    rel_err,
    torch_kernels_on_cpu,  # noqa: F401  (fixture)
)

from r4b.engine.model import ImageProcessor, R4BForConditionalGeneration, from_pretrained, num_image_tokens

transformers = pytest.importorskip("transformers")
from transformers.models.llava_onevision import modeling_llava_onevision as hf_llava  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_kernels_on_cpu")


@pytest.fixture(scope="module")
def patched_projector():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_llava, "LlavaOnevisionMultiModalProjector", RefR4BProjector)
        yield


def to_hub_layout(src, dst):
    """Rewrite a legacy-layout checkpoint (what transformers 5 saves) with R-4B's hub key names."""
    def rename(k):
        for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                         ("vision_tower.", "model.vision_tower.vision_model."),
                         ("multi_modal_projector.", "model.multi_modal_projector."),
                         ("image_newline", "model.image_newline")):
            if k.startswith(old):
                return new + k[len(old):]
        raise AssertionError(k)

    dst.mkdir(exist_ok=True)
    sd = load_file(src / "model.safetensors")
    save_file({rename(k): v for k, v in sd.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())


@pytest.fixture(scope="module")
def ref(patched_projector):
    torch.manual_seed(0)
    model = randomize(hf_llava.LlavaOnevisionForConditionalGeneration(hf_llava_config()).eval())
    assert isinstance(model.model.multi_modal_projector, RefR4BProjector)
    return model


@pytest.fixture(scope="module", params=["hub", "legacy"])
def model(request, ref, tmp_path_factory):
    legacy = tmp_path_factory.mktemp("legacy")
    ref.save_pretrained(legacy)
    keys = load_file(legacy / "model.safetensors").keys()
    assert "language_model.model.embed_tokens.weight" in keys and "vision_tower.post_layernorm.weight" in keys
    path = legacy
    if request.param == "hub":
        path = tmp_path_factory.mktemp("hub")
        to_hub_layout(legacy, path)
    m = from_pretrained(path)
    assert isinstance(m, R4BForConditionalGeneration)
    assert m.model.multi_modal_projector.pre_norm is not None
    return m


def test_packed_multimodal_logits_match_transformers(model, ref):
    proc = ImageProcessor.from_config(model.config, MEAN, STD)
    images = [image(40, 70, 1), image(100, 110, 2)]  # (2, 3) tiles; (4, 4) tiles with anyres_max downsampling
    pix, sizes = zip(*(proc(im) for im in images), strict=True)
    assert [p.shape[0] for p in pix] == [7, 17]
    n_tok = [num_image_tokens(h, w, model.config) for h, w in sizes]
    seqs = [prompt(n_tok[0], 3), torch.randint(0, 90, (5,)), prompt(n_tok[1], 4)]
    lengths = [len(s) for s in seqs]
    batch = dict(input_ids=torch.cat(seqs), position_ids=torch.cat([torch.arange(n) for n in lengths]),
                 cu_seqlens=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32),
                 max_seqlen=max(lengths))
    with torch.no_grad():
        logits = model.compute_logits(model(**batch, pixel_values=list(pix), image_sizes=list(sizes)))
        want = [ref(input_ids=seqs[0][None], pixel_values=pix[0][None], image_sizes=torch.tensor([sizes[0]])).logits[0],
                ref(input_ids=seqs[1][None]).logits[0],
                ref(input_ids=seqs[2][None], pixel_values=pix[1][None], image_sizes=torch.tensor([sizes[1]])).logits[0]]
    assert rel_err(logits, torch.cat(want)) <= 1e-5


def test_image_features_match_transformers(model, ref):
    proc = ImageProcessor.from_config(model.config, MEAN, STD)
    pix, size = proc(image(30, 20, 5))  # tall image: (2, 1) tiles, unpadded columns
    with torch.no_grad():
        (got,) = model.image_features([pix], [size])
        want = ref.model.get_image_features(pix[None], torch.tensor([size])).pooler_output[0]
    assert got.shape == want.shape == (num_image_tokens(*size, model.config), 64)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("hw", [(40, 70), (100, 110), (30, 20), (23, 90), (28, 28)])
def test_token_count_matches_transformers_image_processor(model, ref, hw):
    h, w = hw
    pil = Image.fromarray(image(h, w, 6).permute(1, 2, 0).numpy())
    hf_proc = transformers.LlavaOnevisionImageProcessorPil(
        image_grid_pinpoints=PINPOINTS, size={"height": 28, "width": 28}, image_mean=MEAN, image_std=STD)
    out = hf_proc(pil, return_tensors="pt")
    ours, size = ImageProcessor.from_config(model.config, MEAN, STD)(pil)
    assert size == tuple(out["image_sizes"][0].tolist()) == (h, w)
    assert ours.shape == out["pixel_values"][0].shape
    with torch.no_grad():
        feats = ref.model.get_image_features(out["pixel_values"], out["image_sizes"]).pooler_output[0]
    assert num_image_tokens(h, w, model.config) == feats.shape[0]
    # Same geometry, and a resize close to PIL's bicubic (torch's antialiased bicubic; not bit-exact).
    assert (ours - out["pixel_values"][0]).abs().mean() < 0.01  # measured 0.0006-0.0019


def test_image_token_mismatch_raises(model):
    proc = ImageProcessor.from_config(model.config, MEAN, STD)
    pix, size = proc(image(40, 70, 1))
    ids = prompt(num_image_tokens(*size, model.config) - 1, 0)
    n = len(ids)
    batch = dict(input_ids=ids, position_ids=torch.arange(n), cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
                 max_seqlen=n)
    with pytest.raises(ValueError, match="image tokens"):
        model(**batch, pixel_values=[pix], image_sizes=[size])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(**batch)
    with pytest.raises(ValueError, match=r"pixel_values\[0\] must hold 7 tiles"):
        model(**batch, pixel_values=[pix[:3]], image_sizes=[size])


def test_multi_layer_features_match_transformers(patched_projector, tmp_path):
    ref = randomize(hf_llava.LlavaOnevisionForConditionalGeneration(hf_llava_config(feature_layer=[0, -2])).eval())
    ref.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.model.multi_modal_projector.linear_1.in_features == 64  # two SigLIP layers of 32 concatenated
    pix, size = ImageProcessor.from_config(model.config, MEAN, STD)(image(40, 70, 7))
    with torch.no_grad():
        (got,) = model.image_features([pix], [size])
        want = ref.model.get_image_features(pix[None], torch.tensor([size])).pooler_output[0]
    assert rel_err(got, want) <= 1e-5


def test_gradient_checkpointing_gives_the_same_gradients(model):
    """R-4B's gradient_checkpointing_enable() recomputes both the vision encoder's and the decoder's layers: a
    multimodal step's loss and every gradient are those without it, bit for bit."""
    proc = ImageProcessor.from_config(model.config, MEAN, STD)
    pix, size = proc(image(40, 70, 5))
    seq = prompt(num_image_tokens(*size, model.config), 6)
    T = len(seq)
    batch = dict(input_ids=seq, position_ids=torch.arange(T), cu_seqlens=torch.tensor([0, T], dtype=torch.int32),
                 max_seqlen=T, pixel_values=[pix], image_sizes=[size])

    def step():
        model.zero_grad(set_to_none=True)
        loss = model.compute_logits(model(**batch)).square().mean()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want = step()
    model.gradient_checkpointing_enable()
    assert model.language_model.gradient_checkpointing and model.model.vision_tower.gradient_checkpointing
    try:
        got = step()
    finally:
        model.gradient_checkpointing_enable(False)
    assert len(got) == len(want) > 10
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()
