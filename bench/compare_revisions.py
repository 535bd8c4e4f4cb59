"""bench_engine.py's CPU repeated-sampling rows under two source trees, alternating in one run.

    python bench/compare_revisions.py main            # a git revision against the working tree
    python bench/compare_revisions.py main --rounds 6 --samples 16,64
    python bench/compare_revisions.py main --shape tiny   # a 2-layer model: mostly host work
    python bench/compare_revisions.py main --transformers # and transformers `generate` beside

The revision's ``python/`` is exported to a temporary directory and run by this interpreter (the
compiled extension is the installed one, so the revision must share ``csrc/`` with the working
tree). Each round starts one process per tree, old then new, which loads the model, warms up on
a small workload (first-call costs out of the numbers), then times ``LLM.generate`` on the row's
workload; the rounds alternate so that a shared machine's drifting load weighs on both alike.
With ``--transformers`` each round also runs transformers ``generate`` (bench_engine's baseline,
the installed release) on the same workload, model and prompts. Prints per row the median
seconds and tokens/s of each, new/old, and new's speed over transformers'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
source, model_dir, samples, shape = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[5]
if source != "-":  # run the exported tree, not the editable install's
    sys.meta_path = [f for f in sys.meta_path if "ttscale" not in type(f).__module__]
    sys.path.insert(0, source)
import torch
import ttscale
sys.path.insert(0, sys.argv[4])
import bench_engine as be
from ttscale.model import read_config

w = be.Workload(getattr(be, shape), 1, samples, 512, 64)
if sys.argv[6] == "transformers":
    warm, model = be.build_transformers(be.dataclasses.replace(w, samples=2, new_tokens=4),
                                        model_dir, "cpu")
    warm()
    run, _ = be.build_transformers(w, model_dir, "cpu", model)
    steps = None
else:
    budget = be.kv_budget(w, read_config(model_dir), torch.float32)
    run, llm = be.build_ttscale(w, model_dir, "cpu", budget)
    be.generate_with(llm, be.dataclasses.replace(w, samples=2, new_tokens=4))()
start = time.perf_counter()
lengths = run()
seconds = time.perf_counter() - start
assert lengths == [w.new_tokens] * w.samples
if sys.argv[6] != "transformers":
    steps = llm.stats().steps
print(json.dumps({"file": ttscale.__file__, "seconds": seconds, "steps": steps}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--samples", default="16,64")
    parser.add_argument("--shape", choices=("qwen2-20m", "tiny"), default="qwen2-20m",
                        help="bench_engine's CPU model, or its 2-layer tiny one (the step is then "
                             "mostly host work)")
    parser.add_argument("--transformers", action="store_true",
                        help="also time transformers generate on each row, in the same rounds")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_engine as be

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(f"git -C {ROOT} archive {args.revision} python | tar -x -C {tmp}",
                       shell=True, check=True)
        import ttscale._C as compiled

        (tmp / "python/ttscale" / Path(compiled.__file__).name).symlink_to(compiled.__file__)
        model_dir = tmp / "model"
        model_dir.mkdir()
        shape = "QWEN2_20M" if args.shape == "qwen2-20m" else "TINY_QWEN2"
        be.write_model(getattr(be, shape), model_dir, "cpu")
        trees = {"old": str(tmp / "python"), "new": "-"}
        if args.transformers:
            trees["transformers"] = "-"
        tmp_str = str(tmp)
        print(f"{args.revision} (old) against the working tree (new); load "
              f"{be._load()} at the start")
        for samples in map(int, args.samples.split(",")):
            times: dict[str, list[float]] = {name: [] for name in trees}
            for _ in range(args.rounds):
                for name, source in trees.items():
                    out = subprocess.run(
                        [sys.executable, "-c", CHILD, source, str(model_dir), str(samples),
                         str(ROOT / "bench"), shape, name], check=True, capture_output=True,
                        text=True)
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    assert (result["file"].startswith(tmp_str)) == (name == "old"), result["file"]
                    times[name].append(result["seconds"])
            tokens = samples * 64
            medians = {name: statistics.median(t) for name, t in times.items()}
            old, new = medians["old"], medians["new"]
            line = (f"{getattr(be, shape).name} 1x{samples} P=512 T=64: "
                    f"old {old:.3f} s ({tokens / old:.0f} tok/s), "
                    f"new {new:.3f} s ({tokens / new:.0f} tok/s), new/old {new / old:.3f}")
            if "transformers" in medians:
                hf = medians["transformers"]
                line += (f", transformers {hf:.3f} s ({tokens / hf:.0f} tok/s), "
                         f"new over transformers {hf / new:.2f}x")
            rounds = "; ".join(f"{name} {[round(t, 3) for t in t_]}" for name, t_ in times.items())
            print(f"{line}; rounds {rounds}")


if __name__ == "__main__":
    main()
