"""Training data: assistant labels of the chat template, packing (collate, plan_batches), the resumable rank-sharded
loaders, bad-row handling, and the BPO prompt data."""

import json
import logging

import pytest
import torch
from tiny_models import PINPOINTS

from r4b.engine.chat import ChatTokenizer
from r4b.engine.model import Qwen3Config, R4BConfig, SiglipConfig
from r4b.engine.train.data import (
    Example,
    PackedLoader,
    PromptDataset,
    PromptLoader,
    SFTDataset,
    collate,
    encode_sft_row,
    plan_batches,
    read_jsonl,
)


@pytest.fixture(scope="module")
def tok():
    return ChatTokenizer.demo()


def _runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    out, lab = [], labels.tolist() + [False]
    for i, v in enumerate(lab):
        if v and (i == 0 or not lab[i - 1]):
            start = i
        if not v and i > 0 and lab[i - 1]:
            out.append((start, i))
    return out


def _trained_texts(tok, enc, labels) -> list[str]:
    return [tok.decode(enc.input_ids[a:b]) for a, b in _runs(labels)]


CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},  # before the last query: answer only
        {"role": "user", "content": "And 3+3? Explain, please."},
        {"role": "assistant", "content": "Sure: 6, since 3 doubled is 6.", "reasoning_content": "\nDouble 3.\n"}]


@pytest.mark.parametrize("train_on, expected", [
    ("all", ["4<|im_end|>", "<think>\nDouble 3.\n</think>\n\nSure: 6, since 3 doubled is 6.<|im_end|>"]),
    ("last", ["<think>\nDouble 3.\n</think>\n\nSure: 6, since 3 doubled is 6.<|im_end|>"]),
])
def test_labels_cover_assistant_content_thinking(tok, train_on, expected):
    enc, labels = tok.encode_chat_for_training(CHAT, train_on=train_on)
    text = tok.apply_chat_template(CHAT, add_generation_prompt=False)
    assert enc.input_ids.dtype == torch.int64 and labels.dtype == torch.bool and labels.shape == enc.input_ids.shape
    assert enc.input_ids.tolist() == tok.encode(text)  # one encode of the whole text
    assert _trained_texts(tok, enc, labels) == expected
    assert text.endswith(expected[-1] + "\n")


def test_labels_non_thinking_answer_trains_the_short_suffix(tok):
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello, world!"}]
    enc, labels = tok.encode_chat_for_training(msgs, train_on="last")
    assert enc.input_ids.tolist() == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False))
    assert _trained_texts(tok, enc, labels) == ["<think>\n\n</think>\n\n Hello, world!<|im_end|>"]
    ex = encode_sft_row(tok, {"messages": msgs}, where="r", max_seq_len=512)
    assert not ex.thinking and ex.where == "r"


def test_labels_consecutive_assistant_turns(tok):
    msgs = [{"role": "user", "content": "Go"}, {"role": "assistant", "content": "one"},
            {"role": "assistant", "content": "<think>hmm</think>two"}]
    enc, labels = tok.encode_chat_for_training(msgs)
    assert _trained_texts(tok, enc, labels) == ["one<|im_end|>", "<think>\nhmm\n</think>\n\ntwo<|im_end|>"]


def test_training_encoding_errors(tok):
    with pytest.raises(ValueError, match=r"messages\[-1\] must be the assistant turn to train on, got role 'user'"):
        tok.encode_chat_for_training(CHAT[:4])
    with pytest.raises(ValueError, match="train_on must be 'all' or 'last', got 'first'"):
        tok.encode_chat_for_training(CHAT, train_on="first")
    with pytest.raises(ValueError, match="non-empty list"):
        tok.encode_chat_for_training([])


def test_encode_sft_row_formats(tok):
    ex = encode_sft_row(tok, {"prompt": "2+2?", "response": "<think>\nAdd.\n</think>\n\n4", "system": "S"},
                        where="f:1", max_seq_len=512)
    assert ex.thinking and ex.labels.dtype == torch.bool and ex.input_ids.dtype == torch.int64
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n2+2?")
    assert _trained_texts(tok, ex, ex.labels) == ["<think>\nAdd.\n</think>\n\n4<|im_end|>"]
    with pytest.raises(ValueError, match=r"^f:2: \d+ tokens, longer than max_seq_len=8"):
        encode_sft_row(tok, {"prompt": "2+2?", "response": "4"}, where="f:2", max_seq_len=8)
    with pytest.raises(ValueError, match="^f:3: a row needs 'messages', or 'prompt' and 'response'"):
        encode_sft_row(tok, {"question": "x"}, where="f:3", max_seq_len=512)


