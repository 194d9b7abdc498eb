"""The command line's flag conventions: the seed's `train.py` flags as recipe overrides, and one
spelling rule for every subcommand (underscores, with the hyphen spelling as an alias)."""
from __future__ import annotations

import argparse
from pathlib import Path

# The seed's training flags (sit-xl-e2e-sdxl `train.py`) and the recipe keys they stand for.
# Flags that are given override the recipe; flags that are absent keep the recipe's value.
SEED_TRAIN_FLAGS: dict[str, str] = {
    "data_root": "data.root",
    "output_dir": "output.dir",
    "model_size": "student.preset",
    "batch_size": "training.batch_size",
    "learning_rate": "optimizer.lr",
    "num_epochs": "training.num_epochs",
    "use_aspect_ratio_bucket": "data.bucket",
    "train_vae": "training.train_vae",
    "train_text_encoder": "training.train_text_encoder",
    "mixed_precision": "training.mixed_precision",
    "use_ema": "training.use_ema",
}
# The seed trains SDXL -> SiT 2b; `cli.py train` starts from that recipe unless --recipe says otherwise.
SEED_TRAIN_RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "sdxl_sit_2b.yaml")


def seed_flags_to_overrides(args: argparse.Namespace) -> list[str]:
    """The seed's `train.py` flags as recipe `key=value` overrides."""
    out = []
    for flag, key in SEED_TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is None or value is False:
            continue
        if value is True:
            value = "true"
        out.append(f"{key}={value}")
    if args.num_epochs is not None:
        out.append("training.max_steps=null")  # the seed counts epochs, not steps
    return out


def both_spellings(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag convention for every subcommand: the seed's underscores (`--output_dir`,
    `--num_prompts`), with the hyphen spelling accepted as an alias, and `--output_dir` for every
    output folder (`--out`, the older name, still works). Applied to the finished parser, so a new
    flag gets both spellings whichever way it is written. Help lists the underscore form first."""
    for action in list(parser._actions):
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                both_spellings(sub)
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs:
            continue
        names = {"--" + o[2:].replace("-", "_") for o in longs} | {"--" + o[2:].replace("_", "-") for o in longs}
        if "--out" in longs:
            names |= {"--output_dir", "--output-dir"}
        for name in sorted(names - set(action.option_strings)):
            if name not in parser._option_string_actions:  # never take another flag's name
                parser._option_string_actions[name] = action
                action.option_strings.append(name)
        shorts = [o for o in action.option_strings if not o.startswith("--")]
        longs = sorted((o for o in action.option_strings if o.startswith("--")),
                       key=lambda o: ("-" in o[2:], o != "--output_dir", o))  # underscores first
        action.option_strings[:] = shorts + longs
    return parser
