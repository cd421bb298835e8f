"""Generation: r4b's engine (LLM.generate: paged KV cache, batched decode) against transformers' ``generate``
on the same random weights, at the ANCHORS shape: a Qwen3-4B-shaped model (36 layers, bf16), prompts of 128
tokens, 64 new tokens each, greedy, end-of-turn ignored, batch 1 and 32. The weight-read floor of a decode step
(every weight read once, at the copy bandwidth measured in this run) bounds batch 1: ANCHORS gives 535 tok/s on
an H200, HF 17 tok/s at bs1 and 648 tok/s at bs32.

Providers: r4b (decode steps replayed from CUDA graphs on a GPU), r4b with eager decode steps (GPU only: what
the graphs save; its tokens must equal the graphs'), transformers. Columns: ms for the whole batch (prompt prefill
included), new tokens/s, x_floor (batch 1: the row's ms a step over the floor's; 1 = at the floor) and ``same``
(how many of r4b's sequences equal transformers' greedy tokens: bf16 rounding may make a long greedy run part
ways, so it is reported, not asserted; tests/test_llm.py checks the engine in fp32). Each provider runs once warm
and is timed ``reps`` times (median): a full-size HF call takes seconds.

Then the prefix cache: requests that share a 1024-token system prompt, each call with new questions, r4b with and
without its prefix cache (``x_cold``: how many times faster with it). ``--prefix-only`` runs that case alone on an
8-layer, 512-wide model, 8 requests of 1024 + 32 tokens, 8 new each: big enough for a CPU to show it."""

from __future__ import annotations

import statistics
import sys
import time

import torch

from bench.harness import copy_bandwidth_gbps, default_device, format_row, write_results

FULL = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128)
QUICK = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)


def _timed(fn, device: str, reps: int) -> tuple[float, object]:
    out = fn()  # warm: compilation, allocator, the engine's first steps
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


MID = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
           num_key_value_heads=2, head_dim=64)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = argv or []
    device = default_device()
    if "--prefix-only" in argv:  # the shared-prompt case alone, on a model big enough for a CPU to show it
        from r4b.engine.model import Qwen3Config, Qwen3ForCausalLM

        torch.manual_seed(0)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        with torch.device(device):
            model = Qwen3ForCausalLM(Qwen3Config(**MID, max_position_embeddings=4096)).to(dtype).eval()
        rows = _shared_prefix(model, MID, device, False, 3, shape=(1024, 32, 8, 8))
        write_results("generate_prefix", rows, device)
        return rows
    quick = "--quick" in argv or device == "cpu"
    cfg, prompt_len, new, batches, reps = (QUICK, 16, 8, (1, 4), 2) if quick else (FULL, 128, 64, (1, 32), 2)
    try:
        import transformers
    except ImportError:
        transformers = None
    from r4b.engine.llm import LLM
    from r4b.engine.model import Qwen3Config, Qwen3ForCausalLM
    from r4b.engine.sampling import SamplingParams

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        ours = Qwen3ForCausalLM(Qwen3Config(**cfg, tie_word_embeddings=True)).to(dtype).eval()
        hf = None
        if transformers is not None:
            hf_cfg = transformers.Qwen3Config(**cfg, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                              rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                              max_position_embeddings=4096, attn_implementation="sdpa")
            hf = transformers.Qwen3ForCausalLM(hf_cfg).to(dtype).eval()
            ours.load_state_dict(hf.state_dict(), strict=False)  # lm_head is tied to the embeddings
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    copy = copy_bandwidth_gbps(device)
    floor_step_ms = weight_bytes / copy / 1e6 if copy else None  # HBM moves about as many bytes reading alone
    kw = dict(max_num_seqs=max(batches), max_num_batched_tokens=max(batches) * prompt_len,
              num_kv_blocks=max(batches) * (prompt_len + new) // 16 + 8, block_size=16, max_model_len=4096)
    # no prefix cache here: the timed reps repeat the same prompts, which the cache would hold (_shared_prefix times it)
    llm = LLM(ours, None, prefix_caching=False, **kw)  # CUDA graphs for the decode steps on a GPU
    eager = LLM(ours, None, cuda_graphs=False, prefix_caching=False, **kw) if device == "cuda" else None
    rows: list[dict] = []
    g = torch.Generator().manual_seed(0)
    for bs in batches:
        prompts = torch.randint(0, cfg["vocab_size"], (bs, prompt_len), generator=g)
        case = f"bs{bs} prompt {prompt_len} new {new} L{cfg['num_hidden_layers']}"
        params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        runs = {"r4b LLM.generate": lambda p=prompts, sp=params: [o.outputs[0].token_ids for o in llm.generate(
            list(p), sp, use_tqdm=False)]}
        if eager is not None:
            runs["r4b eager decode"] = lambda p=prompts, sp=params: [o.outputs[0].token_ids for o in eager.generate(
                list(p), sp, use_tqdm=False)]
        if hf is not None:
            ids = prompts.to(device)

            def hf_run(ids=ids):
                with torch.inference_mode():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=0)
                return out[:, prompt_len:].tolist()

            runs["transformers generate"] = hf_run
        outs = {}
        for name, fn in runs.items():
            row: dict = {"op": "generate", "case": case, "provider": name}
            try:
                ms, outs[name] = _timed(fn, device, reps)
                row.update(ms=ms, tokens_per_s=bs * new / ms * 1e3, ms_per_step=ms / new)
                if floor_step_ms and bs == 1:
                    row["x_floor"] = row["ms_per_step"] / floor_step_ms
            except torch.OutOfMemoryError as ex:
                row["skipped"] = f"out of memory: {str(ex).splitlines()[0][:160]}"
            except Exception as ex:  # noqa: BLE001 - report and go on
                row["skipped"] = f"error: {type(ex).__name__}: {str(ex).splitlines()[0][:200]}"
            rows.append(row)
        mine, theirs = outs.get("r4b LLM.generate"), outs.get("transformers generate")
        if mine is not None and theirs is not None:
            rows[-len(runs)]["same"] = f"{sum(a == b for a, b in zip(mine, theirs, strict=True))}/{bs}"
        if mine is not None and outs.get("r4b eager decode") is not None and outs["r4b eager decode"] != mine:
            rows[-len(runs) + 1]["check"] = "MISMATCH (eager decode gave other tokens than the graphs)"
        for row in rows[-len(runs):]:
            print(format_row(row) + (f" tok/s={row['tokens_per_s']:.4g}" if "tokens_per_s" in row else "")
                  + (f" same={row['same']}" if "same" in row else ""), flush=True)
        write_results("generate", rows, device, plot=False)
    llm = eager = None  # free their caches before the next engine takes its own
    rows += _shared_prefix(ours, cfg, device, quick, reps)
    if floor_step_ms:
        print(f"weight-read floor: {weight_bytes / 1e9:.2f} GB a step at {copy:.0f} GB/s = "
              f"{floor_step_ms:.3f} ms = {1e3 / floor_step_ms:.0f} tok/s at bs1")
    write_results("generate", rows, device)
    return rows


