"""``mplus-train SRC -o PARTS.safetensors [--steps N] [--lr LR] [--seed S] [--parts lora,...]``

Trains the M+ parts of ``SRC`` (a preset such as ``demo``, or a checkpoint directory) on its frozen backbone with
the memorize-then-answer objective (``mplus_deploy/training``, docs/evaluation.md "Training the demo memory") and
writes the trained tensors (a few MB) with their metadata. Progress goes to stderr every ``--log-every`` steps
(also when not on a TTY); ``--save-every N`` also writes the file every N steps. Exit codes: 0 ok, 2 usage or
input error, 130 interrupted (the last checkpoint, if any, stays; nothing else is written).
"""
from __future__ import annotations

import sys
from pathlib import Path

from .args import INPUT_ERRORS, ArgGroup, UsageError, build_parser, check_writable, parse_or_usage, report_error


class TrainArgs(ArgGroup):
    def add(self, p) -> None:
        from mplus_deploy.training.loop import TrainConfig
        from mplus_deploy.training.objective import PARTS

        d = TrainConfig()
        g = p.add_argument_group("training")
        g.add_argument("src", metavar="SRC", help="preset name (e.g. demo) or checkpoint directory with a tokenizer")
        g.add_argument("-o", "--output", required=True, metavar="F.safetensors", help="the trained parts file")
        g.add_argument("--steps", type=int, default=d.steps)
        g.add_argument("--lr", type=float, default=d.lr)
        g.add_argument("--warmup", type=int, default=d.warmup)
        g.add_argument("--seed", type=int, default=d.seed)
        g.add_argument("--facts", type=int, default=d.facts, help="training facts generated (never evaluation facts)")
        g.add_argument("--retrieval-weight", type=float, default=d.retrieval_weight)
        g.add_argument("--parts", default=",".join(d.parts), help=f"comma-separated, from {sorted(PARTS)}")
        g.add_argument("--log-every", type=int, default=d.log_every, metavar="N")
        g.add_argument("--save-every", type=int, default=d.save_every, metavar="N",
                       help="also write OUT every N steps (an interrupted run keeps its last checkpoint; 0: at the end)")

    def parse(self, a) -> None:
        from mplus_deploy.training.loop import TrainConfig
        from mplus_deploy.training.objective import PARTS

        parts = tuple(x for x in a.parts.split(",") if x)
        bad = [x for x in parts if x not in PARTS]
        if bad or not parts:
            raise UsageError(f"--parts {a.parts!r}: choose from {sorted(PARTS)}")
        for flag, v in (("--steps", a.steps), ("--facts", a.facts), ("--log-every", a.log_every)):
            if v <= 0:
                raise UsageError(f"{flag} {v}: must be > 0")
        if a.save_every < 0:
            raise UsageError(f"--save-every {a.save_every}: must be >= 0")
        if a.lr <= 0 or a.warmup < 0 or a.retrieval_weight < 0:
            raise UsageError("--lr must be > 0, --warmup and --retrieval-weight >= 0")
        if not a.output.endswith(".safetensors"):
            raise UsageError(f"-o {a.output}: the trained parts are a safetensors file; name it *.safetensors")
        check_writable(a.output, "-o")
        self.config = TrainConfig(steps=a.steps, lr=a.lr, warmup=a.warmup, seed=a.seed, facts=a.facts,
                                  retrieval_weight=a.retrieval_weight, parts=parts, log_every=a.log_every,
                                  save_every=a.save_every)
        self.src, self.out = a.src, Path(a.output)


def main(argv=None) -> int:
    groups = [TrainArgs()]
    p = build_parser("mplus-train", "Train the M+ parts (LoRA, memory embeddings, retriever) on a frozen backbone.",
                     groups)
    a = p.parse_args(argv)
    code = parse_or_usage("mplus-train", groups, a)
    if code is not None:
        return code
    (t,) = groups
    log = lambda m: print(f"mplus-train: {m}", file=sys.stderr, flush=True)  # noqa: E731
    from mplus_deploy.training.loop import save, train

    try:
        model, tok = _load(t.src)
    except (*INPUT_ERRORS, OSError) as e:
        return report_error("mplus-train", e, t.src)
    log(f"{t.src}: training {t.config.parts} for {t.config.steps} steps (seed {t.config.seed})")
    last = []

    def checkpoint(r):
        save(r, t.out)
        last[:] = [r.steps_done]
        log(f"checkpoint: {t.out} at step {r.steps_done}")

    try:
        res = train(model, tok, t.config, log=log, on_checkpoint=checkpoint)
    except KeyboardInterrupt:
        where = f"{t.out} holds the checkpoint of step {last[0]}" if last else "nothing written"
        print(f"mplus-train: interrupted; {where}", file=sys.stderr)
        return 130
    save(res, t.out)
    log(f"wrote {t.out} ({len(res.tensors)} tensors) in {res.seconds:.0f} s")
    return 0


def _load(src: str):
    from mplus_deploy.model.presets import resolve

    model, tok = resolve(src)
    if tok is None:
        raise ValueError(f"{src}: no tokenizer; training needs the model's tokenizer (use demo or a checkpoint "
                         "directory with tokenizer files)")
    return model, tok


if __name__ == "__main__":
    sys.exit(main())
