"""`python -m benchmarks.setcpu [REV]`: CPU seconds of one 7B-shaped tensor set's jobs on one core, this code
against git revision REV (default c5e063e), alternating, medians of three.

The set is an 11008 x 4096 bf16 matrix (Llama-2-7B's gate/up projection) of two fine-tunes and their base:
its elementwise pass and its four SVDs (two weights, two task vectors), each timed by the thread's CPU clock
(where the code takes the SVDs' final products in the pass, as the stream does since issue 19's second round,
"elementwise" includes the four products and "svd" is the bfloat16 iterations),
so other processes on a shared machine move the figures much less than they move wall times. "weights-only
pass" is the same set without its base: the weights' pass and their two final float32 products (taken in
the pass since issue 19's third round, from their own upcast rows before). Each revision
runs in its own child process (`-P`: the package comes from PYTHONPATH).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.bench7b import export_revision

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import inspect, json, time, torch
from mergelens_mcp.analysis import spectral, stream
from mergelens_mcp.analysis.metrics import Operand, pair_sums, weight_and_task_sums
torch.set_num_threads(1)
stream._tune_heap()
g = torch.Generator().manual_seed(0)
base = (0.02 * torch.randn(11008, 4096, generator=g)).bfloat16()
a = (base.float() + 0.002 * torch.randn(11008, 4096, generator=g)).bfloat16()
b = (base.float() + 0.002 * torch.randn(11008, 4096, generator=g)).bfloat16()
def clock(fn):
    started = time.thread_time(); fn(); return time.thread_time() - started
out = {"elementwise": [], "weight svd": [], "task svd": []}
for _ in range(4):
    wa, wb, zb = Operand(a), Operand(b), Operand(base)
    ta, tb = Operand(a, base=base), Operand(b, base=base)
    if not hasattr(Operand, "fusable"):
        out["weight svd"].append(clock(lambda: wa.svd))  # before the pass: the energy is measured in the SVD
        out["task svd"].append(clock(lambda: ta.svd))
        out["elementwise"].append(clock(lambda: weight_and_task_sums(wa, wb, ta, tb, zb)))
        continue
    zs = {}  # the SVDs' iterations; their final products are taken in the pass, as the stream does
    out["weight svd"].append(clock(lambda: zs.__setitem__(wa, wa.subspace())))
    out["task svd"].append(clock(lambda: zs.__setitem__(ta, ta.subspace())))
    zs[wb], zs[tb] = wb.subspace(), tb.subspace()
    def fused():
        products = {op: (z, torch.empty(op.tensor.shape[0], z.shape[1])) for op, z in zs.items()}
        made = dict(products)
        weight_and_task_sums(wa, wb, ta, tb, zb, products)
        for op, (z, product) in made.items():
            op.finish_svd(product, z)
    out["elementwise"].append(clock(fused))
    # a set without a base: the weights' pass with their two final products (issue 19's third round takes
    # them in the pass; before, each SVD took its own product from its own upcast rows)
    xa, xb = Operand(a), Operand(b)
    if "products" in inspect.signature(pair_sums).parameters:
        def weights_only():
            products = {xa: (zs[wa], torch.empty(11008, 32)), xb: (zs[wb], torch.empty(11008, 32))}
            made = dict(products)
            pair_sums(xa, xb, products=products)
            for op, (z, product) in made.items():
                op.finish_svd(product, z)
    else:
        def weights_only():
            pair_sums(xa, xb)
            for op, z in ((xa, zs[wa]), (xb, zs[wb])):
                product, _ = spectral._times(op.tensor, None, z, False)
                spectral.finish(product, z, op.rank, min(op.tensor.shape), op.norm**2)
    out.setdefault("weights-only pass", []).append(clock(weights_only))
print(json.dumps({k: v[1:] for k, v in out.items()}))  # the first round warms the allocator
"""


def measure(code: Path) -> dict[str, list[float]]:
    env = {"PYTHONPATH": f"{code}:{ROOT}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-P", "-c", CHILD], env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    rev = (argv if argv is not None else sys.argv[1:])[0] if (argv or sys.argv[1:]) else "c5e063e"
    codes = {f"before {rev}": export_revision(rev), "after": ROOT}
    times: dict[str, dict[str, list[float]]] = {label: {} for label in codes}
    for _ in range(3):
        for label, code in codes.items():
            for job, values in measure(code).items():
                times[label].setdefault(job, []).extend(values)
    for label, jobs in times.items():
        ms = {job: statistics.median(v) * 1000 for job, v in jobs.items()}
        per_set = ms["elementwise"] + 2 * ms["weight svd"] + 2 * ms["task svd"]
        parts = ", ".join(f"{job} {value:.0f} ms" for job, value in ms.items())
        print(f"{label:<16} {parts}; one set (pass + 2 weight + 2 task SVDs) {per_set:.0f} ms CPU", end="")
        if "weights-only pass" in ms:
            print(f"; without a base (pass + 2 weight SVDs) {ms['weights-only pass'] + 2 * ms['weight svd']:.0f} ms",
                  end="")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
