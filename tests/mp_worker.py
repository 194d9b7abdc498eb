"""Run by tests/test_multiprocess.py under `accelerate launch`: train a few steps, then every rank
writes a digest of its student weights so the test can compare the ranks."""

import hashlib
import json
import sys
from pathlib import Path

from distill.recipe import load_recipe
from distill.trainer import Distiller


def main() -> None:
    out, recipe, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    d = Distiller(load_recipe(recipe, overrides))
    d.fit()
    student = d.accelerator.unwrap_model(d.student)
    h = hashlib.sha256()
    for name, p in sorted(student.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    rank = d.accelerator.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": d.accelerator.num_processes, "digest": h.hexdigest(), "step": d.state.step,
        "batches": d.data.batches_per_epoch}))


if __name__ == "__main__":
    main()
