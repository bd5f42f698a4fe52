"""The shared argument groups (cli/args.py): each validates its flags and builds its object; the tools that
use them report a bad value as exit 2 with the flag named."""
import pytest

from mplus_deploy.cli import profile, run
from mplus_deploy.cli.args import BackendArgs, SamplingArgs, UsageError, build_parser, check_writable, parse_groups
from mplus_deploy.model.sampling import SamplingParams


def _parse(groups, argv):
    a = build_parser("t", "test", groups).parse_args(argv)
    parse_groups(groups, a)
    return groups


def test_sampling_group_builds_the_sampling_params():
    (s,) = _parse([SamplingArgs()], ["--max-new-tokens", "7", "--do-sample", "--top-p", "0.5", "--sample-seed", "3"])
    assert s.params == SamplingParams(max_new_tokens=7, do_sample=True, top_p=0.5, seed=3)
    (s,) = _parse([SamplingArgs()], [])
    assert s.params == SamplingParams()  # the library's defaults, not the CLI's own


@pytest.mark.parametrize("argv,flag", [(["--temperature", "0"], "--temperature"), (["--top-p", "2"], "--top-p"),
                                       (["--top-k", "-1"], "--top-k"), (["--max-new-tokens", "-3"], "--max-new-tokens")])
def test_sampling_group_names_the_bad_flag(argv, flag):
    with pytest.raises(UsageError, match=f"^{flag}: "):
        _parse([SamplingArgs()], argv)


def test_backend_group_checks_threads_and_builds_engine_options():
    (b,) = _parse([BackendArgs()], ["--backend", "torch", "--threads", "2"])
    assert b.options() == {"backend": "torch", "device": "cpu", "threads": 2}
    with pytest.raises(UsageError, match="--threads 0"):
        _parse([BackendArgs()], ["--threads", "0"])


def test_run_and_profile_share_the_backend_group():
    """Both tools have the group itself, not a copy of its flags."""
    def flags(groups):
        p = build_parser("t", "t", groups)
        return {a.dest for a in p._actions}

    assert {"backend", "device", "threads"} <= flags([run.BackendArgs()])
    assert run.BackendArgs is profile.BackendArgs is BackendArgs
    assert any(G is BackendArgs for G in profile.GROUPS)


def test_check_writable(tmp_path):
    check_writable(tmp_path / "f.json", "--json")
    assert list(tmp_path.iterdir()) == []  # the probe is gone
    with pytest.raises(UsageError, match="is a directory"):
        check_writable(tmp_path, "--json")
    with pytest.raises(UsageError, match="does not exist"):
        check_writable(tmp_path / "no" / "f.json", "--json")


def test_a_bad_sampling_flag_is_exit_2_before_the_engine_loads(tmp_path, capsys):
    assert run.main([str(tmp_path / "nowhere"), "--prompt", "hi", "--top-p", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mplus-run: error: --top-p") and "nowhere" not in err
