"""End to end: one training step of a Qwen3-4B-shaped decoder on the 16k-token packed row of the attention anchor
(10 documents): embeddings, N decoder layers, final norm, the fused cross-entropy of the next tokens (sum), and
the backward into every weight. bf16 on the GPU.

Providers:
- "r4b (default)": the model as it runs by default (varlen attention, qk_norm_rope, add_rms_norm, swiglu and the
  fused loss on their Triton kernels; the Hopper attention backward on the Gluon dK/dV kernel);
- "r4b unfused small ops": the same model with qk_norm_rope and add_rms_norm replaced by the unfused ops they
  fuse (rms_norm and rope on their Triton kernels, an eager add): what the two fusions save in a whole step;
- "r4b gradient checkpointing": the default model with ``gradient_checkpointing_enable()`` (each layer's forward
  recomputed in the backward): the time it costs and the activation memory it saves;
- "r4b torch.compile (model)": the default model under ``torch.compile(model, fullgraph=True)`` (inductor; r4b's
  ops are custom ops there, r4b/kernels/_compile.py; the loss runs eagerly after it), GPU only;
- "transformers (sdpa, padded)": transformers' Qwen3ForCausalLM with the same weights on the documents as a
  padded batch (its SDPA attention with a padding mask; transformers packs sequences only with flash-attn, which
  is not installed), its LM head and an fp32 loss on the rows that have a next token: what a user gets without
  r4b.

Columns: ms a step, tokens/s (real tokens), model TFLOP/s (6 x matmul parameters x tokens + causal attention, the
padding's work not counted), peak memory above the weights. Each provider's loss is checked against the first's
(bf16: within 5e-2)."""

from __future__ import annotations

import contextlib
import sys

import torch

from bench.bench_varlen_attention import ANCHOR
from bench.harness import Case, Skip, default_device, run_bench

CHECK_TOL = {"cuda": 5e-2, "cpu": 1e-4}


def cases(quick: bool) -> list[Case]:
    if quick:
        cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16)
        lens = [20, 1, 30, 13]
    else:  # Qwen3-4B's layer shapes and vocabulary, 4 of its 36 layers (tied embeddings, as Qwen3-4B)
        cfg = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=4,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128)
        lens = ANCHOR
    T, h, L = sum(lens), cfg["hidden_size"], cfg["num_hidden_layers"]
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    inter = cfg["intermediate_size"]
    per_layer = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * inter  # q, k, v, o and the MLP's matmul weights
    matmul_params = L * per_layer + cfg["vocab_size"] * h  # + the LM head
    # causal attention, forward + backward (flash-attn's count: 4 n^2 d / 2 a head forward, 2.5x that backward)
    attn = sum(3.5 * 4 * n * n * d * hq / 2 for n in lens) * L
    flops = 6 * matmul_params * T + attn
    label = f"{L} layers h={h} T={T} docs={len(lens)}"
    return [Case(label, {"cfg": cfg, "lens": lens}, flops=flops)]


def _batch(case: Case, device: str):
    from r4b.kernels import pack_sequences

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, case.params["cfg"]["vocab_size"], (n,), generator=g) for n in case.params["lens"]]
    p = pack_sequences(seqs)
    targets = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs])  # none after a document's end
    return seqs, p, targets.to(device)


@contextlib.contextmanager
def _unfused_small_ops():
    """r4b.kernels.qk_norm_rope / add_rms_norm (looked up by the model at each call) as the unfused ops."""
    import r4b.kernels as K

    def qk(q, k, wq, wk, pos, eps=1e-6, theta=1e6, *, backend=None):
        return (K.rope(K.rms_norm(q, wq, eps), pos, theta), K.rope(K.rms_norm(k, wk, eps), pos, theta))

    def add(x, r, w, eps=1e-6, *, backend=None):
        s = x + r
        return K.rms_norm(s, w, eps), s

    saved = K.qk_norm_rope, K.add_rms_norm
    K.qk_norm_rope, K.add_rms_norm = qk, add
    try:
        yield
    finally:
        K.qk_norm_rope, K.add_rms_norm = saved


_MODELS: dict[tuple[str, str], tuple] = {}


