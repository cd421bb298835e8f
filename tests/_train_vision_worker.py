"""Worker of tests/test_train_multimodal.py (torchrun, 2 ranks, gloo): an R-4B under FSDP2 where rank 0's batch
holds an image and rank 1's does not, the SFT trainer's forward (vision_keepalive when several ranks train), the
backward, the gradient norm. Without the keepalive rank 1 skips the vision tower's collectives (gloo: "collective
mismatch"; nccl would hang). Rank 0 prints the norm, and one process's norm of the mean of both losses."""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402

from r4b.engine.chat import ChatTokenizer  # noqa: E402
from r4b.engine.model import R4BForConditionalGeneration, from_pretrained  # noqa: E402
from r4b.engine.train import parallel  # noqa: E402
from r4b.engine.train.data import SFTDataset, collate  # noqa: E402
from r4b.engine.train.sft import sft_loss_sums  # noqa: E402


def main() -> None:
    tmp = Path(sys.argv[1])
    faulthandler.dump_traceback_later(90, exit=True)
    info = parallel.init_distributed("cpu")
    model = from_pretrained(tmp / "model", dtype=torch.float32)
    assert isinstance(model, R4BForConditionalGeneration)
    tok = ChatTokenizer(tmp / "model" / "tokenizer.json", model_config=model.config)
    chat = [{"role": "user", "content": [{"type": "image", "image": "img0.png"}, {"type": "text", "text": "Hue?"}]},
            {"role": "assistant", "content": "red"}]
    text = [{"role": "user", "content": "Hue?"}, {"role": "assistant", "content": "blue"}]
    rows = [{"messages": chat}, {"messages": text}]
    ds = SFTDataset(rows, tok, max_seq_len=512, image_root=tmp, progress=False)
    ref = from_pretrained(tmp / "model", dtype=torch.float32)
    parallel.apply_fsdp(model)
    keep = info.world_size > 1 and sys.argv[2:] != ["--no-keepalive"]
    loss, _, _ = sft_loss_sums(model, collate([ds[info.rank]]), vision_keepalive=keep)
    loss.backward()
    norm = parallel.clip_grad_norm_(model, 1e9)
    if info.rank == 0:  # FSDP2 averages the ranks' gradients: one process's gradient of the mean loss
        total = sum(sft_loss_sums(ref, collate([ds[r]]))[0] for r in range(2)) / 2
        total.backward()
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)
        print(f"grad norm {norm} one process {float(want)}", flush=True)
    parallel.shutdown_distributed()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
