"""Bytes on the wire per site and round, relative to the fp32 model, and what compression costs in AUC.

``--delivery full,once`` runs each method with the model in every message (``full``: what Flower's
strategies send) and with shared.model_cache's ``DeliverOnce`` (``once``: what the deployed
ServerApp does; arrays a site already holds are left out and restored at the site from its
``context.state``), side by side on the same federation and seeds.

Every message the coordinator sends and every reply it gets is serialised as Flower does
(``recorddict_to_proto(content).ByteSize()``: the protobuf a SuperLink stores and ships),
before the server decodes a compressed reply. Reported per site and round, over the rounds
1..R (round 0's evaluation and the final test evaluation left out), against the fp32 size of
the model's arrays: train download, train upload (the update), evaluation download, and the
run config (the job YAML in every message's ConfigRecord). Each ``federation.compression``
runs on the same federation and seeds, side by side; its figure is the federation's pooled
test AUC.

The sites run the real ClientApp through the in-process grid (tests.inprocess_grid), so no
Ray start-up is paid per run; the messages are the ones a deployment sends.

    python bench/bench_wire.py [--mixes 1] [--seeds 2] [--methods none,fp16,int8] [--delivery full,once] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flwr.common.serde import recorddict_to_proto  # noqa: E402

from client.trainer import build_screener  # noqa: E402
from server.federation import run_federation  # noqa: E402
from shared.config import compose  # noqa: E402
from shared.messages import CONFIG, JOB_KEY, SPLIT_KEY  # noqa: E402
from shared.model_cache import DeliverOnce  # noqa: E402
from simulation.synth import write_federation  # noqa: E402
from tests.inprocess_grid import InProcessGrid  # noqa: E402

RESULTS = ROOT / "bench" / "results"


class CountingGrid(InProcessGrid):
    """The in-process grid, counting the serialised bytes of each message per (round, phase, direction)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bytes: list[dict] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:  # before delivery: in process, a site's mods change the message object itself
            cfg = msg.content.config_records.get(CONFIG)
            self.bytes.append({"round": int(cfg["server-round"]) if cfg else -1, "phase": msg.metadata.message_type,
                               "split": str(cfg.get(SPLIT_KEY, "")) if cfg else "", "dir": "down", "bytes": recorddict_to_proto(msg.content).ByteSize(),
                               "job_yaml": len(str(cfg[JOB_KEY]).encode()) if cfg and JOB_KEY in cfg else 0})
        sent = self.bytes[-len(messages):]
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for row, msg, reply in zip(sent, messages, replies):
            if not reply.has_error():
                self.bytes.append({"round": row["round"], "split": row["split"], "phase": msg.metadata.message_type, "dir": "up",
                                   "bytes": recorddict_to_proto(reply.content).ByteSize(), "job_yaml": 0})
        return replies


def fp32_model_bytes(cfg) -> int:
    return sum(4 * v.numel() for v in build_screener(cfg).state_dict().values())


