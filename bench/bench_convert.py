"""Time of ``pypattern.from_hf`` on a GPT-2-small-shaped Hugging Face model (random weights), CPU time of three
calls after a warm-up, one thread; the conversion includes its check of the logits against the model's own
forward (``verify=True``, the default).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/bench_convert.py [label]``; to compare two trees, run it with
``PYTHONPATH`` pointing at each, interleaved."""

import sys
import time

import torch
import transformers

import pypattern as pp


def main(label: str = "pypattern") -> None:
    torch.set_num_threads(1)
    cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    pp.from_hf(hf)
    ts = []
    for _ in range(3):
        t = time.process_time()
        pp.from_hf(hf)
        ts.append(time.process_time() - t)
    print(label, "from_hf CPU seconds:", [round(x, 2) for x in ts])


if __name__ == "__main__":
    main(*sys.argv[1:2])
