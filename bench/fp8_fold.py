"""fp8 engine with the weight DQs folded once (default on CPU) or per call: load, memorize, query times, peak RSS.

    python bench/fp8_fold.py OUT fold|nofold      (OUT: an artifact with --fp8 graphs; run under /usr/bin/time -v)
"""
import sys
import time
import warnings

import torch

warnings.simplefilter("ignore")
from mplus_deploy.runtime import Engine
from mplus_deploy.util.machine import rss_gib, peak_rss_gib
out, fold = sys.argv[1], (None if sys.argv[2] == "fold" else ())
t = time.time()
e = Engine(out, backend="onnxruntime", quantized="fp8", seed=0, fold_dq=fold, threads=2)
d = e.describe(); print("load", round(time.time()-t, 1), "s; fold", d["fold_dq"], round(d["folded_fp32_bytes"]/2**30, 2), "GiB; rss", round(rss_gib(), 2), flush=True)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, e.config.vocab_size, (256,), generator=g)
t = time.time(); e.memorize(ids, chunk_size=None, progress=False); print("memorize 256:", round(time.time()-t, 1), "s", flush=True)
p = torch.randint(0, e.config.vocab_size, (16,), generator=g)
t = time.time(); out = e.generate_ids(p, max_new_tokens=4, stop_at_eos=False); print("query+4 tokens:", round(time.time()-t, 1), "s", out.tolist(), flush=True)
print("peak", round(peak_rss_gib(), 2), "GiB", flush=True)