def test_encode_sft_row_with_tools(tok):
    """A tool-using conversation: the tools block is in the prompt, the assistant's calls and final answer are
    trained, the tool result is not; a row whose tools are not a list is refused."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    row = {"tools": tools, "messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "add", "arguments": {"a": 2, "b": 2}}}]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "4"}]}
    ex = encode_sft_row(tok, row, where="f:1", max_seq_len=1024)
    text = tok.decode(ex.input_ids)
    assert text == tok.apply_chat_template(row["messages"], tools=tools, add_generation_prompt=False)
    assert "# Tools" in text and "<tool_response>\n4\n</tool_response>" in text
    # Qwen3's template: a turn after the last user query gets a <think> block only when it has a thought or is last
    assert _trained_texts(tok, ex, ex.labels) == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>',
        "<think>\n\n</think>\n\n4<|im_end|>"]
    with pytest.raises(ValueError, match="^f:2: 'tools' must be a list"):
        encode_sft_row(tok, {**row, "tools": "add"}, where="f:2", max_seq_len=1024)
    with pytest.raises(ValueError, match=r"^f:3: tools\[0\] must be a JSON object"):
        encode_sft_row(tok, {**row, "tools": ["add"]}, where="f:3", max_seq_len=1024)


def test_collate_hand_computed():
    a = Example(torch.tensor([10, 11, 12, 13]), torch.tensor([False, False, True, True]), thinking=True)
    b = Example(torch.tensor([20, 21, 22]), torch.tensor([True, False, True]))
    batch = collate([a, b])
    assert batch.input_ids.tolist() == [10, 11, 12, 13, 20, 21, 22]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert batch.cu_seqlens.tolist() == [0, 4, 7] and batch.cu_seqlens.dtype == torch.int32
    assert batch.seq_ids.tolist() == [0, 0, 0, 0, 1, 1, 1] and batch.seq_ids.dtype == torch.int32
    assert batch.max_seqlen == 4
    # position p predicts token p + 1; nothing at a sequence's last position (b's first label must not leak into a)
    assert batch.loss_mask.tolist() == [False, True, True, False, False, True, False]
    assert batch.targets.tolist() == [-100, 12, 13, -100, -100, 22, -100]
    assert batch.targets.dtype == torch.int64 and batch.num_loss_tokens == 3
    assert batch.thinking.tolist() == [True, False]
    assert set(batch.model_inputs()) == {"input_ids", "position_ids", "cu_seqlens", "max_seqlen"}
    moved = batch.to("cpu")
    assert moved is not batch and torch.equal(moved.targets, batch.targets)
    with pytest.raises(ValueError, match="examples must be a non-empty list"):
        collate([])
    with pytest.raises(ValueError, match=r"examples\[0\].labels must be bool"):
        collate([Example(torch.tensor([1, 2]), torch.tensor([1, 1]))])


def test_collate_targets_are_the_trained_tokens(tok):
    rows = [{"prompt": "2+2?", "response": "4"}, {"messages": CHAT}]
    exs = [encode_sft_row(tok, r, where=str(i), max_seq_len=512) for i, r in enumerate(rows)]
    batch = collate(exs)
    trained = tok.decode(batch.targets[batch.loss_mask])
    assert trained == "".join(t for e in exs for t in _trained_texts(tok, e, e.labels))
    assert batch.num_loss_tokens == sum(int(e.labels.sum()) for e in exs)  # no example's first token is trained


def test_plan_batches():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 50, (300,), generator=g).tolist()
    rows = plan_batches(lengths, 64, seed=3, epoch=0)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= 1.15 * sum(lengths) / 64  # well filled
    assert rows == plan_batches(lengths, 64, seed=3, epoch=0)
    assert rows != plan_batches(lengths, 64, seed=3, epoch=1)
    assert rows != plan_batches(lengths, 64, seed=4, epoch=0)
    assert plan_batches([3, 3, 3], 6, seed=0, epoch=0, shuffle=False) == [[0, 1], [2]]
    with pytest.raises(ValueError, match=r"lengths\[2\]=70 is longer than max_tokens=64"):
        plan_batches([1, 2, 70], 64, seed=0, epoch=0)
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1, got 0"):
        plan_batches([1], 0, seed=0, epoch=0)


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"row {i} " + "x y " * (i % 7), "response": f"answer {i}" + " z" * (i % 5)} for i in range(n)]


@pytest.fixture(scope="module")
def sft(tok):
    return SFTDataset(_rows(40), tok, max_seq_len=256, progress=False)


def _key(batches) -> list[list[int]]:
    return [b.input_ids.tolist() + [-1] + b.cu_seqlens.tolist() for b in batches]


def test_sft_dataset_stats(sft):
    s = sft.stats()
    assert s["rows"] == len(sft) == 40 and s["skipped"] == 0 and s["think"] == 0 and s["no_think"] == 40
    assert s["tokens"] == sum(sft.lengths) and 0 < s["trained_tokens"] < s["tokens"]


@pytest.mark.parametrize("k", [1, 3, 4, 7])
def test_packed_loader_resumes_exactly(sft, k):
    max_tokens = 3 * max(sft.lengths)
    loader = PackedLoader(sft, max_tokens=max_tokens, seed=5)
    steps = loader.steps_per_epoch(2)
    assert steps >= 3
    for _ in range(k):
        loader.next_step(2)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = PackedLoader(sft, max_tokens=max_tokens, seed=123)
    resumed.load_state_dict(state)
    assert resumed.seed == 5
    n = 2 * steps  # crosses at least one epoch boundary
    assert _key(b for _ in range(n) for b in resumed.next_step(2)) == _key(b for _ in range(n) for b in
                                                                            loader.next_step(2))
    assert resumed.epoch == loader.epoch >= 1


def test_packed_loader_epochs_and_state_checks(sft):
    loader = PackedLoader(sft, max_tokens=200, seed=1)
    first = _key(loader.next_step(1))
    for _ in range(loader.steps_per_epoch(1) - 1):
        loader.next_step(1)
    assert loader.epoch == 0
    second = _key(loader.next_step(1))
    assert loader.epoch == 1 and second != first
    with pytest.raises(ValueError, match=r"state\['max_tokens'\]=100 does not match"):
        loader.load_state_dict({**loader.state_dict(), "max_tokens": 100})
    with pytest.raises(ValueError, match="max_tokens=10 is shorter than the longest example"):
        PackedLoader(sft, max_tokens=10)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world_size=2\), got 2"):
        PackedLoader(sft, max_tokens=200, rank=2, world_size=2)


def test_loaders_resume_on_another_world_size(sft):
    """A 2-rank run resumed on 1 rank goes on after every row (prompt) the two ranks took, and back again."""
    plan = plan_batches(sft.lengths, 200, seed=4, epoch=0)
    two = [PackedLoader(sft, max_tokens=200, seed=4, rank=r, world_size=2) for r in (0, 1)]
    for loader in two:
        loader.next_step(1)
    one = PackedLoader(sft, max_tokens=200, seed=4)
    one.load_state_dict(two[0].state_dict())
    assert _key(one.next_step(1)) == _key([collate([sft[i] for i in plan[2]])])  # rows 0 and 1 were taken
    back = PackedLoader(sft, max_tokens=200, seed=4, rank=1, world_size=2)
    back.load_state_dict(one.state_dict())  # 3 rows taken: rank 1 goes on at global row 2 * 2 + 1
    assert _key(back.next_step(1)) == _key([collate([sft[i] for i in plan[5]])])
    prompts = PromptDataset([{"prompt": f"q{i}", "answer": i} for i in range(12)])
    a = PromptLoader(prompts, prompts_per_step=2, seed=1, rank=0, world_size=2)
    a.next_prompts()
    b = PromptLoader(prompts, prompts_per_step=3, seed=1)
    b.load_state_dict(a.state_dict())  # 4 prompts taken: a step of 3 goes on after 6
    perm = PromptLoader(prompts, prompts_per_step=12, seed=1).next_prompts()[1]  # the epoch order
    assert b.next_prompts()[1] == perm[6:9]


def test_packed_loader_two_ranks(sft):
    max_tokens, m = 2 * max(sft.lengths), 3  # 17 rows: 2 steps of 2 x 3, a tail of 5 dropped
    index = {tuple(e.input_ids.tolist()): i for i, e in enumerate(sft.examples)}
    plan = plan_batches(sft.lengths, max_tokens, seed=9, epoch=0)
    got = []
    for rank in (0, 1):
        loader = PackedLoader(sft, max_tokens=max_tokens, seed=9, rank=rank, world_size=2)
        steps = loader.steps_per_epoch(m)
        assert steps == len(plan) // (2 * m) >= 2
        rows = []
        for _ in range(steps):
            for b in loader.next_step(m):
                seqs = torch.split(b.input_ids, (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist())
                rows.append([index[tuple(s.tolist())] for s in seqs])
        assert loader.epoch == 0
        got.append(rows)
        loader.next_step(m)  # the tail that cannot give both ranks a step is dropped: the next step is epoch 1's
        assert loader.epoch == 1
    used = steps * m * 2
    assert got[0] == plan[0:used:2] and got[1] == plan[1:used:2]
    flat0, flat1 = {i for r in got[0] for i in r}, {i for r in got[1] for i in r}
    assert not flat0 & flat1
    assert flat0 | flat1 == {i for r in plan[:used] for i in r}


def _png(path, h=40, w=70):
    from PIL import Image

    Image.new("RGB", (w, h), (120, 30, 200)).save(path)


def test_bad_rows_are_skipped_and_recorded(tmp_path, caplog):
    cfg = R4BConfig(text_config=Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16),
                    vision_config=SiglipConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=28, patch_size=7),
                    image_token_index=5, image_grid_pinpoints=PINPOINTS)
    itok = ChatTokenizer.demo(model_config=cfg)
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png")
    image_chat = [{"role": "user", "content": [{"type": "image", "image": "img/a.png"}, {"type": "text", "text": "?"}]},
                  {"role": "assistant", "content": "A purple box."}]
    lines = [json.dumps({"prompt": "hi", "response": "hello"}),  # 1 good
             "{not json",  # 2
             "",  # 3 blank: ignored
             json.dumps([1, 2]),  # 4 not an object
             json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),  # 5 no assistant turn
             json.dumps({"prompt": "long " * 200, "response": "x"}),  # 6 too long
             json.dumps({"messages": [{**image_chat[0], "content": [{"type": "image", "image": "img/missing.png"}]},
                                      image_chat[1]]}),  # 7 missing image
             json.dumps({"messages": [{**image_chat[0], "content": [{"type": "image", "image": "http://x/a.png"}]},
                                      image_chat[1]]}),  # 8 url
             json.dumps({"messages": image_chat})]  # 9 good, with an image
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="r4b.engine.train.data"):
        ds = SFTDataset(path, itok, max_seq_len=160, progress=False)
    assert [e.where for e in ds.examples] == [f"{path}:1", f"{path}:9"]
    reasons = dict(ds.skipped)
    assert list(reasons) == [f"{path}:{n}" for n in (2, 4, 5, 6, 7, 8)]
    assert reasons[f"{path}:2"].startswith("not valid JSON")
    assert reasons[f"{path}:4"].startswith("not a JSON object")
    assert "messages[-1] must be the assistant turn" in reasons[f"{path}:5"]
    assert "longer than max_seq_len=160" in reasons[f"{path}:6"]
    assert "image file not found" in reasons[f"{path}:7"] and "missing.png" in reasons[f"{path}:7"]
    assert "only local image files" in reasons[f"{path}:8"]
    assert f"{path}:7" in caplog.text
    img = ds[1]
    assert img.image_sizes == [(40, 70)] and img.pixel_values[0].shape == (7, 3, 28, 28)
    assert int((img.input_ids == 5).sum()) == 94
    batch = collate([ds[0], ds[1]])
    assert batch.image_sizes == [(40, 70)] and set(batch.model_inputs()) >= {"pixel_values", "image_sizes"}
    assert ds.stats()["skipped"] == 6
    skipped = []
    assert len(read_jsonl(path, skipped=skipped)) == 6 and len(skipped) == 2
    with pytest.raises(ValueError, match="no usable SFT row: 1 skipped"):
        SFTDataset([{"prompt": "p"}], itok, max_seq_len=64, progress=False)


def test_prompt_dataset_rows(tmp_path, tok):
    _png(tmp_path / "a.png")
    rows = [{"prompt": "What is 2+2?", "answer": "4"},
            {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "text", "text": "Color?"}]}], "reference": "purple"},
            {"prompt": "No reference"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},  # ends with answer
            {"question": "?"},
            {"messages": [{"role": "robot", "content": "q"}]}]  # bad role (checked with tok)
    ds = PromptDataset(rows, tok=tok, image_root=tmp_path)
    assert len(ds) == 3
    assert ds[0] == ("What is 2+2?", "4") and ds[2] == ("No reference", None)
    chat, ref = ds[1]
    assert ref == "purple" and chat[0]["content"][0]["image"].size == (70, 40)
    assert [w for w, _ in ds.skipped] == ["rows[3]", "rows[4]", "rows[5]"]
    assert "ends with an assistant turn" in ds.skipped[0][1] and "role must be one of" in ds.skipped[2][1]
    assert rows[1]["messages"][0]["content"][0]["image"] == "a.png"  # the source rows are not modified


def test_prompt_loader_epochs_ranks_resume():
    ds = PromptDataset([{"prompt": f"p{i}", "answer": str(i)} for i in range(11)])
    loader = PromptLoader(ds, prompts_per_step=3, seed=2)
    assert loader.steps_per_epoch == 3
    epoch0 = [loader.next_prompts() for _ in range(3)]
    prompts0 = [p for ps, _ in epoch0 for p in ps]
    assert len(set(prompts0)) == 9 and all(len(ps) == 3 for ps, _ in epoch0)
    assert all(p == f"p{r}" for ps, rs in epoch0 for p, r in zip(ps, rs, strict=True))
    assert loader.epoch == 0
    first1 = loader.next_prompts()
    assert loader.epoch == 1 and first1[0] != epoch0[0][0]
    # resume: from mid-epoch 0, across the boundary
    a = PromptLoader(ds, prompts_per_step=3, seed=2)
    for _ in range(2):
        a.next_prompts()
    b = PromptLoader(ds, prompts_per_step=3, seed=0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [b.next_prompts() for _ in range(5)] == [a.next_prompts() for _ in range(5)]
    # two ranks: disjoint halves of each step, same steps
    r0 = PromptLoader(ds, prompts_per_step=2, seed=2, rank=0, world_size=2)
    r1 = PromptLoader(ds, prompts_per_step=2, seed=2, rank=1, world_size=2)
    assert r0.steps_per_epoch == r1.steps_per_epoch == 2
    got0 = [p for _ in range(2) for p in r0.next_prompts()[0]]
    got1 = [p for _ in range(2) for p in r1.next_prompts()[0]]
    assert not set(got0) & set(got1) and len(set(got0) | set(got1)) == 8
    with pytest.raises(ValueError, match="do not fill one step"):
        PromptLoader(ds, prompts_per_step=6, world_size=2)


# ---------------------------------------------------------------------------------------------- lazy SFT images
def _itok():
    cfg = R4BConfig(text_config=Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16),
                    vision_config=SiglipConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=28, patch_size=7),
                    image_token_index=5, image_grid_pinpoints=PINPOINTS)
    return ChatTokenizer.demo(model_config=cfg)


def _image_rows(tmp_path, n: int) -> list[dict]:
    """n chats, each with one or two images of varied sizes and colours (files), one with an in-memory image."""
    from PIL import Image

    (tmp_path / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        h, w = 20 + 7 * (i % 5), 30 + 11 * (i % 4)
        Image.new("RGB", (w, h), (10 * i % 256, 40, 200 - i)).save(tmp_path / "img" / f"{i}.png")
        parts = [{"type": "image", "image": f"img/{i}.png"}, {"type": "text", "text": f"what is {i}?"}]
        if i % 3 == 0:
            parts.insert(1, {"type": "image", "image": f"img/{(i + 1) % n}.png"} if i + 1 < n else
                         {"type": "image", "image": Image.new("RGB", (33, 21), (1, 2, 3))})
        rows.append({"messages": [{"role": "user", "content": parts},
                                  {"role": "assistant", "content": f"It is {i}." * (1 + i % 3)}]})
    return rows


def test_lazy_images_are_the_preloaded_ones_and_hold_no_pixels(tmp_path):
    itok = _itok()
    rows = _image_rows(tmp_path, 10)
    lazy = SFTDataset(rows, itok, max_seq_len=512, image_root=tmp_path, progress=False)
    eager = SFTDataset(rows, itok, max_seq_len=512, image_root=tmp_path, progress=False, preload_images=True)
    assert lazy.has_images and lazy.lengths == eager.lengths
    assert all(not e.pixel_values and e.images for e in lazy.examples)  # only sources and sizes are kept
    assert all(e.pixel_values and not e.images for e in eager.examples)
    assert any(not isinstance(src, type(tmp_path)) for e in lazy.examples for src in e.images)  # the in-memory one
    for i in range(len(rows)):
        a, b = lazy[i], eager[i]
        assert a.image_sizes == b.image_sizes and len(a.pixel_values) == len(b.pixel_values) > 0
        assert all(torch.equal(x, y) for x, y in zip(a.pixel_values, b.pixel_values, strict=True))
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not lazy.examples[0].pixel_values  # reading an example does not keep its pixels
    assert not lazy.load_failures


def test_an_image_gone_or_changed_after_reading_trains_nothing_and_the_run_goes_on(tmp_path, caplog):
    from PIL import Image

    itok = _itok()
    rows = _image_rows(tmp_path, 4)
    ds = SFTDataset(rows, itok, max_seq_len=512, image_root=tmp_path, progress=False)
    before = [ds[i] for i in range(4)]
    (tmp_path / "img" / "1.png").unlink()  # example 1's only image, and example 0's second
    Image.new("RGB", (5, 5)).save(tmp_path / "img" / "2.png")  # example 2's, another size now
    with caplog.at_level(logging.WARNING, logger="r4b.engine.train.data"):
        after = [ds[i] for i in range(4)]
    assert [w for w, _ in ds.load_failures] == ["rows[0]", "rows[1]", "rows[2]"]
    assert "image file not found" in ds.load_failures[1][1] and "is 5x5 now" in ds.load_failures[2][1]
    assert "trains nothing this time" in caplog.text
    for i in range(3):  # the batch keeps its shape: same tokens, blank images of the same sizes, no trained token
        assert torch.equal(after[i].input_ids, before[i].input_ids) and not after[i].labels.any()
        assert [p.shape for p in after[i].pixel_values] == [p.shape for p in before[i].pixel_values]
    assert torch.equal(after[3].labels, before[3].labels)
    batch = collate(after)
    assert batch.num_loss_tokens == int(before[3].labels[1:].sum()) and len(batch.pixel_values) == 6


def test_the_loader_prefetches_image_batches_without_changing_them(tmp_path):
    itok = _itok()
    ds = SFTDataset(_image_rows(tmp_path, 12), itok, max_seq_len=512, image_root=tmp_path, progress=False)

    def run(prefetch: bool, steps: int, resume_at: int | None = None):
        loader = PackedLoader(ds, max_tokens=600, seed=3)
        loader.prefetch = prefetch
        out = []
        for k in range(steps):
            if k == resume_at:  # a new loader from the saved position (a resumed run)
                state = loader.state_dict()
                loader = PackedLoader(ds, max_tokens=600, seed=3)
                loader.prefetch = prefetch
                loader.load_state_dict(state)
            out.append(loader.next_step(2))
        return loader, out

    import threading

    where = []  # the thread that built each step's batches
    real = PackedLoader._batches

    def batches(self, mine):
        where.append(threading.current_thread().name.startswith("r4b-sft-prefetch"))
        return real(self, mine)

    PackedLoader._batches = batches
    try:
        loader, want = run(False, 9)
        assert loader.epoch >= 1 and not any(where)  # the steps cross an epoch
        where.clear()
        _, got = run(True, 9)
        # every step after the first came from the prefetch (a 10th, unused, may be running still)
        assert where[:9] == [False] + [True] * 8 and all(where[9:])
        _, resumed = run(True, 9, resume_at=4)
    finally:
        PackedLoader._batches = real
    for a, b, c in zip(want, got, resumed, strict=True):
        for x, y, z in zip(a, b, c, strict=True):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.input_ids, z.input_ids)
            assert len(x.pixel_values) == len(y.pixel_values) == len(z.pixel_values) > 0
            assert all(torch.equal(p, q) and torch.equal(p, r)
                       for p, q, r in zip(x.pixel_values, y.pixel_values, z.pixel_values, strict=True))
    loader = PackedLoader(ds, max_tokens=600, seed=3)
    first = loader.next_step(2)
    loader.close()  # the thread goes; the loader still works, in place
    assert loader._pool is None and torch.equal(loader.next_step(2)[0].input_ids, want[1][0].input_ids)
    assert torch.equal(first[0].input_ids, want[0][0].input_ids)
    loader.close()
    assert PackedLoader(ds, max_tokens=600).prefetch and not PackedLoader(SFTDataset(
        _rows(8), ChatTokenizer.demo(), max_seq_len=256, progress=False), max_tokens=600).prefetch


def test_prompt_images_are_opened_when_taken_and_a_lost_one_skips_only_its_prompt(tmp_path):
    from test_llm import tiny_r4b_chat

    from r4b.engine.llm import LLM
    from r4b.engine.sampling import SamplingParams
    from r4b.engine.train.data import UnreadableImage

    model, rtok, _ = tiny_r4b_chat()
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", h=30, w=20)
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": name},
                                                       {"type": "text", "text": "Color?"}]}], "answer": "purple"}
            for name in ("a.png", "b.png")] + [{"prompt": "2+2?", "answer": "4"}]
    lazy = PromptDataset(rows, tok=rtok, image_root=tmp_path)
    eager = PromptDataset(rows, tok=rtok, image_root=tmp_path, preload_images=True)
    assert lazy.items[0][0][0]["content"][0]["image"] == tmp_path / "a.png"  # a path is kept, not the pixels
    for i in range(3):
        (p, ref), (q, ref2) = lazy[i], eager[i]
        assert ref == ref2
        if isinstance(p, list):
            a, b = p[0]["content"][0]["image"], q[0]["content"][0]["image"]
            assert a.size == b.size and a.tobytes() == b.tobytes()
        else:
            assert p == q
    (tmp_path / "b.png").unlink()
    prompts = [lazy[i][0] for i in range(3)]
    assert isinstance(prompts[1][0]["content"][0]["image"], UnreadableImage)
    assert [w for w, _ in lazy.load_failures] == ["rows[1]"] and "image file not found" in lazy.load_failures[0][1]
    llm = LLM(model, rtok, num_kv_blocks=128, block_size=16)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2), thinking_mode="short", use_tqdm=False)
    assert outs[0].error is None and outs[2].error is None
    assert "b.png cannot be read" in outs[1].error and "image file not found" in outs[1].error


def test_a_decompression_bomb_is_a_bad_image_not_a_crash(tmp_path, monkeypatch):
    """An image past PIL's pixel limit (a decompression bomb; PIL's error is no OSError) skips its row when the
    dataset is built, and makes its SFT example train nothing / its prompt unreadable when it turns bad later."""
    from PIL import Image

    from r4b.engine.train.data import UnreadableImage

    itok = _itok()
    rows = _image_rows(tmp_path, 2)
    ds = SFTDataset(rows, itok, max_seq_len=512, image_root=tmp_path, progress=False)
    prompts = PromptDataset([{"messages": rows[1]["messages"][:1], "answer": "x"}], image_root=tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # every image is a "bomb" now (> 2x the limit raises)
    got = ds[1]
    assert not got.labels.any() and "cannot read image" in ds.load_failures[0][1]
    assert isinstance(prompts[0][0][0]["content"][0]["image"], UnreadableImage)
    assert "could be decompression bomb" in prompts.load_failures[0][1]
    with pytest.raises(ValueError, match="no usable SFT row"):
        SFTDataset(rows, itok, max_seq_len=512, image_root=tmp_path, progress=False)


def test_lazy_image_paths_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """A relative JSONL path (so a relative image root): the kept image paths are absolute, so the examples and
    prompts read later, from another working directory, are the ones built."""
    itok = _itok()
    (tmp_path / "data").mkdir()
    rows = _image_rows(tmp_path / "data", 3)
    path = tmp_path / "data" / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[1:3]))  # rows with file images only
    (tmp_path / "data" / "p.jsonl").write_text(json.dumps({"messages": rows[1]["messages"][:1], "answer": "x"}) + "\n")
    monkeypatch.chdir(tmp_path)
    sft = SFTDataset("data/sft.jsonl", itok, max_seq_len=512, progress=False)
    prompts = PromptDataset("data/p.jsonl", tok=itok)
    assert all(p.is_absolute() for e in sft.examples for p in e.images)
    want = [sft[i].pixel_values for i in range(2)]
    monkeypatch.chdir(tmp_path / "data")
    assert not sft.load_failures and not prompts.load_failures
    for i in range(2):
        assert all(torch.equal(a, b) for a, b in zip(sft[i].pixel_values, want[i], strict=True))
    image = prompts[0][0][0]["content"][0]["image"]
    assert image.size == (41, 27) and not prompts.load_failures  # img/1.png, opened from the other directory
