"""Run with TRITON_INTERPRET=1 (set by the test before triton is imported); prints a JSON result."""
import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch  # noqa: E402

from mplus_deploy.model import retrieval as R  # noqa: E402
from mplus_deploy.plugins import memory_gather_triton, topk_retrieve, topk_retrieve_triton  # noqa: E402
from mplus_deploy.plugins.triton_kernels import triton_scores  # noqa: E402
from tests.plugins.conftest import make_case  # noqa: E402

res = {"topk": [], "gather": None, "gather3": None, "score_err": None}
tile = dict(BT=16, BS=128, BD=16)
for seed in (0, 1):
    q, keys, ages = make_case(seed)
    for vl in (600, 400, 31):
        a = topk_retrieve_triton(q, keys, vl, ages, 32, **tile)
        b = topk_retrieve(q, keys, vl, ages, 32)
        res["topk"].append([seed, vl, bool(torch.equal(a, b))])
    for vl, m in ((600, 20), (600, 500), (40, 33)):  # pending rows past merged_len; the small-LTM branch
        a = topk_retrieve_triton(q, keys, vl, ages, 32, merged_len=m, **tile)
        b = topk_retrieve(q, keys, vl, ages, 32, merged_len=m)
        res["topk"].append([seed, f"{vl}/{m}", bool(torch.equal(a, b))])
g = torch.Generator().manual_seed(7)
q, keys = torch.randn(20, 40, generator=g), torch.randn(700, 40, generator=g)  # masked partial tiles
res["score_err"] = float((triton_scores(q, keys, **tile) - R.mean_sigmoid_scores(q, keys)).abs().max())
pool = torch.randn(700, 72, generator=g)
idx = torch.randint(0, 700, (32,), generator=g)
res["gather"] = bool(torch.equal(memory_gather_triton(pool, idx, BLOCK_D=32), pool[idx]))
pool3 = torch.randn(3, 700, 40, generator=g)  # [Hkv, S, Dh], gathered on axis 1 (the prefill's LTM K/V)
res["gather3"] = bool(torch.equal(memory_gather_triton(pool3, idx, BLOCK_D=32, axis=1), pool3[:, idx]))
print(json.dumps(res))
