"""Command-line handlers of the benchmarks: ``diffiml eval`` and ``diffiml bench table4``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date
from pathlib import Path

from diffiml.files import write_text_atomic
from diffiml.runtime.options import add_copy_move_option


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="pixel F1 (0.5), AUC, IoU and image AUC of a bundle on a dataset")
    p.add_argument("--bundle", default="engines/default")
    p.add_argument("--data", action="append", default=[], help="JSON list or Tp/Gt folder (repeatable)")
    p.add_argument("--protocol", choices=["mvss", "catnet"], default=None, help="the paper's test sets under --root")
    p.add_argument("--root", default=None, help="folder holding the protocol's test sets")
    p.add_argument("--name", action="append", default=None, help="a name per --data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--ensemble", default=None, metavar="N|auto[:N]")
    p.add_argument("--ensemble-tolerance", type=float, default=None)
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16"])
    p.add_argument("--tta", action="store_true")
    add_copy_move_option(p)
    p.add_argument("--backend", default="auto")
    p.add_argument("--baseline", default=None, metavar="CHECKPOINT",
                   help="score a discriminative-baseline checkpoint (Table 5) instead of the bundle")
    p.add_argument("--follow-decision", action="store_true",
                   help="score masks that follow the detector's decision (empty for images judged authentic)")
    p.add_argument("--rows", default=None, metavar="FILE",
                   help="also write every image's row (scores, decision, F1, the detector's evidence) as JSON lines; "
                        "what `diffiml fit-detector` reads")
    p.add_argument("--json", action="store_true")
    p.add_argument("--robustness", action="store_true", help="F1 under JPEG, blur and noise; plotted to --plot")
    p.add_argument("--plot", default="out/robustness.png", help="PNG for --robustness")
    p.set_defaults(handler=evaluate)

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    t = bench.add_parser("table4", help="the paper's Table 4: params, GMACs, FPS per backend")
    t.add_argument("--config", default="small")
    t.add_argument("--bundle", default=None, help="time this bundle (default: export random weights of --config)")
    t.add_argument("--backends", default="torch,torch-authors,torch-fp16,torch-bf16,torch-cudagraph,torch-compile,"
                                         "ort-cpu,ort-cuda,tensorrt")
    t.add_argument("--precisions", default="fp32", help="bundle precisions for the runtime rows, e.g. fp32,fp16")
    t.add_argument("--ensemble", default="1,5")
    t.add_argument("--steps", type=int, default=8)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--runs", type=int, default=20, help="timed runs per row (median reported)")
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--sizes-only", action="store_true")
    t.add_argument("--out", required=True)
    t.set_defaults(handler=table4)

    c = bench.add_parser("scaling", help="latency vs ensemble size and steps, throughput vs batch")
    c.add_argument("--bundle", default="engines/default")
    c.add_argument("--backend", default="auto")
    c.add_argument("--ensembles", default="1,2,5,10")
    c.add_argument("--steps", default="1,5,8,10")
    c.add_argument("--batches", default="1,4,16,64")
    c.add_argument("--runs", type=int, default=20)
    c.add_argument("--warmup", type=int, default=3)
    c.add_argument("--out", required=True)
    c.set_defaults(handler=scaling)

    u = bench.add_parser("unet-call", help="one UNet call: ours vs diffusers in torch, fused vs plain attention in ORT")
    u.add_argument("--config", default="paper")
    u.add_argument("--members", type=int, default=1)
    u.add_argument("--runs", type=int, default=10)
    u.add_argument("--warmup", type=int, default=2)
    u.add_argument("--attention", default="fused,standard", help="ONNX attention forms to time")
    u.add_argument("--out", required=True)
    u.set_defaults(handler=unet_call)

    v = bench.add_parser("curve", help="F1 against training steps: every snapshot of a run, exported and evaluated")
    v.add_argument("run", help="a training run folder (with snapshots/, from --snapshot-every)")
    v.add_argument("--data", action="append", default=[], required=True, help="JSON list or Tp/Gt folder")
    v.add_argument("--name", action="append", default=None, help="a name per --data")
    v.add_argument("--limit", type=int, default=None, help="the first LIMIT rows of each --data only")
    v.add_argument("--only", default=None, help="comma-separated steps to evaluate (default: all)")
    v.add_argument("--steps", type=int, default=None)
    v.add_argument("--ensemble", type=int, default=None)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", required=True)
    v.set_defaults(handler=curve)

    s = bench.add_parser("serve", help="load test of `diffiml serve`: dynamic batching on vs off, bad inputs mixed in")
    s.add_argument("--bundle", default="engines/default")
    s.add_argument("--clients", default="1,2,4,8,16,32", help="concurrency levels")
    s.add_argument("--duration", type=float, default=15.0, help="seconds each level keeps sending")
    s.add_argument("--max-requests", type=int, default=400, help="request budget per level")
    s.add_argument("--max-batch", type=int, default=8)
    s.add_argument("--max-queue-delay-ms", type=float, default=10.0)
    s.add_argument("--bad-every", type=int, default=5, help="every n-th request of a client is a bad input (0: none)")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--ensemble", type=int, default=None)
    s.add_argument("--sample", default="examples/sample_splice.png", help="the good request's image")
    s.add_argument("--server-logs", default=None, metavar="DIR", help="keep the servers' logs there")
    s.add_argument("--out", required=True)
    s.set_defaults(handler=serve_load)

    r = bench.add_parser("roofline", help="each graph's GMAC/s against this machine's measured fp32 peak")
    r.add_argument("--bundle", default="engines/default")
    r.add_argument("--members", type=int, default=None, help="UNet batch (default: the bundle's ensemble)")
    r.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--runs", type=int, default=5)
    r.add_argument("--out", required=True)
    r.set_defaults(handler=roofline)

    c = bench.add_parser("correlation", help="GMACs and ms of the self-correlation stage; encoder with vs without")
    c.add_argument("--config", default="mobile")
    c.add_argument("--sizes", default="256,512", help="comma-separated input sizes")
    c.add_argument("--runs", type=int, default=30)
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--out", required=True)
    c.set_defaults(handler=correlation)

    g = bench.add_parser("copy-signal", help="how visible a copied block is to self-correlation (AUC), untrained")
    g.add_argument("--checkpoint", default="models/default")
    g.add_argument("--data", required=True, help="a data list; its first --limit images host the copies")
    g.add_argument("--limit", type=int, default=40)
    g.add_argument("--block", type=int, default=48, help="side of the copied block at the 256² model input")
    g.add_argument("--out", required=True)
    g.set_defaults(handler=copy_signal)

    m = bench.add_parser("copy-move-cue", help="the classical copy-move cue alone over a grid of its settings")
    m.add_argument("--data", required=True, help="a data list (a synthetic split: never the evaluation images)")
    m.add_argument("--skip", type=int, default=0, help="leave out the list's first SKIP rows (an evaluation slice)")
    m.add_argument("--limit", type=int, default=180)
    m.add_argument("--grid", default="", metavar="NAME=V,V;NAME=V",
                   help="settings to try one at a time beside the defaults, e.g. 'ncc_threshold=0.85;min_inliers=4'")
    m.add_argument("--out", required=True)
    m.set_defaults(handler=copy_move_cue)

    d = bench.add_parser("modes", help="fewer steps, int8, adaptive ensemble: timed against the authors' order")
    d.add_argument("--config", default="paper")
    d.add_argument("--bundle", default=None, help="time this bundle (default: export random weights of --config)")
    d.add_argument("--modes", default="fp32:8:5,fp32:5:5,fp32:4:5,fp32:4:3,fp32:2:3,int8:8:5,int8:4:5,fp32:8:auto,"
                                      "fp32:4:auto",
                   help="PRECISION:K:N, comma-separated; a K the bundle has a distilled UNet for runs the student")
    d.add_argument("--image", default="examples/sample_splice.png")
    d.add_argument("--calibration", default=None, help="int8 on random weights: images to calibrate on (JSON/folder)")
    d.add_argument("--runs", type=int, default=3)
    d.add_argument("--warmup", type=int, default=1)
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--out", required=True)
    d.set_defaults(handler=modes)

    g = bench.add_parser("gpu-check", help="a device backend against ort-cpu fp32, every precision of a bundle")
    g.add_argument("--bundle", default="engines/default")
    g.add_argument("--backend", default="ort-cuda", help="the backend checked (ort-cpu stands in for a dry run)")
    g.add_argument("--image", action="append", default=["examples/sample_splice.png"])
    g.add_argument("--out", required=True, help="JSON file")
    g.set_defaults(handler=gpu_check)

    m = bench.add_parser("memory", help="peak resident memory of localizing one huge JPEG, in a fresh process")
    m.add_argument("--bundle", default="engines/default")
    m.add_argument("--size", type=int, default=20000, help="side of the square test JPEG in pixels")
    m.add_argument("--out", required=True)
    m.set_defaults(handler=memory)

    e = bench.add_parser("decode-memory", help="peak memory of decoding and localizing the issue's huge inputs")
    e.add_argument("--bundle", default="engines/default")
    e.add_argument("--work", required=True, help="a folder for the test files (kept: they take minutes to make)")
    e.add_argument("--cases", default="png8_25000,progressive_20000,rgba16_100mp,jpeg_big_header")
    e.add_argument("--out", required=True)
    e.set_defaults(handler=decode_memory)

    n = bench.add_parser("scan", help="images/s of localize's loop vs diffiml scan on a local Ray, 1..N actors")
    n.add_argument("--bundle", default="engines/default")
    n.add_argument("--images", default=None, help="a folder of images (default: N photos or example crops)")
    n.add_argument("--photos", default="../shared/data/photos", help="where the default images come from, if there")
    n.add_argument("--n", type=int, default=16, help="how many images the default set has")
    n.add_argument("--actors", default="1,2", help="actor counts to time (threads per actor: cores / actors)")
    n.add_argument("--steps", type=int, default=None)
    n.add_argument("--ensemble", type=int, default=None)
    n.add_argument("--seed", type=int, default=0)
    add_copy_move_option(n)
    n.add_argument("--rounds", type=int, default=3, help="rounds alternating the modes (median reported)")
    n.add_argument("--out", required=True)
    n.set_defaults(handler=scan_bench)

    c = bench.add_parser("cue-share", help="what the copy-move cue adds to a default localize call")
    c.add_argument("--bundle", default="engines/default")
    c.add_argument("--images", nargs="+", required=True, help="image files (or folders)")
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--out", required=True)
    c.set_defaults(handler=cue_share)

    k = bench.add_parser("matching", help="the cue's k-NN matching: exact brute force vs FLANN, time and recall")
    k.add_argument("--images", nargs="+", required=True, help="image files (or folders)")
    k.add_argument("--out", required=True)
    k.set_defaults(handler=matching)

    r = bench.add_parser("report", help="a report of many scan rows: written, then opened in headless Chromium")
    r.add_argument("--rows", type=int, default=100_000)
    r.add_argument("--work", required=True, help="a folder for the synthetic scan table and its report")
    r.add_argument("--out", required=True)
    r.set_defaults(handler=report_load)

    v = bench.add_parser("scan-driver", help="a rerun's skip pass over a million-row scan table: seconds and memory")
    v.add_argument("--rows", type=int, default=1_000_000)
    v.add_argument("--work", required=True, help="a folder for the synthetic inputs and table (reused if there)")
    v.add_argument("--out", required=True)
    v.set_defaults(handler=scan_driver)


def _check_names(names: list[str], data: list[str]) -> None:
    if len(names) != len(data):
        raise ValueError("give one --name per --data")


def evaluate(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.evaluate import evaluate as run
    from diffiml.runtime.localizer import Localizer
    from diffiml.train.data.readers import read_dataset

    if args.baseline:
        from diffiml.benchmarks.baseline import BaselinePredictor

        localizer = BaselinePredictor(args.baseline)
    else:
        from diffiml.runtime.options import adaptive_policy

        localizer = Localizer.open(args.bundle, backend=args.backend, steps=args.steps, ensemble=args.ensemble,
                                   tta=args.tta, seed=args.seed, adaptive=adaptive_policy(args),
                                   precision=args.precision, copy_move=args.copy_move,
                                   follow_decision=args.follow_decision)
    names = args.name or [Path(d).stem for d in args.data]
    if args.protocol:
        from diffiml.benchmarks.protocols import locate

        if not args.root:
            raise ValueError("--protocol needs --root, the folder holding its test sets")
        found, missing = locate(args.protocol, args.root)
        if missing:
            print(f"diffiml eval: {args.protocol}: not found under {args.root}, skipped: {', '.join(missing)}",
                  file=sys.stderr)
        names, args.data = [n for n, _ in found] + names, [str(p) for _, p in found] + args.data
    if not args.data:
        raise ValueError("nothing to evaluate: give --data or --protocol with --root")
    _check_names(names, args.data)
    if args.robustness:
        from diffiml.benchmarks.robustness import plot, robustness

        result = {n: robustness(localizer, read_dataset(d), n) for d, n in zip(args.data, names, strict=True)}
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(next(iter(result.values())), Path(args.plot), f"robustness: {names[0]}")
        print(json.dumps({"robustness": result, "plot": args.plot}))
        return 0
    reports, all_rows = [], []
    for d, n in zip(args.data, names, strict=True):
        report, rows = run(localizer, read_dataset(d), n)
        reports.append(report)
        all_rows += [{**row, "dataset": n} for row in rows]
    if args.rows:
        write_text_atomic(Path(args.rows), "".join(json.dumps(row) + "\n" for row in all_rows))
    f1 = sum(r["f1"] for r in reports) / len(reports)
    if args.json:
        print(json.dumps({"f1": f1, "datasets": reports}))
        return 0
    print("| dataset | n | manipulated | F1 (0.5) | F1 incl. authentic | pixel AUC | IoU | image AUC | "
          "balanced acc. | detected | authentic marked | marked area on authentic | F1 of all-manipulated mask |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for report in reports:
        for r in (report, *({**g, "name": f"{report['name']} / {g['name']}"} for g in report.get("groups", []))):
            print(f"| {r['name']} | {r['n']} | {r['n_manipulated']} | {r['f1']:.4f} | {r['f1_with_authentic']:.4f} | "
                  f"{r['auc']:.4f} | {r['iou']:.4f} | {r['image_auc']:.4f} | {r['balanced_accuracy']:.4f} | "
                  f"{r['detection_rate']:.4f} | {r['authentic_marked_share']:.4f} | "
                  f"{r['authentic_marked_area']:.4f} | {r['f1_all_manipulated_mask']:.4f} |")
    return 0


def table4(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.table4 import bench_table4, to_markdown

    rows = bench_table4(args.config, args.bundle, [b.strip() for b in args.backends.split(",")],
                        [int(n) for n in args.ensemble.split(",")], args.steps, args.batch, args.sizes_only,
                        args.runs, args.warmup, args.threads, tuple(args.precisions.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    note = (f"Measured {date.today().isoformat()}; config {args.config}; {args.runs} timed runs after {args.warmup} "
            "warm-ups; FPS = batch / median latency. GMACs follow the paper (one UNet call per member); "
            "'executed' counts all K steps.")
    md = to_markdown(rows, note)
    write_text_atomic(out / "table4.json", json.dumps(rows, indent=2))
    write_text_atomic(out / "table4.md", md)
    print(md)
    return 0


def scaling(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.scaling import bench_scaling, plot, to_markdown

    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    result = bench_scaling(args.bundle, args.backend, ints(args.ensembles), ints(args.steps), ints(args.batches),
                           args.runs, args.warmup)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "scaling.json", json.dumps(result, indent=2))
    md = to_markdown(result)
    write_text_atomic(out / "scaling.md", md)
    plot(result, out / "scaling.png")
    print(md)
    return 0


def _rows_table(rows: list[dict], keys: tuple[str, ...]) -> str:
    """Rows as a markdown table of ``keys``."""
    return "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n" + "".join(
        "| " + " | ".join(str(r[k]) for k in keys) + " |\n" for r in rows)


def _measured(detail: str = "") -> str:
    """The head of a benchmark's note: the date, the command as typed, this machine's cores (and ``detail``)."""
    command = " ".join(sys.argv[1:])
    return f"Measured {date.today().isoformat()}: `diffiml {command}` ({os.cpu_count()} CPU cores{detail})"


def _one_row(row: dict, keys: tuple[str, ...], note: str) -> str:
    """A one-row result as a markdown table of ``keys``, then its note."""
    return _rows_table([row], keys) + "\n" + note + "\n"


def _report(out_dir: str, stem: str, rows: object, md: str) -> None:
    """A benchmark's result as OUT/STEM.json and OUT/STEM.md (written atomically), and the table on stdout."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{stem}.json", json.dumps(rows, indent=2))
    write_text_atomic(out / f"{stem}.md", md)
    print(md)