def one_run(base: list[str], method: str, run_dir: Path, delivery: str = "full") -> dict:
    cfg = compose(base + [f"federation.compression={method}", f"run_dir={run_dir}"])
    grid = CountingGrid({100 + i: {"partition-id": i} for i in range(cfg.num_sites)})
    if delivery == "once":  # as server/app.py does in deployment; the counting grid sees what goes on the wire
        grid.send_and_receive = DeliverOnce(grid.send_and_receive)  # type: ignore[method-assign]
    t0 = time.perf_counter()
    run_federation(grid, cfg, run_dir)
    seconds = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in rows if r["phase"] == "evaluate" and r["split"] == "test" and r["site"] == "global"][-1]
    model = fp32_model_bytes(cfg)
    rounds = range(1, cfg.rounds + 1)
    per = {}
    for phase, direction in (("train", "down"), ("train", "up"), ("evaluate", "down"), ("evaluate", "up")):
        sizes = [b["bytes"] for b in grid.bytes if b["phase"] == phase and b["dir"] == direction and b["round"] in rounds
                 and b["split"] != "test"]
        # per site and round: every message of the phase (a resent one included), the final test evaluation left out
        per[f"{phase}_{direction}"] = sum(sizes) / (cfg.num_sites * cfg.rounds)
    job = [b["job_yaml"] for b in grid.bytes if b["dir"] == "down"]
    ratios = {k: v / model for k, v in per.items()}
    sent = ratios["train_up"] + ratios["evaluate_up"]
    received = ratios["train_down"] + ratios["evaluate_down"]
    return {"method": method, "delivery": delivery, "auc": test["auc"], "seconds": seconds, "fp32_model_bytes": model,
            "bytes_per_message": per, "ratio_per_message": ratios, "site_sends_per_round": sent,
            "site_receives_per_round": received, "job_yaml_bytes": statistics.mean(job) if job else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixes", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--methods", default="none,fp16,int8")
    ap.add_argument("--delivery", default="full,once", help="full: the model in every message; once: DeliverOnce")
    ap.add_argument("--out", default="runs/bench-wire")
    ap.add_argument("--json", default="wire.json", help="file name under bench/results/")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # a line per configure/aggregate call otherwise
    out = Path(args.out).resolve()
    base_overrides = ["num_sites=3", "model=mmcl", "rounds=4", "federation.local_epochs=1",
                      "synth.patients_per_site=[80,70,60]", *args.overrides]
    cells = [(m, d) for d in args.delivery.split(",") for m in args.methods.split(",")]
    results = []
    for mix in range(args.mixes):
        root = out / f"mix{mix}"
        if not root.exists():
            write_federation(compose(base_overrides + [f"data_root={root}", f"seed={100 + mix}"]))
        for seed in range(args.seeds):
            base = base_overrides + [f"data_root={root}", f"seed={seed}"]
            for method, delivery in cells:
                r = one_run(base, method, out / "runs" / f"{method}-{delivery}-mix{mix}-seed{seed}", delivery)
                results.append({"mix": mix, "seed": seed, **r})
                print(f"mix{mix} seed{seed} {method} {delivery}: test AUC {r['auc']:.3f}, update "
                      f"{r['ratio_per_message']['train_up']:.3f}, receives {r['site_receives_per_round']:.3f} "
                      f"x fp32 model ({r['seconds']:.0f} s)", flush=True)
    model = results[0]["fp32_model_bytes"]
    print(f"\nfp32 model {model / 1e6:.2f} MB; job YAML {results[0]['job_yaml_bytes'] / 1e3:.1f} kB in every message "
          f"({results[0]['job_yaml_bytes'] / model:.3f} x model)")
    print("| compression | delivery | train download | update (upload) | eval download | site sends / round "
          "| site receives / round | pooled test AUC mean | sd | AUC - none (paired) | runs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary = []
    for method, delivery in cells:
        rs = [r for r in results if r["method"] == method and r["delivery"] == delivery]
        aucs = [r["auc"] for r in rs]
        row = {k: statistics.mean(r["ratio_per_message"][k] for r in rs) for k in rs[0]["ratio_per_message"]}
        sends = statistics.mean(r["site_sends_per_round"] for r in rs)
        receives = statistics.mean(r["site_receives_per_round"] for r in rs)
        sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        # the AUC cost, paired: each run minus the uncompressed run of the same mix, seed and delivery
        plain = {(r["mix"], r["seed"]): r["auc"] for r in results if r["method"] == "none" and r["delivery"] == delivery}
        diffs = [r["auc"] - plain[(r["mix"], r["seed"])] for r in rs if (r["mix"], r["seed"]) in plain]
        cost = (statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0) if diffs else (float("nan"), 0.0)
        print(f"| {method} | {delivery} | {row['train_down']:.3f} | {row['train_up']:.3f} | {row['evaluate_down']:.3f} | "
              f"{sends:.3f} | {receives:.3f} | {statistics.mean(aucs):.3f} | {sd:.3f} | {cost[0]:+.3f} ± {cost[1]:.3f} | "
              f"{len(aucs)} |")
        summary.append({"method": method, "delivery": delivery, **row, "site_sends_per_round": sends,
                        "site_receives_per_round": receives, "auc_mean": statistics.mean(aucs), "auc_sd": sd,
                        "auc_minus_none_mean": cost[0], "auc_minus_none_sd": cost[1], "n": len(aucs)})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.json).write_text(json.dumps({"config": base_overrides, "fp32_model_bytes": model,
                                                 "summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
