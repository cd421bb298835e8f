"""The small demo / test tokenizer: byte-level BPE (like Qwen's, so any text encodes) trained on a tiny built-in
corpus, with the chat special tokens at ids 0-5. ``python -m r4b.engine.demo_tokenizer`` rewrites
r4b/assets/tokenizer.json; the test suite checks the shipped file equals a fresh build.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .chat import DEMO_TOKENIZER, SPECIAL_TOKENS

VOCAB_SIZE = 512

_CORPUS = """\
What is 2 + 2? The answer is 4. Let me think step by step.
First, add the two numbers. Then check the result. So the final answer is 12.
Describe the image. The picture shows a red square on a blue background, a cat, a dog and a tree.
How many apples are there? There are 3 apples and 5 oranges, so 8 fruits in total.
Solve for x: 3x + 5 = 20, so 3x = 15 and x = 5. Therefore x equals five.
You are a helpful assistant. Answer the question directly and briefly.
Hmm, wait. Let me reconsider: 7 * 8 = 56, and 56 - 6 = 50. Yes, that is correct.
The triangle has angles of 30, 60 and 90 degrees; the hypotenuse is twice the short side.
Question: which option is right? (A) one (B) two (C) three (D) four. Answer: (C)
0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = < > ( ) [ ] { } . , ; : ! ? ' " \\ ^ _ % $ # @ & |
"""


def build_demo_tokenizer() -> Tokenizer:
    """Train the demo tokenizer (deterministic: same corpus, same settings, same file)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Paragraphs separated by blank lines, so "\n\n" becomes one token as in Qwen's vocabulary.
    paragraphs = [line + "\n\n" for line in _CORPUS.splitlines()]
    tok.train_from_iterator(paragraphs * 4, trainer=trainer)
    return tok


def main(argv: list[str] | None = None) -> None:
    out = Path((argv or sys.argv[1:] or [str(DEMO_TOKENIZER)])[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    build_demo_tokenizer().save(str(out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
