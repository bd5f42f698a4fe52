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
        g.add_argument("--fluency-weight", type=float, default=d.fluency_weight,
                       help="weight of the KL-to-backbone term on ordinary text (0: off)")
        g.add_argument("--aged-p", type=float, default=d.aged_p,
                       help="share of steps that start from an aged memory (one that memorized up to --aged-updates chunks)")
        g.add_argument("--aged-updates", type=int, default=d.aged_updates)
        g.add_argument("--log-every", type=int, default=d.log_every, metavar="N")
        g.add_argument("--save-every", type=int, default=d.save_every, metavar="N",
                       help="also write OUT every N steps (an interrupted run keeps its last checkpoint; 0: at the end)")
        c = p.add_argument_group("compact output (training.compact: what ships; deltas against SRC)")
        c.add_argument("--compact", action="store_true", help="write OUT compact: low-rank bf16 deltas (a few MB)")
        c.add_argument("--from-parts", metavar="FULL.safetensors",
                       help="do not train: compact this full parts file (trained from SRC) into OUT, keeping the "
                            "tensors of --parts only")
        c.add_argument("--lora-rank", type=int, default=4, help="rank kept of each LoRA product B@A (default 4)")
        c.add_argument("--delta-rank", type=int, default=16, help="rank kept of other matrices' deltas (default 16)")
        c.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])

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
        if a.lr <= 0 or a.warmup < 0 or a.retrieval_weight < 0 or a.fluency_weight < 0:
            raise UsageError("--lr must be > 0, --warmup, --retrieval-weight and --fluency-weight >= 0")
        if not 0.0 <= a.aged_p <= 1.0 or a.aged_updates <= 0:
            raise UsageError(f"--aged-p {a.aged_p} must be within 0..1 and --aged-updates {a.aged_updates} > 0")
        if not a.output.endswith(".safetensors"):
            raise UsageError(f"-o {a.output}: the trained parts are a safetensors file; name it *.safetensors")
        check_writable(a.output, "-o")
        if a.from_parts and not a.compact:
            raise UsageError("--from-parts compacts an existing file: add --compact")
        if a.from_parts and not Path(a.from_parts).is_file():
            raise UsageError(f"--from-parts {a.from_parts}: no such file")
        if a.lora_rank <= 0 or a.delta_rank <= 0:
            raise UsageError("--lora-rank and --delta-rank must be > 0")
        self.compact = dict(lora_rank=a.lora_rank, delta_rank=a.delta_rank, dtype=a.dtype) if a.compact else None
        self.from_parts = Path(a.from_parts) if a.from_parts else None
        self.config = TrainConfig(steps=a.steps, lr=a.lr, warmup=a.warmup, seed=a.seed, facts=a.facts,
                                  retrieval_weight=a.retrieval_weight, parts=parts, log_every=a.log_every,
                                  fluency_weight=a.fluency_weight, aged_p=a.aged_p, aged_updates=a.aged_updates,
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
    from mplus_deploy.training.loop import save, train, write_compact

    try:
        model, tok = _load(t.src, need_tokenizer=t.from_parts is None)
    except (*INPUT_ERRORS, OSError) as e:
        return report_error("mplus-train", e, t.src)
    if t.from_parts is not None:
        try:
            n = write_compact(model, t.from_parts, t.out, **t.compact, parts=t.config.parts)
        except (ValueError, OSError) as e:
            return report_error("mplus-train", e, t.from_parts)
        log(f"wrote {t.out} ({n} tensors, {t.out.stat().st_size / 1e6:.1f} MB) from {t.from_parts}")
        return 0
    log(f"{t.src}: training {t.config.parts} for {t.config.steps} steps (seed {t.config.seed})")
    last = []

    def out(r):
        if t.compact is None:
            save(r, t.out)
        else:
            write_compact(model, r, t.out, **t.compact)

    def checkpoint(r):
        out(r)
        last[:] = [r.steps_done]
        log(f"checkpoint: {t.out} at step {r.steps_done}")

    try:
        res = train(model, tok, t.config, log=log, on_checkpoint=checkpoint)
    except KeyboardInterrupt:
        where = f"{t.out} holds the checkpoint of step {last[0]}" if last else "nothing written"
        print(f"mplus-train: interrupted; {where}", file=sys.stderr)
        return 130
    out(res)
    log(f"wrote {t.out} ({len(res.tensors)} tensors, {t.out.stat().st_size / 1e6:.1f} MB) in {res.seconds:.0f} s")
    return 0


def _load(src: str, need_tokenizer: bool = True):
    from mplus_deploy.model.presets import resolve

    model, tok = resolve(src)
    if tok is None and need_tokenizer:
        raise ValueError(f"{src}: no tokenizer; training needs the model's tokenizer (use demo or a checkpoint "
                         "directory with tokenizer files)")
    return model, tok


if __name__ == "__main__":
    sys.exit(main())
