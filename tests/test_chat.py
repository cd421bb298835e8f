"""Chat template (three thinking modes), image expansion, the demo tokenizer, and parse_response."""

import pytest
import torch
from tiny_models import (
    PINPOINTS,
    torch_kernels_on_cpu,  # noqa: F401  (fixture)
)

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


def test_bad_messages_raise(tok):
    with pytest.raises(ValueError, match="thinking_mode must be one of"):
        tok.apply_chat_template(MESSAGES, thinking_mode="fast")
    with pytest.raises(ValueError, match=r"messages\[0\].role must be one of"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\] must be"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])


def test_image_parts_expand_to_model_token_count():
    cfg = R4BConfig(text_config=Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16),
                    vision_config=SiglipConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=28, patch_size=7),
                    image_token_index=5, image_grid_pinpoints=PINPOINTS)
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

    cfg = R4BConfig(text_config=Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16),
                    vision_config=SiglipConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=28, patch_size=7),
                    image_token_index=5, image_grid_pinpoints=PINPOINTS)
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
