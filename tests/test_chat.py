"""Chat template (three thinking modes), image expansion, the demo tokenizer, and parse_response."""

import pytest
import torch
from tiny_models import (
    PINPOINTS,
    torch_kernels_on_cpu,  # noqa: F401  (fixture)
)
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from r4b.engine.chat import DEMO_TOKENIZER, ChatTokenizer, ParsedResponse, parse_response
from r4b.engine.demo_tokenizer import build_demo_tokenizer
from r4b.engine.model import Qwen3Config, R4BConfig, SiglipConfig, num_image_tokens

pytestmark = pytest.mark.usefixtures("torch_kernels_on_cpu")

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 2 + 2?"}]
PREFIX = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
# Token ids of PREFIX with the shipped demo tokenizer (pinned by test_demo_tokenizer_is_reproducible).
PREFIX_IDS = [1, 88, 94, 88, 299, 82, 204, 363, 309, 262, 433, 388, 378, 443, 384, 466, 19, 2, 204,
              1, 90, 88, 274, 204, 361, 293, 280, 288, 301, 288, 36, 2, 204, 1, 365, 88, 384, 466, 204]
THINK, END_THINK, NL, NLNL = 3, 4, 204, 266


@pytest.fixture(scope="module")
def tok():
    return ChatTokenizer.demo()


def test_special_token_ids(tok):
    assert (tok.im_start_id, tok.im_end_id, tok.think_id, tok.end_think_id, tok.image_id) == (1, 2, 3, 4, 5)
    assert tok.eos_ids == [2, 0]
    assert tok.encode("\n") == [NL] and tok.encode("\n\n") == [NLNL]


@pytest.mark.parametrize("mode, suffix, suffix_ids", [
    ("auto", "<think>", [THINK]),
    ("long", "<think>\n", [THINK, NL]),
    ("short", "<think>\n\n</think>\n\n", [THINK, NLNL, END_THINK, NLNL]),
])
def test_three_modes_exact_strings_and_ids(tok, mode, suffix, suffix_ids):
    text = tok.apply_chat_template(MESSAGES, thinking_mode=mode)
    assert text == PREFIX + suffix
    enc = tok.encode_chat(MESSAGES, thinking_mode=mode)
    assert enc.input_ids.dtype == torch.int64
    assert enc.input_ids.tolist() == PREFIX_IDS + suffix_ids
    assert tok.decode(enc.input_ids) == text


