"""Polygraphy and TensorRT-RTX accept every graph; CLI errors are clear (exit code 2)."""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mplus_deploy.export import trt_check
from mplus_deploy.cli.export import main
from mplus_deploy.artifact import load_manifest


def _val_ranges(g, m):
    cfg = m["config"]
    dims = {k: v["opt"] for k, v in g["dynamic_dims"].items()}
    r = {"ids": f"[0,{cfg['vocab_size'] - 1}]", "layer": f"[0,{cfg['num_hidden_layers'] - 1}]",
         "ltm_ages": "[0,50]", "pos": "[0,100]"}
    if "S" in dims:
        r["valid_len"] = f"[{m['memory']['K0']},{dims['S']}]"
        r["merged_len"] = f"[1,{dims['S']}]"
    shapes = []
    for i in g["inputs"]:
        if any(isinstance(d, str) for d in i["shape"]):
            shapes.append(f"{i['name']}:[{','.join(str(dims.get(d, d)) for d in i['shape'])}]")
    ranges = [f"{k}:{v}" for k, v in r.items() if k in {i["name"] for i in g["inputs"]}]
    return shapes, ranges


def _polygraphy(args):
    env = dict(os.environ, POLYGRAPHY_AUTOINSTALL_DEPS="0")
    script = Path(sys.executable).parent / "polygraphy"  # polygraphy has no __main__ module
    cmd = [sys.executable, str(script)] if script.exists() else ["polygraphy"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, env=env)


def test_polygraphy_inspect_and_run(tiny_art):
    out, _ = tiny_art
    m = load_manifest(out, verify=False)
    cmds = []
    for name, g in m["graphs"].items():
        path = str(out / g["file"])
        shapes, ranges = _val_ranges(g, m)
        cmds.append(["inspect", "model", path])
        cmds.append(["run", path, "--onnxrt", *(["--input-shapes", *shapes] if shapes else []),
                     *(["--val-range", *ranges] if ranges else [])])
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(_polygraphy, cmds))
    for cmd, p in zip(cmds, results):
        assert p.returncode == 0, (cmd, p.stdout[-1500:], p.stderr[-1500:])
        if cmd[0] == "run":
            assert "PASSED" in p.stdout + p.stderr, (cmd, p.stdout[-1500:])
        else:
            assert "Opset" in p.stdout + p.stderr or "opset" in (p.stdout + p.stderr).lower()


@pytest.mark.skipif(not trt_check.available(), reason=f"{trt_check.unavailable_reason()}")
@pytest.mark.parametrize("art", ["tiny_art", "fp16_art"])
def test_tensorrt_rtx_parses_and_builds(art, request):
    out, _ = request.getfixturevalue(art)
    res = trt_check.check_artifact(out)
    assert set(res) == set(load_manifest(out, verify=False)["graphs"])
    for name, r in res.items():
        assert r["errors"] == [], (name, r["errors"])
        assert r["engine_bytes"] and r["engine_bytes"] > 0, name


def test_profile_shapes_cover_dynamic_axes(tiny_art):
    out, _ = tiny_art
    g = load_manifest(out, verify=False)["graphs"]["prefill"]
    p = trt_check.profile_shapes(g)  # artifact.graph_io's: every input, a static one with min = opt = max
    dynamic = {n for n, (mn, _, mx) in p.items() if mn != mx}
    assert dynamic == {"ids", "logit_rows", "ltm_keys.0", "ltm_k.0", "ltm_v.0", "ltm_keys.1", "ltm_k.1", "ltm_v.1", "ltm_ages"}
    assert set(p) == {i["name"] for i in g["inputs"]}
    mn, opt, mx = p["ids"]
    assert mn[0] == 1 and mn[0] <= opt[0] <= mx[0]


