"""``mplus-train``: every bad option is refused with exit 2 before any work, naming the fix."""
import pytest

from mplus_deploy.cli.train import main


@pytest.mark.parametrize("args,msg", [
    (["--parts", "lora,backbone"], "--parts"),
    (["--steps", "0"], "--steps 0"),
    (["--lr", "0"], "--lr"),
])
def test_bad_options_exit_2(tmp_path, capsys, args, msg):
    assert main(["tiny", "-o", str(tmp_path / "p.safetensors"), *args]) == 2
    assert msg in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_output_must_be_safetensors_and_writable(tmp_path, capsys):
    assert main(["tiny", "-o", str(tmp_path / "p.bin")]) == 2
    assert "*.safetensors" in capsys.readouterr().err
    assert main(["tiny", "-o", str(tmp_path / "missing" / "p.safetensors")]) == 2


def test_a_preset_without_tokenizer_is_refused(tmp_path, capsys):
    assert main(["tiny", "-o", str(tmp_path / "p.safetensors"), "--steps", "1"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "p.safetensors").exists()