def test_history_without_generation_prompt(tok):
    msgs = [*MESSAGES, {"role": "assistant", "content": "<think>\n\n</think>\n\n4"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert text == PREFIX + "<think>\n\n</think>\n\n4<|im_end|>\n"


# Multi-turn histories by Qwen3's template rule, expected strings written by hand: assistant turns before the last
# user message keep only the text after their last </think> (leading newlines stripped); turns after it are
# "<think>\n{reasoning}\n</think>\n\n{answer}" when they have a thought or are the last message.
SYS = "<|im_start|>system\nBe brief.<|im_end|>\n"
TURNS = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
         {"role": "user", "content": "And 3+3?"},
         {"role": "assistant", "content": "\n\n6"},  # no thought, not last: as is
         {"role": "assistant", "content": "", "reasoning_content": "\nDouble 3.\n"}]


@pytest.mark.parametrize("mode, suffix", [("auto", "<think>"), ("long", "<think>\n"),
                                          ("short", "<think>\n\n</think>\n\n")])
def test_multi_turn_drops_thoughts_before_last_user(tok, mode, suffix):
    text = tok.apply_chat_template(TURNS[:4], thinking_mode=mode)
    assert text == (SYS + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
                    "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n" + suffix)


def test_multi_turn_history_qwen3_rule(tok):
    head = (SYS + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
            "<|im_start|>user\nAnd 3+3?<|im_end|>\n")
    # final assistant turn with a thought (from reasoning_content), after one without a thought
    assert tok.apply_chat_template(TURNS, add_generation_prompt=False) == (
        head + "<|im_start|>assistant\n\n\n6<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nDouble 3.\n</think>\n\n<|im_end|>\n")
    # final assistant turn without a thought: an empty thought is written before it
    assert tok.apply_chat_template(TURNS[:5], add_generation_prompt=False) == (
        head + "<|im_start|>assistant\n<think>\n\n</think>\n\n6<|im_end|>\n")
    # final assistant turn with a <think> block in its content; the earlier turn keeps its (non-last) thought
    msgs = [*TURNS[:4], {"role": "assistant", "content": "<think>Try 6.</think>Check.\n"},
            {"role": "assistant", "content": "<think>\n\nSure.\n\n</think>\n\n\n6"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        head + "<|im_start|>assistant\n<think>\nTry 6.\n</think>\n\nCheck.\n<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nSure.\n</think>\n\n6<|im_end|>\n")
    # a thought with repeated tags: reasoning up to the first </think>, answer after the last one
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a</think>b</think>\nc"},
            {"role": "user", "content": "r"}, {"role": "assistant", "content": "<think>x<think>y</think>z</think>w"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nc<|im_end|>\n<|im_start|>user\nr<|im_end|>\n"
        "<|im_start|>assistant\n<think>\ny\n</think>\n\nw<|im_end|>\n")
    # reasoning_content before the last user message is dropped, and the content is then kept as is
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "<think>t</think>a", "reasoning_content": "r"},
            {"role": "user", "content": "q2"}]
    assert tok.apply_chat_template(msgs, thinking_mode="short") == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>t</think>a<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def _qwen3_like_tokenizer() -> Tokenizer:
    """Byte-level BPE like Qwen3's: <|im_start|> etc. special, <think>/</think> plain added tokens, no <image>."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["What is 2 + 2? The answer is 4.\n\n"] * 4, trainer=trainer)
    t.add_tokens([AddedToken("<think>", special=False, normalized=False),
                  AddedToken("</think>", special=False, normalized=False)])
    return t


def test_tokenizer_without_image_token_renders_text_only():
    raw = _qwen3_like_tokenizer()
    assert raw.token_to_id("<image>") is None
    tok = ChatTokenizer(raw)
    assert tok.image_id is None and None not in (tok.im_start_id, tok.im_end_id, tok.think_id, tok.end_think_id)
    for mode, suffix in [("auto", "<think>"), ("long", "<think>\n"), ("short", "<think>\n\n</think>\n\n")]:
        text = tok.apply_chat_template(MESSAGES, thinking_mode=mode)
        assert text == PREFIX + suffix
        ids = tok.encode_chat(MESSAGES, thinking_mode=mode).input_ids
        assert ids.tolist().count(tok.think_id) == 1 and tok.decode(ids) == text
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\] is an image, but the tokenizer has no <image>"):
        tok.apply_chat_template(msgs)
    with pytest.raises(ValueError, match="has no <image> token, which the model config needs"):
        ChatTokenizer(raw, model_config=R4BConfig(vision_config=SiglipConfig(num_hidden_layers=1)))
    with pytest.raises(ValueError, match=r"lacks the chat tokens \['<\|im_start\|>', '<\|im_end\|>', '<think>', "):
        ChatTokenizer(Tokenizer(models.BPE()))


def test_bad_messages_raise(tok):
    with pytest.raises(ValueError, match="thinking_mode must be one of"):
        tok.apply_chat_template(MESSAGES, thinking_mode="fast")
    with pytest.raises(ValueError, match=r"messages\[0\].role must be one of"):
        tok.apply_chat_template([{"role": "function", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\] must be"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])


def _tiny_r4b_config() -> R4BConfig:
    """A one-layer R-4B config (image token 5) for the image-token tests."""
    return R4BConfig(text_config=Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16),
                     vision_config=SiglipConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=28, patch_size=7),
                     image_token_index=5, image_grid_pinpoints=PINPOINTS)


def test_image_parts_expand_to_model_token_count():
    cfg = _tiny_r4b_config()
    tok = ChatTokenizer.demo(model_config=cfg)
    img = torch.zeros(3, 40, 70, dtype=torch.uint8)
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe."}]}]
    n = num_image_tokens(40, 70, cfg)
    assert n == 94
    text = tok.apply_chat_template(msgs, thinking_mode="long")
    assert text == "<|im_start|>user\n" + "<image>" * n + "Describe.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    enc = tok.encode_chat(msgs, thinking_mode="long")
    ids = enc.input_ids.tolist()
    start = ids.index(5)
    assert ids.count(5) == n and ids[start : start + n] == [5] * n  # one contiguous run
    assert ids[:start] == [1, *tok.encode("user\n")]
    assert enc.image_sizes == [(40, 70)] and enc.pixel_values[0].shape == (7, 3, 28, 28)


def test_image_id_must_match_model():
    cfg = R4BConfig(vision_config=SiglipConfig(num_hidden_layers=1), image_token_index=7)
    with pytest.raises(ValueError, match="image_token_index \\(7\\)"):
        ChatTokenizer.demo(model_config=cfg)


@pytest.mark.parametrize("mode, output, want", [
    # auto, the model answers directly
    ("auto", "\n\n</think>\n\nThe answer is 4.<|im_end|>", ("", "The answer is 4.", "no_think")),
    # auto, the model thinks
    ("auto", "\nAdd 2 and 2.\n</think>\n\n4<|im_end|>", ("Add 2 and 2.", "4", "think")),
    # forced thinking, well formed
    ("long", "2 plus 2 is 4.\n</think>\n\nThe answer is 4.", ("2 plus 2 is 4.", "The answer is 4.", "think")),
    # forced thinking, cut off by max_tokens before </think>
    ("long", "Two plus two is", ("Two plus two is", "", "think")),
    # forced non-thinking: the empty thought was in the prompt
    ("short", "The answer is 4.<|im_end|>", ("", "The answer is 4.", "no_think")),
    # the output repeats the <think> tag itself
    ("auto", "<think>\nHmm.</think>\n\nYes.", ("Hmm.", "Yes.", "think")),
    # no prompt suffix and no tags
    (None, "Just text.", ("", "Just text.", "no_think")),
    # truncated right after the auto tag
    ("auto", "", ("", "", "think")),
    # leading newlines / tabs before a repeated <think>
    ("auto", "\n\t <think>\nHmm.\n</think>\n\nYes.", ("Hmm.", "Yes.", "think")),
    (None, "\n\n<think>\nHmm.\n</think>\n\nYes.", ("Hmm.", "Yes.", "think")),
    (None, "\n<think>\n\n</think>\n\nYes.<|im_end|>", ("", "Yes.", "no_think")),
    # text before <think> (no suffix, or after short's closed thought) is a preamble kept in the answer
    (None, "Sure. <think>x</think>y", ("x", "Sure.\n\ny", "think")),
    ("short", "Well,\n<think>\nx\n</think>\n\ny", ("x", "Well,\n\ny", "think")),
    (None, "Sure. <think>cut off", ("cut off", "Sure.", "think")),
    # the thought ends at the LAST </think>
    ("long", "a</think>b</think>c", ("a</think>b", "c", "think")),
    (None, "<think>a</think>\nb\n</think>\n\nc<|im_end|>", ("a</think>\nb", "c", "think")),
    # short: a stray </think> in the answer is not a thought
    ("short", "4</think>5", ("", "4</think>5", "no_think")),
])
def test_parse_response(mode, output, want):
    assert parse_response(output, thinking_mode=mode) == ParsedResponse(*want)


def test_parse_response_from_token_ids(tok):
    ids = [NLNL, END_THINK, NLNL, *tok.encode("The answer is 4."), tok.im_end_id]
    assert parse_response(ids, tokenizer=tok) == ("", "The answer is 4.", "no_think")
    with pytest.raises(ValueError, match="pass tokenizer="):
        parse_response(ids)


def test_demo_tokenizer_is_reproducible(tmp_path):
    build_demo_tokenizer().save(str(tmp_path / "t.json"))
    assert (tmp_path / "t.json").read_text() == DEMO_TOKENIZER.read_text()


def test_chat_encoding_runs_through_the_model():
    from r4b.engine.model import R4BForConditionalGeneration, last_rows

    cfg = _tiny_r4b_config()
    torch.manual_seed(0)
    model = R4BForConditionalGeneration(cfg).eval()
    tok = ChatTokenizer.demo(model_config=cfg)
    img = torch.randint(0, 256, (50, 33, 3), dtype=torch.uint8)  # (H, W, 3) layout is accepted too
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]
    encs = [tok.encode_chat(msgs, thinking_mode=m) for m in ("auto", "short")]
    ids = torch.cat([e.input_ids for e in encs])
    lengths = [len(e.input_ids) for e in encs]
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    with torch.no_grad():
        hidden = model(ids, torch.cat([torch.arange(n) for n in lengths]), cu, max(lengths),
                       pixel_values=[p for e in encs for p in e.pixel_values],
                       image_sizes=[s for e in encs for s in e.image_sizes])
        logits = model.compute_logits(hidden, last_rows(cu))
    assert encs[0].image_sizes == [(50, 33)]
    assert logits.shape == (2, 512) and torch.isfinite(logits).all()


def test_token_bytes_spell_the_text_even_inside_a_character():
    """Byte-level tokens may hold part of a UTF-8 character (each alone decodes to U+FFFD): their bytes, joined,
    are the text's; special tokens are their own text."""
    tok = ChatTokenizer.demo()
    for text in ("héllo wörld", "✓ 日本語 🙂", "plain ascii", "\n\t "):
        ids = tok.encode(text)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert any("\ufffd" in tok.decode([i]) for i in tok.encode("日本語"))  # the case the byte table is for
    assert tok.token_bytes(tok.think_id) == b"<think>" and tok.token_bytes(tok.im_end_id) == b"<|im_end|>"