def test_cli_unknown_preset(tmp_path, capsys):
    assert main(["no-such-model", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "tiny" in err and "Traceback" not in err


def test_cli_existing_out(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    assert main(["tiny", "-o", str(tmp_path / "o")]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--fp8", "--int8"])
def test_cli_quantization_without_calibration_refused(tmp_path, capsys, flag):
    assert main(["tiny", "-o", str(tmp_path / "o"), flag]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_quantization_bad_calib_args(tmp_path, capsys):
    assert main(["tiny", "-o", str(tmp_path / "o"), "--fp8", "--calib", str(tmp_path / "nope.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["tiny", "-o", str(tmp_path / "o"), "--calib", "builtin"]) == 2
    assert "only used with" in capsys.readouterr().err
    assert main(["tiny", "-o", str(tmp_path / "o"), "--int8", "--precision", "fp16", "--calib", "builtin"]) == 2
    assert main(["tiny", "-o", str(tmp_path / "o"), "--int8", "--calib", "builtin", "--quant-exclude", "(unclosed"]) == 2
    assert "not a valid regular expression" in capsys.readouterr().err
    assert main(["tiny", "-o", str(tmp_path / "o"), "--int8", "--calib", "builtin", "--smooth-alpha", "1.5"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
    assert main(["tiny", "-o", str(tmp_path / "o"), "--int4", "--quant-auto-exclude"]) == 2
    assert "calibration text" in capsys.readouterr().err
    assert main(["tiny", "-o", str(tmp_path / "o"), "--smooth-alpha", "0.5"]) == 2
    assert "only used with" in capsys.readouterr().err
    assert main(["tiny", "-o", str(tmp_path / "o"), "--int4", "--quant-weight-only"]) == 2
    assert "applies to --fp8 / --int8" in capsys.readouterr().err
    assert main(["tiny", "-o", str(tmp_path / "o"), "--int4", "--gptq"]) == 2
    assert "--gptq needs" in capsys.readouterr().err
    assert main(["tiny", "-o", str(tmp_path / "o"), "--int8", "--calib", "builtin", "--quant-auto-granularity", "unit"]) == 2
    assert "only applies with --quant-auto-exclude" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_int8_with_builtin_calibration(tmp_path):
    import json

    out = tmp_path / "q"
    assert main(["tiny", "-o", str(out), "--no-validate", "--int8", "--calib", "builtin", "--calib-samples", "4",
                 "--smooth-alpha", "0.8", "--quant-exclude", r"^/layers\.1/", "--gptq"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    sec = man["quantized"]["int8"]
    assert sec["options"]["gptq"] and sec["gptq"]["hessians"] == 10 and sec["graphs"]["decode"]["gptq_weights"] == 7
    assert sec["smoothing"]["alpha"] == 0.8 and sec["options"]["exclude"] == [r"^/layers\.1/"]
    assert sec["graphs"]["decode"]["excluded"]["kept fp32 (mixed precision: exclude patterns)"] == 7
    assert sec["graphs"]["decode"]["smoothed_matmuls"] == sec["graphs"]["decode"]["quantized_nodes"] == 7
    assert (out / "report" / "quantization.json").exists()


def test_cli_missing_source(tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), "-o", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_bad_opset_and_chunk(tmp_path, capsys):
    assert main(["tiny", "-o", str(tmp_path / "o"), "--opset", "12"]) == 2
    assert "--opset" in capsys.readouterr().err
    assert main(["tiny", "-o", str(tmp_path / "o2"), "--max-chunk", "4"]) == 2  # < K = 8
    assert "max-chunk" in capsys.readouterr().err


def test_cli_out_of_disk(tmp_path, capsys, monkeypatch):
    import errno

    from mplus_deploy import build as exporter

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "graphs" / "weights.data"))

    monkeypatch.setattr(exporter, "export_artifact", full)
    assert main(["tiny", "-o", str(tmp_path / "o")]) == 2
    assert "out of disk space" in capsys.readouterr().err


def test_cli_export_memoryllm_manifest(mllm_art):
    m = load_manifest(mllm_art)
    assert m["model_kind"] == "memoryllm" and "retriever" not in m["graphs"]
    assert m["source"] == {"preset": "tiny-memoryllm"}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from mplus_deploy.model import MPlus, preset
    from mplus_deploy.model.checkpoint import save

    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save(MPlus.from_config(preset("tiny")), d)
    return d


def _ckpt_with(tiny_ckpt, tmp_path, edit):
    import json
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("field,value,msg", [
    ("num_hidden_layers", "two", 'num_hidden_layers: "two" is not an integer'),
    ("num_tokens", 8.5, "num_tokens: 8.5 is not an integer"),
    ("hidden_size", True, "hidden_size: true is not an integer"),
])
def test_cli_config_field_of_wrong_type(tiny_ckpt, tmp_path, capsys, field, value, msg):
    d = _ckpt_with(tiny_ckpt, tmp_path, lambda c: c.update({field: value}))
    assert main([str(d), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert msg in err and str(d / "config.json") in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_config_missing_field_named(tiny_ckpt, tmp_path, capsys):
    d = _ckpt_with(tiny_ckpt, tmp_path, lambda c: c.pop("hidden_size"))
    assert main([str(d), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing 'hidden_size'" in err and "shape mismatch" not in err and len(err.splitlines()) <= 3, err


def test_config_whole_float_and_default_kv_heads(tiny_ckpt, tmp_path):
    from mplus_deploy.model.config import MPlusConfig

    d = _ckpt_with(tiny_ckpt, tmp_path, lambda c: c.update(num_tokens=8.0) or c.pop("num_key_value_heads"))
    cfg = MPlusConfig.from_json(d)
    assert cfg.num_tokens == 8 and isinstance(cfg.num_tokens, int)
    assert cfg.num_key_value_heads == cfg.num_attention_heads  # LlamaConfig's default (no GQA)


def test_cli_read_only_output(tmp_path, capsys, monkeypatch):
    """-o under a read-only mount: exit 2 naming -o (root ignores chmod, so the mkdir fails as EROFS would)."""
    import errno

    real = os.mkdir

    def ro(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", ro)
    assert main(["tiny", "-o", str(tmp_path / "ro" / "o"), "--no-validate"]) == 2
    err = capsys.readouterr().err
    assert "read-only filesystem" in err and "-o" in err and "Traceback" not in err
