"""``--help`` of each entry point: its own config groups with their options, and its keys with their comments.

Hydra's default help lists every group of ``conf/`` (train-only ones under eval.py too) and the
composed config without comments. Each entry config sets
``hydra.help.template: ${robustx_help:<entry>}``; the entry script registers this resolver, which
builds the text from the YAML files themselves, so the help never disagrees with the configs.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["help_text", "register_help_resolver"]

CONF = Path(__file__).resolve().parents[1] / "conf"

_USAGE = {
    "train": ("Train a classifier (README.md, Training).",
              ["python train.py +experiment=NAME [group=option ...] [key=value ...]",
               "python train.py -m +experiment=NAME key=a,b,c            # a sweep: one run folder and W&B run per job",
               "python train.py +experiment=NAME --cfg job               # print the composed config"]),
    "eval": ("Accuracy and Accuracy-Robustness Areas of checkpoints (README.md, Measuring robustness).",
             ["python eval.py ckpt=PATH [data=NAME data.root=DIR] [key=value ...]",
              "python eval.py 'ckpt=[a.safetensors,b.pt]' ...             # several checkpoints, one curves.png"]),
    "explain": ("Adversarial explanations of image files (README.md, Explanations).",
                ["python explain.py ckpt=PATH 'images=[a.png,b.jpg]' [key=value ...]"]),
    "explore": ("A local web app for adversarial explanations (README.md, Explorer).",
                ["python explore.py ckpt=PATH [data=NAME data.root=DIR] [host=127.0.0.1 port=7860]"]),
    "study": ("Do attacks invalidate attribution maps? The invalidation study (README.md).",
              ["python study.py 'ckpt=[a.pt,b.pt]' [data=NAME data.root=DIR] [key=value ...]"]),
}


def _description(path: Path) -> str:
    """The first comment line of a config file that is not a ``@package`` directive."""
    for line in path.read_text().splitlines()[:6]:
        line = line.strip()
        if line.startswith("#") and "@package" not in line:
            return line.lstrip("# ").strip()
        if line and not line.startswith("#") and not line.startswith("defaults"):
            break
    return ""


def _defaults(text: str) -> list[tuple[str, str | None]]:
    """(group, default option) of a defaults list, in order (``_self_`` and ``hydra`` left out)."""
    out = []
    m = re.search(r"^defaults:\n((?:[ \t]+-.*\n|[ \t]*#.*\n)+)", text, flags=re.M)
    for line in (m.group(1) if m else "").splitlines():
        item = re.match(r"\s*-\s*([\w/+]+)\s*:\s*([\w.]+|null)?", line)
        if item and item.group(1) not in ("_self_", "hydra"):
            out.append((item.group(1).lstrip("+"), None if item.group(2) in (None, "null") else item.group(2)))
    return out


def _own_keys(text: str) -> str:
    """The entry config's text without its defaults list and header: its keys, with their comments."""
    lines = text.splitlines()
    keep, skipping = [], False
    for line in lines:
        if line.startswith("defaults:"):
            skipping = True
            continue
        if skipping and (line.startswith(" ") or line.startswith("\t") or not line.strip()):
            continue
        skipping = False
        if line.startswith("hydra:"):
            break
        keep.append(line)
    while keep and (keep[0].startswith("#") or not keep[0].strip()):
        keep.pop(0)  # the header comment is the summary
    return "\n".join("  " + line if line else "" for line in keep).rstrip()


def _group_lines(group: str, default: str | None, *, plus: bool = False) -> list[str]:
    """A group's heading and one line per option (``*`` marks the default)."""
    lines = [f"  {'+' if plus else ''}{group}:"]
    for opt in sorted((CONF / group).glob("*.yaml")):
        star = "*" if opt.stem == default else " "
        lines.append(f"   {star} {opt.stem:<24} {_description(opt)}".rstrip())
    return lines


def help_text(entry: str) -> str:
    """The ``--help`` text of ``<entry>.py`` (train, eval, explain, study)."""
    text = (CONF / f"{entry}.yaml").read_text()
    summary, usage = _USAGE.get(entry, (f"{entry}.py", [f"python {entry}.py [key=value ...]"]))
    parts = [f"{entry}.py: {summary}", "", "Usage:", *[f"  {u}" for u in usage]]
    groups = _defaults(text)
    if entry == "train":
        groups.append(("experiment", None))
    if groups:
        parts += ["", "Config groups (group=option; * = default):"]
        for group, default in groups:
            folder = CONF / group
            if not folder.is_dir():
                continue
            parts += _group_lines(group, default, plus=group == "experiment")
            default_file = folder / f"{default}.yaml"
            nested = dict(_defaults(default_file.read_text())) if default_file.is_file() else {}
            for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
                parts += _group_lines(f"{group}/{sub.name}", nested.get(sub.name))  # e.g. method/adversarial
    parts += ["", "Keys (key=value; a group's keys too, e.g. data.root=DIR; see them all with --cfg job):", _own_keys(text),
              "", "Hydra's own flags: --hydra-help. Errors in a value are reported in one line naming the key."]
    return "\n".join(parts).replace("$", "$$") + "\n"


def register_help_resolver() -> None:
    """Register ``${robustx_help:<entry>}`` (once) for the entry configs' ``hydra.help.template``."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("robustx_help"):
        OmegaConf.register_new_resolver("robustx_help", help_text)
