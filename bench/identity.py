"""Bit-identity of a refactor: greedy tokens and prefill logits of tiny, small and demo through the reference,
the torch runner and ORT, dumped by one source tree and compared with another's (issue 14 acceptance).

    git worktree add /tmp/old <rev>
    python bench/identity.py dump /tmp/old /tmp/d-old && python bench/identity.py dump . /tmp/d-new
    python bench/identity.py compare /tmp/d-old /tmp/d-new
"""
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

NAMES = ("tiny", "small", "demo")


def dump(root: Path, dst: Path) -> None:
    sys.path.insert(0, str(root.resolve()))
    import mplus_deploy

    assert str(Path(mplus_deploy.__file__).resolve()).startswith(str(root.resolve())), mplus_deploy.__file__
    from mplus_deploy.model.presets import resolve
    try:
        from mplus_deploy.build import export_artifact
    except ImportError:  # a tree from before issue 14
        from mplus_deploy.export.exporter import export_artifact
    from mplus_deploy.runtime import Engine

    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    dst.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        model, tok = resolve(name)
        art = dst / f"art-{name}"
        export_artifact(model, art, validate=False, tokenizer=tok, source={"preset": name})
        g = torch.Generator().manual_seed(7)
        V = model.config.vocab_size
        mem_ids = torch.randint(0, V, (model.config.K * 2 + 3,), generator=g)
        prompt = torch.randint(0, V, (12,), generator=g)
        model.memory.seed(3)
        model.inject(mem_ids)
        out = {"ref_tokens": model.generate(prompt, max_new_tokens=16, stop_at_eos=False).numpy(),
               "ref_logits": model.prefill_logits(prompt).detach().numpy()}
        for backend in ("torch", "onnxruntime"):
            e = Engine(art if backend == "onnxruntime" else model, backend=backend, seed=3)
            e.memorize(mem_ids, chunk_size=None, progress=False)
            out[f"{backend}_tokens"] = e.generate_ids(prompt, max_new_tokens=16, stop_at_eos=False).numpy()
            out[f"{backend}_logits"] = e.runner.infer("prefill", {"ids": prompt, **e.host_memory.prefill_feeds()})["logits"].numpy()
            e.close()
        np.savez(dst / f"{name}.npz", **out)
        print(name, "dumped", flush=True)


def compare(a: Path, b: Path) -> int:
    bad = 0
    for n in NAMES:
        x, y = np.load(a / f"{n}.npz"), np.load(b / f"{n}.npz")
        for k in x.files:
            same = np.array_equal(x[k], y[k])
            bad += not same
            print(n, k, "bit-identical" if same else f"DIFF max {np.abs(x[k].astype(float) - y[k]).max():.3g}")
    return 1 if bad else 0


if __name__ == "__main__":
    cmd, a, b = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    sys.exit(dump(a, b) if cmd == "dump" else compare(a, b))