def unet_call(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.unet_call import bench_unet_call, to_markdown

    rows = bench_unet_call(args.config, args.members, args.runs, args.warmup, tuple(args.attention.split(",")))
    _report(args.out, "unet_call", rows, to_markdown(rows) + (
        f"\nMeasured {date.today().isoformat()}; config {args.config}; {args.runs} timed runs after {args.warmup} "
        "warm-ups; random weights.\n"))
    return 0


def curve(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.curve import bench_curve, to_markdown
    from diffiml.train.data.readers import read_dataset

    names = args.name or [Path(d).stem for d in args.data]
    _check_names(names, args.data)
    data = [(n, read_dataset(d)[: args.limit]) for n, d in zip(names, args.data, strict=True)]
    only = [int(s) for s in args.only.split(",")] if args.only else None
    rows = bench_curve(args.run, data, args.steps, args.ensemble, args.seed, only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(rows) + (f"\nMeasured {date.today().isoformat()} with `diffiml bench curve` (N and K from the "
                              f"manifest unless given, seed {args.seed}, ort-cpu); per-image F1 at 0.5 averaged over "
                              "manipulated images.\n")
    write_text_atomic(out / "curve.json", json.dumps(rows, indent=2))
    write_text_atomic(out / "curve.md", md)
    print(md)
    return 0


def memory(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.memory import peak_memory_of_localization

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = peak_memory_of_localization(args.bundle, args.size, out)
    write_text_atomic(out / "memory.json", json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


def decode_memory(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.memory import peak_memory_of_decoding

    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows = peak_memory_of_decoding(args.bundle, args.work, args.cases.split(","))
    md = _rows_table(rows, ("case", "file_mib", "load_image_peak_mib", "localize_peak_mib"))
    _report(args.out, "decode_memory", rows, md + (
        f"\nMeasured {date.today().isoformat()}: `diffiml {' '.join(sys.argv[1:])}`. Peak resident memory (VmHWM) of a "
        "fresh process: load_image at the model's size; localize: decode, the whole call, the full-size mask and the "
        "overlay image.\n"))
    return 0


def serve_load(args: argparse.Namespace) -> int:
    import os

    from diffiml.benchmarks import serve_load as load

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parameters = {k: v for k, v in (("steps", args.steps), ("ensemble", args.ensemble)) if v is not None}
    levels = [int(c) for c in args.clients.split(",")]
    rows = load.run(args.bundle, levels, args.duration, args.max_requests, args.max_batch, args.max_queue_delay_ms,
                    args.bad_every, parameters, Path(args.sample),
                    log_dir=Path(args.server_logs) if args.server_logs else None)
    meta = {"date": str(date.today()), "bundle": args.bundle, "cpus": os.cpu_count(), "parameters": parameters,
            "duration_s": args.duration, "max_batch": args.max_batch, "max_queue_delay_ms": args.max_queue_delay_ms,
            "bad_every": args.bad_every, "command": " ".join(["diffiml", *sys.argv[1:]])}
    write_text_atomic(out / "serve.json", json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = load.markdown(rows)
    write_text_atomic(out / "serve.md", table)
    print(table)
    lost = sum(r["good_lost"] for r in rows) + sum(r["bad_accepted"] for r in rows)
    return 1 if lost else 0


def copy_signal(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.copy_signal import copy_signal as run
    from diffiml.benchmarks.copy_signal import to_markdown
    from diffiml.train.data.readers import load_pair, read_dataset

    images = [load_pair(s)[0] for s in read_dataset(args.data)[: args.limit]]
    rows = run(args.checkpoint, images, block=args.block)
    _report(args.out, "copy_signal", rows, to_markdown(rows) + (
        f"\nMeasured {date.today().isoformat()}: `diffiml {' '.join(sys.argv[1:])}` ({len(images)} host images, one "
        "copied block each).\n"))
    return 0


def copy_move_cue(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.copy_move_cue import cue_grid, parse_settings, to_markdown
    from diffiml.train.data.readers import read_dataset

    samples = read_dataset(args.data)[args.skip : args.skip + args.limit]
    rows = cue_grid(samples, parse_settings(args.grid))
    _report(args.out, "copy_move_cue", rows, to_markdown(rows) + (
        f"\nMeasured {date.today().isoformat()}: `diffiml {' '.join(sys.argv[1:])}` ({len(samples)} images; F1 of "
        "the cue's own mask per manipulated image; 'fires': share of images where it marks anything).\n"))
    return 0


def correlation(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.correlation_cost import bench_correlation, to_markdown

    rows = bench_correlation(args.config, tuple(int(s) for s in args.sizes.split(",")), args.runs,
                             threads=args.threads)
    _report(args.out, "correlation", rows, to_markdown(rows) + (
        f"\nMeasured {date.today().isoformat()}: `diffiml {' '.join(sys.argv[1:])}` (medians of alternating runs, "
        "onnxruntime CPU, one image).\n"))
    return 0


def roofline(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.roofline import markdown
    from diffiml.benchmarks.roofline import roofline as run

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args.bundle, args.members, args.threads, args.runs, args.precision)
    result["command"] = " ".join(["diffiml", *sys.argv[1:]])
    result["date"] = str(date.today())
    write_text_atomic(out / "roofline.json", json.dumps(result, indent=2))
    write_text_atomic(out / "roofline.md", markdown(result))
    print(markdown(result))
    return 0


def modes(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.modes import bench_modes, to_markdown

    calibration = None
    if args.calibration:
        from diffiml.train.data.readers import read_dataset

        calibration = [s.image for s in read_dataset(args.calibration)][:8]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = bench_modes(args.config, args.modes.split(","), Path(args.image), args.runs, args.warmup, args.threads,
                       calibration, args.bundle)
    meta = {"date": str(date.today()), "command": " ".join(["diffiml", *sys.argv[1:]])}
    write_text_atomic(out / "modes.json", json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_text_atomic(out / "modes.md", to_markdown(rows))
    print(to_markdown(rows))
    return 0


def gpu_check(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.gpu_check import compare, environment, sample_images

    report = {"environment": environment(),
              "check": compare(args.bundle, args.backend, sample_images([Path(p) for p in args.image]))}
    report["date"] = str(date.today())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out), json.dumps(report, indent=2))
    print(json.dumps(report["check"]))
    failed = [p for p, r in report["check"].items() if isinstance(r, dict) and r.get("passed") is False]
    return 1 if failed else 0


def scan_bench(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from diffiml.benchmarks.scan_bench import bench_scan, sample_images, to_markdown
    from diffiml.runtime.options import expand_inputs

    work = Path(tempfile.mkdtemp(prefix="scan-bench-"))
    try:
        images = expand_inputs([args.images]) if args.images else sample_images(
            work / "images", args.n, Path(args.photos), Path(__file__).resolve().parents[1] / "examples")
        rows = bench_scan(args.bundle, images, work, [int(a) for a in args.actors.split(",")], args.steps,
                          args.ensemble, args.seed, args.copy_move, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(args.out, "scan", rows, to_markdown(rows, (
        f"Measured {date.today().isoformat()}: `diffiml {' '.join(sys.argv[1:])}` ({len(images)} images, "
        f"{os.cpu_count()} CPU cores (the 1-minute load average of each run is in the table: about the bench's own "
        f"threads when nothing else runs), ort-cpu). "
        "Steady ms/image: (last image done - first image done) / (n - 1), the median over rounds that alternate the "
        "modes; overhead: scan's steady ms/image minus localize's (as shipped: onnxruntime threads spinning), and "
        "that in % of localize's; overhead_vs_same_threads_pct: against localize with its threads not spinning, as "
        "scan's actors run (Ray's own cost apart from that setting); cpu_ms_per_image: CPU "
        "time of the mode's process tree (driver, raylet, tasks, actors) per image after its first image (scan: "
        "batch); first_image_s includes opening the bundle (and, for scan, starting the pipeline and its actors; "
        "Ray's own start is ray_init_s in the JSON).")))
    return 0


def scan_driver(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.scan_driver import SHOWN, bench_scan_driver

    row = bench_scan_driver(Path(args.work), args.rows)
    _report(args.out, "scan_driver", row, _one_row(row, SHOWN, (
        _measured() + ". "
        "skip_pass_s: reading the input list, the table's key columns (done_index) and a stat per input joined with "
        "them (plan_work), in a fresh process whose peak resident memory (Python and pyarrow included) is "
        "peak_rss_mib; compact_s: folding the table's parts into one, as a run ends.")))
    return 0


def matching(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.matching import bench_matching
    from diffiml.runtime.options import expand_inputs

    rows = bench_matching(expand_inputs(args.images))
    _report(args.out, "matching", rows, _rows_table(rows, tuple(rows[0])) + (
        "\n" + _measured() + ". The "
        "cue's SIFT descriptors at its working size, each image matched with itself (k = neighbours + 1); recall: "
        "the share of the exact top 3 the approximate search finds; rows_same_in_two_runs: rows whose top 3 two "
        "fresh FLANN indexes agree on.\n"))
    return 0


def report_load(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.report_load import bench_report

    row = bench_report(Path(args.work), args.rows)
    _report(args.out, "report_load", row, _one_row(row, tuple(row), (
        _measured() + ". "
        "write_s: `diffiml report`'s writer on a synthetic scan table (2 % failed, no maps), in a fresh process "
        "whose peak resident memory (VmHWM) is writer_peak_rss_mib; first_screen_ms: from navigation to the first "
        "100 rows drawn in headless Chromium, median of 3 fresh tabs; last_page_ms: turning to the last page "
        "(another row file).")))
    return 0


def cue_share(args: argparse.Namespace) -> int:
    from diffiml.benchmarks.cue_share import bench_cue_share
    from diffiml.runtime.options import expand_inputs

    images = expand_inputs(args.images)
    row = bench_cue_share(args.bundle, images, args.rounds)
    _report(args.out, "cue_share", row, _one_row(row, tuple(row), (
        _measured(", ort-cpu, the bundle's default steps and ensemble")
        + ". with/without_cue_ms: wall time per image of Localizer.localize on decoded images, median over "
        "alternating rounds; cue_share_pct: the difference as a share of the "
        "call with the cue; cue_own_ms: the cue's own time per image (median), most of it beside the graphs.")))
    return 0
