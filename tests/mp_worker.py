"""Run by tests/test_multiprocess.py under `accelerate launch`: train a few steps, then every rank
writes what the test compares (a digest of its student weights; with `--resume-from STEP`, the
run is also continued from that checkpoint into `<output.dir>-resumed`)."""

import hashlib
import json
import sys
from pathlib import Path

from sitdistill.core.recipe import load_recipe
from sitdistill.train.sharding import local
from sitdistill.train.trainer import Distiller


def main() -> None:
    args = sys.argv[1:]
    resume_from = None
    if args[0] == "--resume-from":
        resume_from, args = int(args[1]), args[2:]
    out, recipe, overrides = Path(args[0]), args[1], args[2:]
    d = Distiller(load_recipe(recipe, overrides))
    d.fit()
    student = d.accelerator.unwrap_model(d.student)
    h = hashlib.sha256()
    for name, p in sorted(student.state_dict().items()):  # under FSDP: this rank's shard
        h.update(name.encode())
        h.update(local(p.detach()).cpu().contiguous().numpy().tobytes())
    rank = d.accelerator.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": d.accelerator.num_processes, "digest": h.hexdigest(), "step": d.state.step,
        "batches": d.data.batches_per_epoch, "fsdp": d.fsdp}))
    if d.fsdp:  # a folder missing a weight is refused, not filled in from the current model
        from safetensors.torch import load_file

        from sitdistill.train.sharding import WEIGHTS_NAME, GatheredModel

        state = load_file(Path(d.recipe.output.dir) / f"checkpoint-{d.state.step}" / "student" / WEIGHTS_NAME)
        state.pop("final_layer.linear.weight")
        try:
            GatheredModel(student).load_state_dict(state)
            refused = False
        except RuntimeError as e:
            refused = "final_layer.linear.weight" in str(e)
        (out / f"rank{rank}-missing.json").write_text(json.dumps({"refused": refused}))
    if resume_from is not None:
        run = Path(d.recipe.output.dir)
        again = [*overrides, f"output.dir={run}-resumed", f"training.resume={run / f'checkpoint-{resume_from}'}"]
        Distiller(load_recipe(recipe, again)).fit()


if __name__ == "__main__":
    main()
