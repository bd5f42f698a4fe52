"""The validation cases of an export: per graph, feeds and the torch reference's outputs, one safetensors
file per case in a scratch folder inside OUT (``.validate-*``). The exporter writes them while it holds the
reference model (``WeightSource.reference``, then released); ``build.validate`` replays them on the
runtime's executor, one graph and one case at a time, and removes the folder."""
from __future__ import annotations

from pathlib import Path


def write_case(cases_dir: Path, graph: str, i: int, feeds: dict, outs: dict) -> None:
    from safetensors.torch import save_file

    t = {f"in/{k}": v.detach().contiguous() for k, v in feeds.items()}
    t.update({f"out/{k}": v.detach().contiguous() for k, v in outs.items()})
    save_file(t, str(Path(cases_dir) / f"{graph}.{i}.safetensors"))


def read_cases(cases_dir: Path, graph: str):
    """``graph``'s cases as (feeds, reference outputs), in order, read one file at a time."""
    from safetensors.torch import load_file

    paths = sorted(Path(cases_dir).glob(f"{graph}.*.safetensors"), key=lambda p: int(p.name.split(".")[-2]))
    for p in paths:
        t = load_file(str(p))
        yield ({k[3:]: v for k, v in t.items() if k.startswith("in/")},
               {k[4:]: v for k, v in t.items() if k.startswith("out/")})
