"""Fault injection for memory snapshots (issue 15): a child process saves snapshots in a loop and is
SIGKILLed at a random point; after every kill the target must load as one of the complete states saved
(the last one whose save returned, or the one in flight if its rename had already landed), and the next
save must remove every temp file the killed save left (nothing but the target in its folder afterwards).

The memory is the ``tiny`` preset's (torch backend, no export), with ``--states`` distinct states of
different LTM / pending sizes (memorize between them). Kill delays are uniform in [0, 6 x the time of
one save in a child] (measured first), so kills land at every phase of a save (writing, fsync, rename,
between saves) and sometimes after a few complete saves. The
child is a ``fork`` of this process (the states are built once; 1 torch thread, no OpenMP pool).

    python bench/snapshot_faults.py [--kills 100] [--seed 0] [--dir DIR] [--json FILE]

Prints one line per failure and a summary; exit status 0 when every kill passed, 1 otherwise.
``tests/runtime/test_snapshot_faults.py`` runs it with ``--kills 20``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # before any op: the forked children must not inherit an OpenMP pool

from mplus_deploy.model import MPlus, preset
from mplus_deploy.runtime import Engine, snapshot

WEIGHTS_ID = "bench-snapshot-faults"
READY = 0xFFFFFFFF  # the child's first word: its save loop starts (the kill delay counts from here)
DELAY_SAVES = 6.0  # kill delays: uniform in [0, DELAY_SAVES x one save]


def build_states(n: int, seed: int) -> tuple:
    """``n`` distinct memories of the tiny preset (one or more updates apart: pending and LTM sizes vary)."""
    m = MPlus.from_config(preset("tiny"), seed=seed)
    for l, rf in enumerate((1.0, 2.0)):  # evictions within a few merges, differently per layer
        m.memory.ltm_rf[l] = torch.full_like(m.memory.ltm_rf[l], rf)
    m.memory.touch()
    eng = Engine(m, backend="torch", seed=seed)
    g = torch.Generator().manual_seed(seed)
    states = [eng.host_memory.clone()]
    while len(states) < n:
        n_tok = 16 * int(torch.randint(1, 4, (1,), generator=g))  # whole chunks of >= 16 tokens
        eng.memorize(torch.randint(3, 256, (n_tok,), generator=g), progress=False)
        states.append(eng.host_memory.clone())
    assert all(not a.equal(b) for i, a in enumerate(states) for b in states[i + 1:]), "states must differ"
    return eng.config, states


def _child(target: Path, states: list, start: int, w: int) -> None:
    """Save states[start], states[start + 1], ... onto ``target`` forever; report each completed index."""
    try:
        os.write(w, READY.to_bytes(4, "little"))
        i = start
        while True:
            snapshot.save(states[i % len(states)], target, weights_id=WEIGHTS_ID)
            os.write(w, (i % len(states)).to_bytes(4, "little"))
            i += 1
    finally:
        os._exit(1)


def leftovers(target: Path) -> list[str]:
    """Every file beside the target (the live folder holds nothing else): temp files of any naming."""
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def _read_all(r: int) -> bytes:
    out = b""
    while chunk := os.read(r, 1 << 16):
        out += chunk
    return out


def _round(target: Path, states: list, start: int, delay: float) -> tuple[int, list]:
    """Fork a saving child, SIGKILL it ``delay`` s after its loop started; (wait status, indices saved)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(target, states, start, w)
    os.close(w)
    first = os.read(r, 4)  # wait until the child runs (fork + scheduling are not part of the delay)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    raw = (first if first != READY.to_bytes(4, "little") else b"") + _read_all(r)
    os.close(r)
    return status, [int.from_bytes(raw[i: i + 4], "little") for i in range(0, len(raw) - len(raw) % 4, 4)]


def which(mem, states: list) -> int | None:
    return next((j for j, s in enumerate(states) if mem.equal(s)), None)


