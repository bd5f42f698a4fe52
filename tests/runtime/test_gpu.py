"""Torch backend on CUDA against the CPU reference (run on the lent GPU machine: ``-m gpu``)."""
import warnings

import pytest
import torch

from mplus_deploy.runtime import Engine

from .conftest import chunks, tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and a CUDA build of torch")]


@pytest.mark.parametrize("kind", ["tiny", "tiny-memoryllm"])
def test_torch_cuda_engine_matches_cpu_reference(kind):
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = tiny_model(kind)
    ref.memory.seed(11)
    eng = Engine(tiny_model(kind), backend="torch", device="cuda", seed=11)
    assert eng.describe()["device"] == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ids in chunks(12):
            ref.inject(ids)
            eng.memorize(ids, progress=False)
    st = eng.host_memory.state
    torch.testing.assert_close(st.stm, ref.memory.stm, atol=1e-4, rtol=1e-4)
    assert torch.equal(st.stm_ages, ref.memory.stm_ages)
    assert torch.equal(st.generator.get_state(), ref.memory.generator.get_state())
    if kind == "tiny":
        assert all(torch.equal(a, b) for a, b in zip(st.ltm_ages, ref.memory.ltm_ages))
        assert all(torch.equal(a, b) for a, b in zip(st.ltm_rf, ref.memory.ltm_rf))
    p = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(4))
    assert torch.equal(eng.generate_ids(p, max_new_tokens=24, stop_at_eos=False),
                      ref.generate(p, max_new_tokens=24, stop_at_eos=False))
    # a second session on the GPU runner: its own memory moves (as the CPU reference's does), the engine's not
    before = eng.host_memory.clone()  # a copy: ``st`` above is the live state, comparing it would be vacuous
    s = eng.session(seed=2)
    ref2 = tiny_model(kind)
    ref2.memory.seed(2)
    ids = chunks(1, seed=3)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s.memorize(ids, progress=False)
        ref2.inject(ids)
    assert eng.host_memory.equal(before)
    assert not s.host_memory.state.equal(before.state)
    torch.testing.assert_close(s.host_memory.state.stm, ref2.memory.stm, atol=1e-4, rtol=1e-4)
    assert torch.equal(s.host_memory.state.stm_ages, ref2.memory.stm_ages)
    assert s.memory["update_step"] == ref2.memory.update_step and s.memory["ltm_rows"] == ref2.memory.stats()["ltm_rows"]
    assert torch.equal(s.generate_ids(p, max_new_tokens=12, stop_at_eos=False),
                       ref2.generate(p, max_new_tokens=12, stop_at_eos=False))


def test_fast_path_with_cuda_graphs_matches_cpu_reference():
    """The fast path on CUDA (static cache, captured decode steps, device memory, Triton retrieval, host-mapped
    gather) against the CPU reference: greedy tokens equal in fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = Engine(tiny_model("tiny"), backend="torch", seed=11)
    eng = Engine(tiny_model("tiny"), backend="torch", device="cuda", seed=11)
    assert eng.describe()["fast"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ids in chunks(12):
            ref.memorize(ids, progress=False)
            eng.memorize(ids, progress=False)
    p = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(4))
    f = {"ids": p, **eng.host_memory.prefill_feeds(), "logit_rows": torch.arange(10)}
    a, b = ref.runner.infer("prefill", f), eng.runner.infer("prefill", f)
    assert torch.equal(a["retrieved"], b["retrieved"])
    torch.testing.assert_close(b["logits"], a["logits"], rtol=1e-4, atol=1e-4)
    want = ref.generate_ids(p, max_new_tokens=300, stop_at_eos=False)  # > one 256-row bucket: two captured graphs
    assert torch.equal(eng.generate_ids(p, max_new_tokens=300, stop_at_eos=False), want)
    assert torch.equal(eng.generate_ids(p, max_new_tokens=300, stop_at_eos=False), want)  # replayed graphs


def test_quantized_weights_on_cuda_match_the_cpu_graphs(tmp_path):
    from mplus_deploy.build import export_artifact
    from mplus_deploy.calibration import quantize_artifact

    from ..conftest import FAST

    art = tmp_path / "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_artifact(tiny_model("tiny"), art, validate=False, source={"preset": "tiny"})
    quantize_artifact(art, "fp8", "builtin", progress=False, print_table=False, **FAST)
    quantize_artifact(art, "int4", None, progress=False, print_table=False, graphs=("decode", "prefill"), **FAST)
    p = torch.randint(3, 250, (12,), generator=torch.Generator().manual_seed(1))
    for mode in ("fp8", "int4"):
        ort = Engine(art, quantized=mode, seed=3)
        gpu = Engine(art, backend="torch", device="cuda", quantized=mode, seed=3)
        f = {"ids": p, **ort.host_memory.prefill_feeds(), "logit_rows": torch.arange(12)}
        a, b = ort.runner.infer("prefill", f)["logits"], gpu.runner.infer("prefill", f)["logits"]
        agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
        assert agree >= 0.99, (mode, agree)  # int4 on CUDA computes in bf16 (tinygemm): rounding, not bits
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)


def test_int4_cuda_kernel_equals_dequantized_weight():
    from mplus_deploy.runtime.backends.torch_quant import Int4Weight

    g = torch.Generator().manual_seed(0)
    N, K, B = 256, 512, 32
    q = torch.randint(0, 16, (N, K), generator=g).to(torch.uint8)
    s, z = torch.rand(K // B, N, generator=g) * 0.1, torch.randn(K // B, N, generator=g) * 0.1
    w = (q.float() - 8) * s.repeat_interleave(B, 0).T + z.repeat_interleave(B, 0).T
    x = torch.randn(8, K, generator=g)
    y = Int4Weight(q, s, z, B, torch.device("cuda"), torch.bfloat16).matmul(x.cuda().bfloat16())
    torch.testing.assert_close(y.float().cpu(), x.bfloat16().float() @ w.bfloat16().float().T, rtol=2e-2, atol=2e-2)