def _shared_prefix(model, cfg: dict, device: str, quick: bool, reps: int,
                   shape: tuple[int, int, int, int] | None = None) -> list[dict]:
    """Requests that share a long system prompt, each call with new questions (a chat service's traffic): r4b with
    and without the prefix cache, the cache warm from the calls before. Columns as above, plus the prompt tokens
    computed a call and ``x_cold`` (the uncached run's ms over this one's)."""
    from r4b.engine.llm import LLM
    from r4b.engine.sampling import SamplingParams

    system_len, question_len, bs, new = shape or ((48, 8, 4, 4) if quick else (1024, 64, 32, 16))
    g = torch.Generator().manual_seed(1)
    system = torch.randint(0, cfg["vocab_size"], (system_len,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    case = f"bs{bs} shared {system_len} + own {question_len} new {new} L{cfg['num_hidden_layers']}"
    kw = dict(max_num_seqs=bs, max_num_batched_tokens=bs * (system_len + question_len), block_size=16,
              num_kv_blocks=2 * bs * (system_len + question_len + new) // 16 + 8, max_model_len=4096)
    rows, outs = [], {}
    for name, cached in (("r4b, no prefix cache", False), ("r4b, prefix cache", True)):
        llm = LLM(model, None, prefix_caching=cached, **kw)
        calls = iter(range(1000))

        def run(llm=llm, calls=calls):
            qg = torch.Generator().manual_seed(100 + next(calls))  # new questions every call, the same per provider
            qs = torch.randint(0, cfg["vocab_size"], (bs, question_len), generator=qg).tolist()
            return [o.outputs[0].token_ids for o in llm.generate([system + q for q in qs], params, use_tqdm=False)]

        row: dict = {"op": "generate", "case": case, "provider": name}
        try:
            run()  # the first call fills the cache; every timed one (and _timed's warm call) has new questions
            computed = llm.stats["prompt_tokens_computed"]
            ms, outs[name] = _timed(run, device, reps)
            row.update(ms=ms, tokens_per_s=bs * new / ms * 1e3,
                       prompt_tokens_a_call=(llm.stats["prompt_tokens_computed"] - computed) / (reps + 1))
        except torch.OutOfMemoryError as ex:
            row["skipped"] = f"out of memory: {str(ex).splitlines()[0][:160]}"
        except Exception as ex:  # noqa: BLE001 - report and go on
            row["skipped"] = f"error: {type(ex).__name__}: {str(ex).splitlines()[0][:200]}"
        rows.append(row)
        del llm
    if "ms" in rows[0] and "ms" in rows[1]:
        rows[1]["x_cold"] = rows[0]["ms"] / rows[1]["ms"]
        a, b = outs.values()
        rows[1]["same"] = f"{sum(x == y for x, y in zip(a, b, strict=True))}/{bs}"
    for row in rows:
        print(format_row(row) + "".join(f" {k}={row[k]:.4g}" if isinstance(row[k], float) else f" {k}={row[k]}"
                                        for k in ("tokens_per_s", "prompt_tokens_a_call", "x_cold", "same")
                                        if k in row), flush=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
