"""Seeds paired across result files: vistrain's side of the current code against ultralytics' side, box and mask
mAP50-95 (pycocotools, ``val`` pipeline) of ``bench/segment.py --epochs 24 --nbs 16`` runs on the CPU.

Both sides are deterministic on this CPU (a seed's run repeats its mAP to four decimals; the script checks it
wherever a seed was run twice and stops if the runs disagree), so a seed's run of either side stands wherever it
was made with the same code path and settings:

- ultralytics: every ``bench/segment.py`` result file given with ``--bench`` (its side does not change with
  vistrain's code);
- vistrain: the runs of ``--current`` (``bench/segment.py`` at the current code), else a vistrain-only run of
  ``bench/segment_vistrain.py`` with mosaic partners from the whole dataset (``--vistrain``: runs whose
  ``mosaic_buffer`` is false, or files written with ``--no-buffer`` when the buffer was the default:
  ``buffer_size`` 0, the code path of today's default ``mosaic_buffer=false``).

Prints each seed's pair and the paired statistics of ``bench/segment.py`` (mean difference, its standard error,
sign-flip p, seeds below). ``--early N`` adds, for the runs of ``--current`` (both sides record their curves), the
train box loss after epoch N against the run's final box mAP50-95, sorted by that loss, with their correlation:
how early a run's result is decided.

    .venv/bin/python bench/segment_seeds.py
    .venv/bin/python bench/segment_seeds.py --early 4
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segment import paired  # noqa: E402

R = Path(__file__).resolve().parent / "results"
SETTINGS = ("n", "epochs", "imgsz", "batch", "nbs", "workers", "threads", "device")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--current", type=Path, default=R / "segment-e24-nbs16-uniform.json")
    p.add_argument("--bench", type=Path, nargs="*", default=[R / "segment-e24-nbs16.json"])
    p.add_argument("--vistrain", type=Path, nargs="*",
                   default=[R / "segment-e24-nbs16-nobuffer.json", R / "segment-e24-nbs16-buffer-ab.json"])
    p.add_argument("--early", type=int, metavar="N", help="train box loss after epoch N against the final mAP")
    args = p.parse_args(argv)

    def load(f: Path) -> dict:
        return json.loads(f.read_text())

    current = load(args.current)
    want = {k: current["settings"].get(k) for k in SETTINGS}
    vis: dict[int, dict] = {}  # seed -> {"B", "M", "from"}
    ult: dict[int, dict] = {}

    def put(table: dict, seed: int, box: float, mask: float, src: str) -> None:
        new = {"B": round(box, 4), "M": round(mask, 4), "from": src}
        old = table.get(seed)
        if old and (old["B"], old["M"]) != (new["B"], new["M"]):
            raise SystemExit(f"seed {seed}: {old['from']} gives {old['B']}/{old['M']}, {src} {new['B']}/{new['M']}: "
                             "the runs are not deterministic, so seeds cannot be paired across files")
        table.setdefault(seed, new)

    for f in [args.current, *args.bench]:
        d = load(f)
        got = {k: d["settings"].get(k) for k in SETTINGS}
        if got != want:
            raise SystemExit(f"{f.name}: settings {got} differ from {args.current.name}'s {want}")
        for r in d["runs"]:
            a = r["accuracy"]["val"]
            put(ult, r["seed"], a["ultralytics"]["mAP50-95(B)"], a["ultralytics"]["mAP50-95(M)"], f.name)
            if f == args.current:
                put(vis, r["seed"], a["vistrain"]["mAP50-95(B)"], a["vistrain"]["mAP50-95(M)"], f.name)
    for f in args.vistrain:
        d = load(f)
        got = {k: d["settings"].get(k) for k in ("epochs", "nbs", "imgsz", "batch")}
        if got != {k: want[k] for k in got}:
            raise SystemExit(f"{f.name}: settings {got} differ from {args.current.name}'s")
        for r in d["runs"]:
            if not r.get("mosaic_buffer", False):  # files without the key were run with --no-buffer
                put(vis, r["seed"], r["mAP50-95(B)"], r["mAP50-95(M)"], f.name)

    seeds = sorted(set(vis) & set(ult))
    print(f"{'seed':>4}  {'box vistrain':>12} {'ultralytics':>11}  {'mask vistrain':>13} {'ultralytics':>11}  vistrain from")
    for s in seeds:
        print(f"{s:>4}  {vis[s]['B']:>12.4f} {ult[s]['B']:>11.4f}  {vis[s]['M']:>13.4f} {ult[s]['M']:>11.4f}  "
              f"{vis[s]['from']}")
    rnd = random.Random(0)
    for x, kind in (("B", "box"), ("M", "mask")):
        v, u = [vis[s][x] for s in seeds], [ult[s][x] for s in seeds]
        st = paired(v, u, rnd)
        print(f"{kind:<4} mAP50-95: vistrain {sum(v) / len(v):.4f}, ultralytics {sum(u) / len(u):.4f}; paired "
              f"{st['diff']:+.4f}, standard error {st['se']:.4f}, sign-flip p {st['sign_flip_p']:.2f}, vistrain lower "
              f"on {st['below']} of {st['seeds']} seeds")
    if args.early:
        early(current, args.early)
    return 0


def early(current: dict, epoch: int) -> None:
    """Each run's train box loss after ``epoch`` against its final box mAP50-95 (pycocotools, ``val``)."""
    rows = []  # (loss, seed, side, mAP)
    for r in current["runs"]:
        for side in ("vistrain", "ultralytics"):
            loss = r["train"][side]["curves"]["train/box_loss"]
            if len(loss) < epoch:
                raise SystemExit(f"--early {epoch}: seed {r['seed']} has {len(loss)} epochs")
            rows.append((loss[epoch - 1], r["seed"], side, r["accuracy"]["val"][side]["mAP50-95(B)"]))
    rows.sort()
    print(f"\ntrain box loss after epoch {epoch} (sorted) and final box mAP50-95, runs of {len(current['runs'])} seeds:")
    for loss, seed, side, m in rows:
        print(f"  {loss:.3f}  seed {seed:>2} {side:<11} {m:.4f}")
    r = statistics.correlation([row[0] for row in rows], [row[3] for row in rows])
    print(f"correlation of the epoch-{epoch} train box loss with the final box mAP50-95: {r:+.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
