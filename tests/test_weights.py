"""Checkpoint I/O: r4b save_pretrained -> transformers / r4b load back the same logits (single file and shards);
SigLIP weights the model does not use are skipped; each bad checkpoint raises CheckpointError naming the tensors."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import (
    IMAGE_TOKEN,
    MEAN,
    PINPOINTS,
    STD,
    RefR4BProjector,
    hf_llava_config,
    image,
    packed,
    prompt,
    qwen3_hf_config,
    randomize,
    rel_err,
    tiny_qwen3,
    torch_kernels_on_cpu,  # noqa: F401  (fixture)
)

from r4b.engine.model import (
    CheckpointError,
    ImageProcessor,
    Qwen3Config,
    R4BConfig,
    R4BForConditionalGeneration,
    SiglipConfig,
    from_pretrained,
    num_image_tokens,
    save_pretrained,
)

transformers = pytest.importorskip("transformers")
from transformers.models.llava_onevision import modeling_llava_onevision as hf_llava  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_kernels_on_cpu")


def tiny_r4b(tie: bool = False, seed: int = 0) -> R4BForConditionalGeneration:
    cfg = R4BConfig.from_hf(hf_llava_config(tie).to_dict())
    assert cfg.image_token_index == IMAGE_TOKEN and cfg.projector_pre_norm is False  # plain LLaVA-OV config
    cfg.projector_pre_norm = True
    torch.manual_seed(seed)
    return randomize(R4BForConditionalGeneration(cfg).eval(), seed)


def multimodal_inputs(model):
    pix, size = ImageProcessor.from_config(model.config, MEAN, STD)(image(40, 70, 1))
    ids = prompt(num_image_tokens(*size, model.config), 2)
    n = len(ids)
    return ids, pix, size, dict(input_ids=ids, position_ids=torch.arange(n),
                                cu_seqlens=torch.tensor([0, n], dtype=torch.int32), max_seqlen=n)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_r4b_round_trip_through_transformers(tmp_path, monkeypatch, tie):
    model = tiny_r4b(tie)
    save_pretrained(model, tmp_path / "ckpt")
    keys = load_file(tmp_path / "ckpt" / "model.safetensors").keys()
    assert "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in keys  # R-4B hub naming
    assert "model.multi_modal_projector.pre_norm.weight" in keys and "model.image_newline" in keys
    assert ("lm_head.weight" in keys) != tie
    assert not list(tmp_path.glob(".ckpt*"))  # no temporary directory left behind
    monkeypatch.setattr(hf_llava, "LlavaOnevisionMultiModalProjector", RefR4BProjector)
    ref, info = hf_llava.LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "ckpt",
                                                                                output_loading_info=True)
    # r4b never builds SigLIP's post_layernorm (LLaVA features come before it), so it is not written.
    post_ln = {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"}
    assert info["missing_keys"] == post_ln
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, pix, size, batch = multimodal_inputs(model)
    with torch.no_grad():
        got = model.compute_logits(model(**batch, pixel_values=[pix], image_sizes=[size]))
        want = ref.eval()(input_ids=ids[None], pixel_values=pix[None], image_sizes=torch.tensor([size])).logits[0]
    assert rel_err(got, want) <= 1e-5


def test_r4b_sharded_round_trip_and_overwrite(tmp_path):
    model = tiny_r4b(seed=1)
    path = tmp_path / "ckpt"
    save_pretrained(tiny_r4b(seed=2), path)  # an older checkpoint at the same path is replaced atomically
    save_pretrained(model, path, max_shard_bytes=40_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (path / "model.safetensors").exists()
    assert sorted(p.name for p in path.glob("*.safetensors")) == shards
    back = from_pretrained(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


def test_failed_overwrite_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """If moving the new checkpoint into place fails, the previous one is back at the path and no temporary
    directory is left behind."""
    from r4b.engine.model import weights as w

    path = tmp_path / "ckpt"
    first = tiny_qwen3(False).eval()
    save_pretrained(first, path)
    before = sorted(p.name for p in path.iterdir())
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(dst) == path and Path(src).name.startswith(".ckpt.tmp-"):  # the new checkpoint into place
            raise OSError("simulated failure")
        return real_rename(src, dst)

    monkeypatch.setattr(w.os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(tiny_qwen3(True).eval(), path)
    monkeypatch.setattr(w.os, "rename", real_rename)
    assert sorted(p.name for p in path.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    back = from_pretrained(path)
    assert torch.equal(back.lm_head.weight, first.lm_head.weight)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_qwen3_round_trip_through_transformers(tmp_path, tie):
    model = tiny_qwen3(tie).eval()
    save_pretrained(model, tmp_path)
    ref = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    seqs, batch = packed([6, 2], model.config.vocab_size)
    with torch.no_grad():
        got = model.compute_logits(model(**batch))
        want = torch.cat([ref(input_ids=s[None]).logits[0] for s in seqs])
    assert rel_err(got, want) <= 1e-5
    back = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tie


def test_unused_siglip_weights_are_skipped(tmp_path):
    save_pretrained(tiny_r4b(), tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(32)
    sd["model.vision_tower.vision_model.head.probe"] = torch.ones(1, 1, 32)
    save_file(sd, tmp_path / "model.safetensors")
    assert isinstance(from_pretrained(tmp_path), R4BForConditionalGeneration)


def test_plain_llava_projector_without_pre_norm_loads(tmp_path):
    save_pretrained(tiny_r4b(), tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd = {k: v for k, v in sd.items() if ".pre_norm." not in k}
    save_file(sd, tmp_path / "model.safetensors")
    assert from_pretrained(tmp_path).model.multi_modal_projector.pre_norm is None


# ---- bad checkpoints: each raises CheckpointError (or FileNotFoundError) naming what is wrong ----


@pytest.fixture
def qwen3_ckpt(tmp_path):
    save_pretrained(tiny_qwen3(tie=False).eval(), tmp_path)
    return tmp_path


def rewrite(path, fn):
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors")


def test_missing_key(qwen3_ckpt):
    rewrite(qwen3_ckpt, lambda sd: (sd.pop("model.layers.1.mlp.up_proj.weight"), sd.pop("lm_head.weight")))
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): lm_head.weight, model.layers.1.mlp.up_proj"):
        from_pretrained(qwen3_ckpt)


def test_unexpected_key(qwen3_ckpt):
    rewrite(qwen3_ckpt, lambda sd: sd.update({"model.layers.0.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): model.layers.0.extra.weight"):
        from_pretrained(qwen3_ckpt)


def test_shape_mismatch(qwen3_ckpt):
    rewrite(qwen3_ckpt, lambda sd: sd.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight: checkpoint \(63,\) vs model \(64,\)"):
        from_pretrained(qwen3_ckpt)


def test_dtype_mismatch(qwen3_ckpt):
    rewrite(qwen3_ckpt, lambda sd: sd.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight: torch.int32 \(a float tensor is required\)"):
        from_pretrained(qwen3_ckpt)


def test_mixed_float_dtypes_need_dtype(qwen3_ckpt):
    rewrite(qwen3_ckpt, lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"].half()}))
    with pytest.raises(CheckpointError, match="mixed float dtypes"):
        from_pretrained(qwen3_ckpt)
    assert from_pretrained(qwen3_ckpt, dtype=torch.float32).model.norm.weight.dtype == torch.float32


def test_truncated_file(qwen3_ckpt):
    f = qwen3_ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        from_pretrained(qwen3_ckpt)


def test_config_does_not_match_weights(qwen3_ckpt):
    cfg = json.loads((qwen3_ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    cfg["intermediate_size"] = 80
    (qwen3_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(qwen3_ckpt)
    msg = str(e.value)
    assert "missing keys (11): model.layers.2." in msg  # the third layer's 11 tensors
    assert "model.layers.0.mlp.up_proj.weight: checkpoint (96, 64) vs model (80, 64)" in msg


def test_tied_config_with_different_lm_head(qwen3_ckpt):
    cfg = json.loads((qwen3_ckpt / "config.json").read_text())
    (qwen3_ckpt / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        from_pretrained(qwen3_ckpt)


def test_index_names_missing_shard(tmp_path):
    save_pretrained(tiny_qwen3(tie=True).eval(), tmp_path, max_shard_bytes=20_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard files that do not exist: \\['{shard.name}'\\]"):
        from_pretrained(tmp_path)


def test_no_weights_or_pickle_only(qwen3_ckpt):
    (qwen3_ckpt / "model.safetensors").unlink()
    (qwen3_ckpt / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="only safetensors are read"):
        from_pretrained(qwen3_ckpt)


def test_bad_configs_raise():
    with pytest.raises(NotImplementedError, match="rope_type='yarn'"):
        Qwen3Config.from_hf({**qwen3_hf_config(False).to_dict(), "rope_parameters": {"rope_type": "yarn"}})
    with pytest.raises(ValueError, match="num_attention_heads \\(4\\) must be a multiple of num_key_value_heads"):
        Qwen3Config(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be 'full'"):
        R4BConfig(vision_config=SiglipConfig(num_hidden_layers=2), vision_feature_select_strategy="default")


def test_image_processor_reads_preprocessor_config(tmp_path):
    cfg = tiny_r4b().config
    assert ImageProcessor.from_pretrained(tmp_path, cfg).mean == (0.5, 0.5, 0.5)  # no file: SigLIP defaults
    pre = {"image_mean": [0.48, 0.45, 0.4], "image_std": [0.27, 0.26, 0.28], "image_grid_pinpoints": PINPOINTS}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    proc = ImageProcessor.from_pretrained(tmp_path, cfg)
    assert proc.mean == (0.48, 0.45, 0.4) and proc.std == (0.27, 0.26, 0.28) and proc.tile_size == 28
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**pre, "image_grid_pinpoints": [[28, 28]]}))
    with pytest.raises(ValueError, match="image_grid_pinpoints differ"):
        ImageProcessor.from_pretrained(tmp_path, cfg)


def test_left_out_config_fields_mean_transformers_defaults():
    """A config field left out means transformers' class default (composite configs written by transformers 4.x
    keep only the nested fields that differ from those): the constants match transformers, and a sparse nested
    text_config / vision_config reads as transformers reads it."""
    import transformers

    from r4b.engine.model.config import HF_QWEN3_DEFAULTS, HF_SIGLIP_VISION_DEFAULTS, config_from_hf

    q = transformers.Qwen3Config()
    for key, value in HF_QWEN3_DEFAULTS.items():
        want = q.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(q, key)
        assert want == value, key
    s = transformers.SiglipVisionConfig()
    for key, value in HF_SIGLIP_VISION_DEFAULTS.items():
        assert getattr(s, key) == value, key
    text = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_key_value_heads": 8}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "num_attention_heads": 2}
    cfg = config_from_hf({"text_config": text, "vision_config": vision, "image_token_index": 5,
                          "vision_feature_layer": -1})
    hf_text, hf_vision = transformers.Qwen3Config(**text), transformers.SiglipVisionConfig(**vision)
    for key in ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
        assert getattr(cfg.text_config, key) == getattr(hf_text, key), key
    for key in ("intermediate_size", "num_hidden_layers", "image_size", "patch_size"):
        assert getattr(cfg.vision_config, key) == getattr(hf_vision, key), key