def run(kills: int, seed: int, workdir: Path, n_states: int = 6) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg, states = build_states(n_states, seed)
    ref = workdir / "states"
    for j, s in enumerate(states):  # reference copies (checked by the test)
        snapshot.save(s, ref / f"state{j}.safetensors", weights_id=WEIGHTS_ID)
    target = workdir / "live" / "mem.safetensors"
    for j in range(3):
        snapshot.save(states[j % n_states], target, weights_id=WEIGHTS_ID)
    # The time of one save in a forked child (its first writes fault copy-on-write pages: slower than here).
    _, done = _round(target, states, 0, 0.3)
    save_s = 0.3 / max(1, len(done))
    snapshot.save(states[4 % n_states], target, weights_id=WEIGHTS_ID)
    rng = random.Random(seed)
    prev = 4 % n_states  # the state the target holds now
    records, t_start = [], time.perf_counter()
    for k in range(kills):
        delay = rng.uniform(0.0, DELAY_SAVES * save_s)
        status, done = _round(target, states, (prev + 1) % n_states, delay)
        last = done[-1] if done else prev
        expected = sorted({last, (last + 1) % n_states})  # the last completed save, or the one in flight
        temps_before = leftovers(target)
        rec = {"kill": k, "delay_ms": round(delay * 1e3, 3), "killed_by": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
               "saves_completed": len(done), "temps_before": len(temps_before), "expected": expected}
        try:
            got = which(snapshot.load(target, cfg, weights_id=WEIGHTS_ID), states)
            rec["loaded"], rec["error"] = got, None
        except Exception as e:  # noqa: BLE001 - recorded as a failure
            got, rec["loaded"], rec["error"] = None, None, f"{type(e).__name__}: {e}"
        nxt = ((got if got is not None else last) + rng.randrange(1, n_states)) % n_states  # another state
        snapshot.save(states[nxt], target, weights_id=WEIGHTS_ID)
        rec["temps_after"] = leftovers(target)
        rec["next_loads"] = which(snapshot.load(target, cfg, weights_id=WEIGHTS_ID), states) == nxt
        rec["ok"] = (rec["killed_by"] == signal.SIGKILL and got in expected and not rec["temps_after"]
                     and rec["next_loads"])
        records.append(rec)
        prev = nxt
    elapsed = time.perf_counter() - t_start
    others = leftovers(target)
    return {
        "kills": kills, "seed": seed, "states": n_states, "save_ms": round(save_s * 1e3, 3),
        "elapsed_s": round(elapsed, 2), "passed": sum(r["ok"] for r in records),
        "killed_mid_save": sum(r["temps_before"] > 0 for r in records),
        "temps_left_after_next_save": sum(len(r["temps_after"]) for r in records),
        "files_beside_target": others, "target": str(target), "reference_dir": str(ref),
        "last_state": prev, "records": records,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--states", type=int, default=6)
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    p.add_argument("--json", type=Path, default=None, help="write the outcome (with every kill) here")
    a = p.parse_args(argv)
    if a.kills < 1 or a.states < 3:
        p.error("--kills must be >= 1 and --states >= 3")
    with tempfile.TemporaryDirectory(prefix="snapshot-faults-") as tmp:
        res = run(a.kills, a.seed, a.dir or Path(tmp), a.states)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    for r in res["records"]:
        if not r["ok"]:
            print(f"FAIL kill {r['kill']}: delay {r['delay_ms']} ms, loaded {r['loaded']} (expected one of "
                  f"{r['expected']}), error {r['error']}, temps after the next save {r['temps_after']}")
    print(f"{res['passed']}/{res['kills']} kills passed ({res['killed_mid_save']} mid-save, i.e. a temp file was "
          f"left; one save {res['save_ms']} ms; {res['elapsed_s']} s); temp files surviving the next save: "
          f"{res['temps_left_after_next_save']}; other files beside the target: {res['files_beside_target'] or 'none'}")
    return 0 if res["passed"] == res["kills"] and not res["files_beside_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