def _models(case: Case, device: str):
    """(transformers model, r4b model) with the same random weights, in the bench dtype, on the device: built once
    per case (initialised on the device) and shared by the providers."""
    key = (case.label, device)
    if key not in _MODELS:
        import transformers

        from r4b.engine.model import Qwen3Config, Qwen3ForCausalLM

        _MODELS.clear()  # one case's models at a time
        c = case.params["cfg"]
        hf_cfg = transformers.Qwen3Config(**c, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                          max_position_embeddings=8192, attn_implementation="sdpa")
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        torch.manual_seed(0)
        with torch.device(device):
            hf = transformers.Qwen3ForCausalLM(hf_cfg).to(dtype)
            ours = Qwen3ForCausalLM(Qwen3Config(**c, tie_word_embeddings=True)).to(dtype)
        missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
        if unexpected or any(k != "lm_head.weight" for k in missing):  # lm_head is tied to the embeddings
            raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
        _MODELS[key] = hf, ours
    return _MODELS[key]


def providers(device: str) -> dict:
    def r4b(fused: bool, compiled: bool = False, recompute: bool = False):
        def make(case: Case):
            from r4b.kernels import fused_linear_cross_entropy

            if compiled and device != "cuda":
                raise Skip("measured on the GPU only (inductor)")
            try:
                _, model = _models(case, device)
            except ImportError as ex:  # the weights come from transformers' initialisation
                raise Skip(f"transformers is not installed ({ex})") from ex
            forward = torch.compile(model, fullgraph=True) if compiled else model
            _, p, targets = _batch(case, device)
            batch = dict(input_ids=p.flat.to(device), position_ids=p.position_ids.to(device),
                         cu_seqlens=p.cu_seqlens.to(device), max_seqlen=p.max_seqlen)

            def step():
                with contextlib.nullcontext() if fused else _unfused_small_ops():
                    model.zero_grad(set_to_none=True)
                    model.gradient_checkpointing_enable(recompute)  # the model is shared by the providers
                    try:
                        loss = fused_linear_cross_entropy(forward(**batch), model.lm_head.weight, targets,
                                                          reduction="sum")
                        loss.backward()
                    finally:
                        model.gradient_checkpointing_enable(False)
                return loss.detach().float()

            return step

        return make

    def hf(case: Case):
        try:
            model, _ = _models(case, device)
        except ImportError as ex:
            raise Skip(f"transformers is not installed ({ex})") from ex
        seqs, _, _ = _batch(case, device)
        n = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), n), dtype=torch.int64)
        mask = torch.zeros((len(seqs), n), dtype=torch.int64)
        for i, s in enumerate(seqs):  # right padding
            ids[i, :len(s)], mask[i, :len(s)] = s, 1
        labels = torch.where(mask.bool(), ids, -100)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
        # the rows with a next token (none after a document's end): the LM head runs on those only, as a
        # memory-minded transformers user would (logits of the whole padded batch: 12 GB in bf16 here, 4 times
        # that with the fp32 loss and its gradient)
        keep = (labels[:, 1:] != -100).flatten().nonzero().squeeze(1)  # found once: no host sync in the step
        targets = labels[:, 1:].flatten()[keep]

        def step():
            model.zero_grad(set_to_none=True)
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1].flatten(0, 1)[keep]
            logits = model.lm_head(hidden)
            loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")  # fp32, as r4b's
            del logits, hidden
            loss.backward()
            return loss.detach().float()

        return step

    # the compiled model last: inductor's compile (a minute or so) must not hold up the other rows under a limit
    return {"r4b (default)": r4b(True), "r4b unfused small ops": r4b(False),
            "r4b gradient checkpointing": r4b(True, recompute=True), "transformers (sdpa, padded)": hf,
            "r4b torch.compile (model)": r4b(True, compiled=True)}


def main(argv: list[str] | None = None) -> list[dict]:
    argv = argv or []
    device = default_device()
    quick = "--quick" in argv or device == "cpu"

    def extra(case, row):
        return {"tokens_per_s": sum(case.params["lens"]) / row["ms"] * 1e3}

    return run_bench("model_step", cases(quick), providers(device), device=device, quick=quick, extra_columns=extra,
                     check_tol=CHECK_TOL[device])


if __name__ == "__main__":
    main(sys.argv[1:])
