"""``sida``: the one console script. Configs are validated here, once; errors print as one line.

Subcommands: ``demo``, ``train`` (Ray), ``sweep`` (Ray Tune), ``pipeline`` (staged Tune experiments), ``report``,
``leaderboard``, ``evaluate``, ``export`` / ``generate`` (a run's one-step generator as weights or images),
``distill`` (one process), ``teacher train``, ``teacher sample``, ``validate``,
``submit`` / ``jobs status|logs|stop`` (Ray Jobs API), ``cluster validate`` (cluster-launcher YAMLs), ``fid-stats``
(reference statistics), ``dataset prepare|stage`` (sharded datasets in storage).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn, Optional, Sequence


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is meant for the user (shown as one line, exit code 2)."""
    from schemas.loader import ConfigError
    from sida_core.checkpoint import CheckpointError
    from sida_core.data import DataError
    from sida_core.distill import NonFiniteError
    from sida_core.export import ExportError
    from sida_core.importer import ImportError_
    from pipelines.pipeline import PipelineError
    from pipelines.train import TrainingError
    from ray_jobs.jobs import JobError
    from store.reference import ReferenceStatsError
    from store.lease import LeaseError
    from store.storage import StorageError, StorageURIError, StoredFileError
    from sida_core.metrics.inception import InceptionWeightsError
    from sida_core.metrics.reference import ReferenceMismatch
    from sida_core.vae import VAEError

    return (ConfigError, CheckpointError, DataError, NonFiniteError, FileNotFoundError, StorageError, TrainingError,
            JobError, ReferenceStatsError, InceptionWeightsError, ReferenceMismatch, PipelineError, ImportError_,
            ExportError, VAEError, LeaseError, StorageURIError, StoredFileError)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set loss.alpha=1.2 (repeatable)")


def cmd_validate(args) -> int:
    from schemas.loader import load_run_config

    from pipelines.checks import check_teacher_network

    cfg = load_run_config(args.config, args.overrides)
    check_teacher_network(cfg)
    print(json.dumps({"valid": True, "name": cfg.name, "method": cfg.method, "rounds": cfg.rounds,
                      "total_batch": cfg.batch.total}))
    return 0


def cmd_distill(args) -> int:
    from schemas.loader import load_run_config
    from pipelines.distill import run_distill, run_store_of

    cfg = load_run_config(args.config, args.overrides)
    store = run_store_of(cfg, args.run_dir)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731 (stdout: the one JSON line)
    out = run_distill(cfg, store, resume=not args.no_resume, progress=not args.quiet, log=log, score=args.score,
                      steal_lease=args.steal_lease)
    print(json.dumps({"run_dir": out["run_dir"], "checkpoint": out["checkpoint"], "kimg": out["kimg"],
                      "seconds": round(out["seconds"], 1)}))
    return 0


def cmd_train(args) -> int:
    from pipelines.train import run_train

    out = run_train(args.config, args.overrides, workers=args.workers, resume=args.resume, name=args.name,
                    address=args.address, endpoint_url=args.endpoint_url, steal_lease=args.steal_lease)
    print(json.dumps(out))
    return 0 if out["status"] == "finished" else 1


def cmd_sweep(args) -> int:
    from pipelines.sweep import run_sweep

    out = run_sweep(args.file, args.overrides, address=args.address)
    print(json.dumps(out))
    return 0


def cmd_pipeline(args) -> int:
    from pipelines.pipeline import run_pipeline

    out = run_pipeline(args.file, args.overrides, stop_after=args.stop_after, address=args.address)
    print(json.dumps(out))
    return 0


def cmd_report(args) -> int:
    from pipelines.report import run_report

    out = run_report(args.uri, args.out, endpoint_url=args.endpoint_url, upload=not args.no_upload)
    print(json.dumps(out))
    return 0


def cmd_leaderboard(args) -> int:
    from pipelines.leaderboard import collect_rows, plot_curves, print_table, rank, watch

    if args.serve:
        from pipelines.web import serve

        serve(args.uri, endpoint_url=args.endpoint_url, host=args.host, port=args.port, refresh_s=args.refresh)
        return 0
    if args.watch is not None:
        from schemas.loader import ConfigError

        if args.json or args.plot:
            raise ConfigError("--watch draws the table; it does not combine with --json or --plot")
        watch(args.uri, endpoint_url=args.endpoint_url, metric=args.metric, by=args.by, top=args.top,
              interval=args.watch)
        return 0
    if args.compact:
        from pipelines.leaderboard import compact

        compact(args.uri, args.endpoint_url)
    rows = collect_rows(args.uri, args.endpoint_url, args.metric)
    ranked = rank(rows, by=args.by, top=args.top)
    if args.plot:
        plot_curves(rows, Path(args.plot), title=f"{args.uri}")
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(ranked))
    else:
        print_table(ranked, title=f"{args.uri} — {len(ranked)} row(s), by {args.by}, lower is better")
    return 0


def cmd_evaluate(args) -> int:
    from pipelines.leaderboard import run_evaluate

    if not args.best and not args.checkpoint:
        from schemas.loader import ConfigError

        raise ConfigError("say which checkpoint: --best (the lowest live score) or --checkpoint NAME")
    out = run_evaluate(args.run_uri, checkpoint=args.checkpoint, repeats=args.repeats, num_images=args.num_images,
                       endpoint_url=args.endpoint_url, protocol_check=args.protocol_check,
                       teacher_steps=args.teacher_steps, scorers=args.scorers, address=args.address)
    print(f"{out['metric']} of {out['checkpoint']} ({out['kimg']:.1f} kimg, {out['num_images']} images, "
          f"{out['repeats']} seeds): {out['mean']:.4f} ± {out['std']:.4f}", file=sys.stderr)
    teacher = out.get("teacher")
    if teacher is None:
        for name, m in out["metrics"].items():
            if name != out["metric"]:
                print(f"  {name}: {m['mean']:.4f} ± {m['std']:.4f} ({m['repeats']} seeds)", file=sys.stderr)
    else:  # one line per metric: the generator's mean ± std beside the teacher's one value
        print(f"protocol check: generator (1 NFE, {out['repeats']} seeds) vs teacher (Heun {teacher['steps']} steps = "
              f"{teacher['nfe']} NFE, one seed set: {teacher['seed']}), {teacher['num_images']} images each",
              file=sys.stderr)
        width = max(len(n) for n in out["metrics"])
        for name, m in out["metrics"].items():
            t = teacher["metrics"].get(name)
            print(f"  {name:<{width}}  generator {m['mean']:.4f} ± {m['std']:.4f}   teacher "
                  f"{'—' if t is None else f'{t:.4f}'}", file=sys.stderr)
    print(json.dumps(out))
    return 0


def cmd_export(args) -> int:
    from pipelines.export import run_export

    out = run_export(args.run_uri, args.out, checkpoint=args.checkpoint, key=args.key, fmt=args.format,
                     endpoint_url=args.endpoint_url)
    print(f"exported {out['checkpoint']} ({out['kimg']:.1f} kimg, {out['parameters']:,} parameters) to {out['out']} "
          f"+ {out['metadata']}", file=sys.stderr)
    print(json.dumps(out))
    return 0


def cmd_generate(args) -> int:
    from pipelines.export import run_generate

    print(json.dumps(run_generate(args.run_uri, args.out, num=args.num, seeds=args.seeds, checkpoint=args.checkpoint,
                                  batch=args.batch, class_labels=args.class_labels, device=args.device,
                                  endpoint_url=args.endpoint_url, vae=args.vae, progress=not args.quiet)))
    return 0


def cmd_teacher_train(args) -> int:
    from schemas.loader import load_run_config
    from ray_jobs.datasets import load_run_dataset, run_teacher
    from sida_core.training_loop import resolve_device
    from tqdm.auto import tqdm

    cfg = load_run_config(args.config, args.overrides)
    train_set, _ = load_run_dataset(cfg, log=lambda m: print(m, file=sys.stderr))
    _, path = run_teacher(cfg, train_set, resolve_device(cfg.device), log=lambda m: print(m, file=sys.stderr),
                          progress_factory=lambda total, desc: tqdm(total=total, desc=desc, unit="img", unit_scale=True))
    print(json.dumps({"teacher": str(path)}))
    return 0


def cmd_teacher_import(args) -> int:
    from pipelines.teacher_import import run_teacher_import

    out = run_teacher_import(args.src, args.out, key=args.key, config=args.config, overrides=args.overrides,
                             endpoint_url=args.endpoint_url)
    print(f"imported {args.src}: {out['class_name'] or out['format']} -> {out['arch']}/{out['precond']} "
          f"{out['img_resolution']}x{out['img_resolution']}x{out['img_channels']}, "
          f"{out['label_dim'] or 'no'} classes, {out['num_params']:,} parameters -> {out['out']}", file=sys.stderr)
    print(json.dumps(out))
    return 0


def cmd_teacher_sample(args) -> int:
    import torch

    from sida_core.sampling import save_grid
    from sida_core.edm import heun_nfe
    from sida_core.teacher import heun_sample
    from sida_core.training_loop import load_network
    from schemas.loader import ConfigError

    if Path(args.out).suffix.lower() != ".png":
        raise ConfigError(f"--out: expected a .png file name, got {args.out!r}")
    net, manifest = load_network(args.checkpoint, args.key)
    net.eval()
    spec = manifest["network"]
    shape = (args.num, spec["img_channels"], spec["img_resolution"], spec["img_resolution"])
    z = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    x = heun_sample(net, z, num_steps=args.steps)
    save_grid(x, args.out)
    print(json.dumps({"out": str(args.out), "nfe": heun_nfe(args.steps)}))
    return 0


def cmd_demo(args) -> int:
    from pipelines.demo import run_demo

    result = run_demo(args.config, args.overrides, out_dir=Path(args.out))
    print(json.dumps(result))
    return 0


def cmd_submit(args) -> int:
    from pipelines.jobs import submit_job

    print(json.dumps(submit_job(args.job, args.address, allow_autoscale=args.allow_autoscale)))
    return 0


def cmd_jobs_status(args) -> int:
    from ray_jobs import jobs

    print(json.dumps(jobs.info(jobs.client(args.address), args.job_id)))
    return 0


def cmd_jobs_logs(args) -> int:
    from ray_jobs import jobs

    c = jobs.client(args.address)
    if not args.follow:
        sys.stdout.write(jobs.logs(c, args.job_id))
        return 0
    final = jobs.follow(c, args.job_id)
    print(f"job {args.job_id}: {final}", file=sys.stderr)
    return 0 if final == "SUCCEEDED" else 1


def cmd_jobs_stop(args) -> int:
    from ray_jobs import jobs

    c = jobs.client(args.address)
    was_running = jobs.stop(c, args.job_id)
    final = jobs.wait(c, args.job_id, timeout_s=args.timeout) if args.timeout > 0 else jobs.status(c, args.job_id)
    print(json.dumps({"job_id": args.job_id, "stop_requested": was_running, "status": final}))
    return 0 if final in jobs.TERMINAL or args.timeout <= 0 else 1


def cmd_cluster_validate(args) -> int:
    from ray_jobs.cluster_config import validate_cluster_file

    for path in args.files:
        print(json.dumps(validate_cluster_file(path)))
    return 0


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="the cluster's Jobs API (dashboard), e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)")


def cmd_reference_import(args) -> int:
    from pipelines.fid_stats import run_reference_import

    print(json.dumps(run_reference_import(args.src, args.out, resolution=args.resolution, protocol=args.protocol,
                                          key=args.key, dinov2=args.dinov2, endpoint_url=args.endpoint_url)))
    return 0


def cmd_fid_stats(args) -> int:
    from pipelines.fid_stats import run_fid_stats

    print(json.dumps(run_fid_stats(args.dataset, args.out, metric=args.metric, kind=args.kind,
                                   resolution=args.resolution, channels=args.channels, max_images=args.max_images,
                                   endpoint_url=args.endpoint_url, device=args.device, progress=not args.quiet,
                                   protocol=args.protocol, features=args.features, dinov2=args.dinov2)))
    return 0


def cmd_dataset_prepare(args) -> int:
    from ray_jobs.datasets import prepare_dataset

    print(json.dumps(prepare_dataset(args.src, args.out, kind=args.kind, resolution=args.resolution,
                                     channels=args.channels, shard_size=args.shard_size, skip_bad=args.skip_bad,
                                     endpoint_url=args.endpoint_url, progress=not args.quiet,
                                     log=lambda m: print(m, file=sys.stderr))))
    return 0


def cmd_dataset_stage(args) -> int:
    from ray_jobs.datasets import stage_dataset
    from sida_core.shards import read_manifest

    folder = stage_dataset(args.uri, endpoint_url=args.endpoint_url, log=lambda m: print(m, file=sys.stderr))
    m = read_manifest(folder)
    print(json.dumps({"uri": args.uri, "local": str(folder), "count": m["count"], "shape": m["shape"],
                      "kind": m["kind"], "verified": True}))
    return 0


def _add_steal_lease(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steal-lease", action="store_true", help="take the run's lease from a holder that is dead "
                   "but not yet stale (check first: two writers corrupt a run)")


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse then names the option and exits 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


_positive_int = _int_at_least(1)


def _workers(text: str) -> str:
    """``--workers``: ``N``, or ``MIN-MAX`` for elastic workers; returned as the ``scaling.num_workers`` value the
    config's own validation then checks (``[MIN, MAX]``)."""
    low, sep, high = text.partition("-")
    parts = [_positive_int(p) for p in ((low, high) if sep else (low,))]
    return str(parts[0]) if len(parts) == 1 else f"[{parts[0]}, {parts[1]}]"


_workers.__name__ = "worker count N or MIN-MAX"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as every other refusal of the CLI: one ``error:`` line on stderr, exit 2 (argparse
    prints its usage block first; ``--help`` still shows it). Sub-parsers are made of this class too."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sida",
                                     description="SiD / SiDA / SiD²A one-step distillation of EDM-style diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="end-to-end demo on the built-in digits: teacher, SiDA distillation, FD-digits, sample grid")
    p.add_argument("--config", default=None, help="run config (default: configs/digits.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--out", default="outputs/demo", help="where the sample grids and the run go (default: outputs/demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="run one distillation on Ray Train (local Ray by default, or --address)")
    p.add_argument("config", nargs="?", default=None, help="run config YAML (not needed with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set loss.alpha=1.2 (repeatable)")
    p.add_argument("--workers", type=_workers, default=None, metavar="N|MIN-MAX",
                   help="data-parallel workers, or MIN-MAX for elastic workers (overrides scaling.num_workers)")
    p.add_argument("--resume", default=None, metavar="RUN_URI", help="continue a stopped run from its folder in storage")
    p.add_argument("--name", default=None, help="run name (default: CONFIG_NAME-YYYYmmdd-HHMMSS)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray for this job)")
    p.add_argument("--endpoint-url", default=None, help="S3-API endpoint for --resume of an s3:// run (else from env)")
    _add_steal_lease(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="an ablation sweep (grid or random search) as one Ray Tune experiment")
    p.add_argument("file", help="sweep YAML (see configs/sweeps/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every trial's run config, e.g. --set storage.uri=s3://b/sweeps")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray for this job)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("pipeline", help="staged pipeline, e.g. SiD then SiD²A from its best generator; resumable")
    p.add_argument("file", help="pipeline YAML (see configs/pipelines/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every trial's run config (a stage's own `set` still wins)")
    p.add_argument("--stop-after", default=None, metavar="STAGE", help="end after this stage (continue later by "
                   "running the same command again)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray for this job)")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("report", help="markdown summary + PNG plots of a sweep, a pipeline or a folder of runs")
    p.add_argument("uri", help="a sweep or pipeline folder (or any folder of runs); local or s3://")
    p.add_argument("--out", required=True, metavar="DIR", help="local folder for report.md and the PNGs")
    p.add_argument("--no-upload", action="store_true", help="do not also store the report under URI/report/")
    p.add_argument("--endpoint-url", default=None, help="S3-API endpoint for s3:// URIs (else from env)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("leaderboard", help="table / plot / JSON of the scores of a run or of every run below a URI")
    p.add_argument("uri", help="a run folder, or a folder of runs (a sweep, a storage root); local or s3://")
    p.add_argument("--by", choices=["checkpoint", "run"], default="checkpoint",
                   help="one row per scored checkpoint (default) or each run's best")
    p.add_argument("--top", type=_positive_int, default=None, metavar="K", help="show the best K rows")
    p.add_argument("--metric", default=None, help="only this metric (fd_digits, fid_inception, kid_inception, ...)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="also draw score vs kimg (log x), one curve per run")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--compact", action="store_true",
                   help="first fold each ended run's one-file-per-row scores into one Parquet part (faster reads)")
    p.add_argument("--watch", type=float, nargs="?", const=5.0, default=None, metavar="SECONDS",
                   help="redraw the table (with each run's state) every SECONDS (default 5) until every run has ended")
    p.add_argument("--serve", action="store_true",
                   help="serve a live web page of the runs (ranked runs, curves, galleries, states) until Ctrl-C")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8600, help="--serve: port (default 8600; 0: any free port)")
    p.add_argument("--refresh", type=float, default=5.0, metavar="SECONDS",
                   help="--serve: re-read storage every SECONDS (default 5)")
    p.add_argument("--endpoint-url", default=None, help="S3-API endpoint for s3:// URIs (else from env)")
    p.set_defaults(func=cmd_leaderboard, torch_threads=False)  # reads rows: importing torch would cost seconds

    p = sub.add_parser("evaluate", help="re-score a run's best checkpoint with fresh seeds: mean ± std")
    p.add_argument("run_uri", help="the run folder (local or s3://)")
    p.add_argument("--best", action="store_true", help="the checkpoint with the lowest live score")
    p.add_argument("--checkpoint", default=None, metavar="NAME", help="a checkpoint by name (e.g. ckpt-000000020480)")
    p.add_argument("--repeats", type=_positive_int, default=10, help="independent generation seeds (default 10, as the paper)")
    p.add_argument("--num-images", type=_int_at_least(2), default=None,
                   help="images per score (default: the run's metric.num_images)")
    p.add_argument("--scorers", type=_positive_int, default=1,
                   help="split each score's images over this many Ray scorer actors (default 1: in this process)")
    p.add_argument("--address", default=None, help="with --scorers: a running Ray cluster (default: a local Ray)")
    p.add_argument("--protocol-check", action="store_true",
                   help="also score the run's teacher (Heun sampler, one seed set) under the same metrics, protocol "
                        "and reference, side by side with the generator; stored in RUN/evaluate/ and reused")
    p.add_argument("--teacher-steps", type=_positive_int, default=None, metavar="N",
                   help="--protocol-check: the teacher's Heun steps (default 18 = 35 NFE)")
    p.add_argument("--endpoint-url", default=None, help="S3-API endpoint for s3:// URIs (else from env)")
    p.set_defaults(func=cmd_evaluate)

    ck_help = "best (the lowest live score, its pinned copy; default), latest (the newest valid one) or a name"
    p = sub.add_parser("export", help="a run's one-step generator (EMA weights) as .pt or .safetensors + FILE.json")
    p.add_argument("run_uri", help="the run folder (local or s3://)")
    p.add_argument("--checkpoint", default="best", metavar="best|latest|NAME", help=ck_help)
    p.add_argument("--key", default="generator_ema", help="weights inside the checkpoint (default generator_ema)")
    p.add_argument("--format", default=None, metavar="pt|safetensors",
                   help="torch.save state dict or safetensors (default: from the --out suffix)")
    p.add_argument("--out", required=True, metavar="FILE", help="weights file; the metadata goes to FILE.json")
    p.add_argument("--endpoint-url", default=None, help="S3-API endpoint for s3:// URIs (else from env)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="one-step samples of a run's generator, one per seed: PNG folder or .npz")
    p.add_argument("run_uri", help="the run folder (local or s3://)")
    p.add_argument("--checkpoint", default="best", metavar="best|latest|NAME", help=ck_help)
    p.add_argument("--num", default=None, metavar="N", help="number of images: seeds 0..N-1 (or check --seeds' count)")
    p.add_argument("--seeds", default=None, metavar="LIST", help="seeds, e.g. 0-49999 or 0,5,7-9 (one image each)")
    p.add_argument("--out", required=True, metavar="DIR|FILE.npz",
                   help="a new folder for PNGs (DIR/000000/000000.png, 1000 per subfolder) or FILE.npz (arr_0, seeds, labels)")
    p.add_argument("--batch", default="256", metavar="B", help="images per forward pass (default 256; no effect on the images)")
    p.add_argument("--class-labels", default="random", metavar="random|K|none",
                   help="conditional generators: a random class per seed (default), class K, or no label")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda", help="where the generator runs (default auto)")
    p.add_argument("--vae", default=None, metavar="DIR|s3://URI",
                   help="latent-space (EDM2) generators: the SD-VAE decoder folder (diffusers AutoencoderKL) that "
                        "turns the latents into images; without it they are written as latents to FILE.npz")
    p.add_argument("--endpoint-url", default=None, help="S3-API endpoint for s3:// URIs (else from env)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("distill", help="run one distillation in this process (no Ray): the debugging engine")
    _add_config_args(p)
    p.add_argument("--run-dir", default=None, help="run folder (default: STORAGE_URI/NAME)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh: delete the run folder's checkpoints, metric rows and scores first")
    p.add_argument("--score", action="store_true",
                   help="score each checkpoint in this process (metric.*) into the run's leaderboard; pin the best")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_steal_lease(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("validate", help="validate a run config and print its derived values")
    _add_config_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("submit", help="submit a job file (train / sweep / pipeline / evaluate) to a Ray cluster's Jobs API")
    p.add_argument("job", help="job spec YAML (kind, config, resources, runtime_env, storage, tags)")
    _add_address(p)
    p.add_argument("--allow-autoscale", action="store_true",
                   help="do not refuse a job larger than the running nodes (the autoscaler will add nodes)")
    p.set_defaults(func=cmd_submit)

    j = sub.add_parser("jobs", help="follow submitted jobs: status, logs, stop").add_subparsers(
        dest="jobs_command", required=True, metavar="ACTION")
    p = j.add_parser("status", help="a job's status, message and metadata as one JSON line")
    p.add_argument("job_id")
    _add_address(p)
    p.set_defaults(func=cmd_jobs_status)
    p = j.add_parser("logs", help="a job's driver logs (--follow: stream until it ends)")
    p.add_argument("job_id")
    _add_address(p)
    p.add_argument("--follow", "-f", action="store_true", help="stream the logs live until the job ends")
    p.set_defaults(func=cmd_jobs_logs)
    p = j.add_parser("stop", help="stop a running job and wait until it has stopped")
    p.add_argument("job_id")
    _add_address(p)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the job to end (0: do not wait)")
    p.set_defaults(func=cmd_jobs_stop)

    c = sub.add_parser("cluster", help="Ray cluster-launcher YAMLs").add_subparsers(
        dest="cluster_command", required=True, metavar="ACTION")
    p = c.add_parser("validate", help="check cluster YAMLs against Ray's own schema, as `ray up` does (no cloud access)")
    p.add_argument("files", nargs="+", help="cluster YAML(s), e.g. cluster/*.yaml")
    p.set_defaults(func=cmd_cluster_validate)

    p = sub.add_parser("fid-stats", help="reference statistics (mu, sigma + manifest) of a dataset for FD / FID scoring")
    p.add_argument("dataset", metavar="DATASET",
                   help="'digits' (the built-in train split) or a path (image folder, zip, .npz, IDX)")
    p.add_argument("--out", required=True, metavar="URI", help="folder or s3://bucket/prefix for stats.npz + manifest.json")
    p.add_argument("--metric", choices=["fd_digits", "fid_inception", "fd_dinov2"], default=None,
                   help="feature space (default: fd_digits for digits, fid_inception otherwise)")
    p.add_argument("--features", action="store_true",
                   help="also store the features (float16 shards): KID and precision / recall compare against them")
    p.add_argument("--dinov2", default=None, metavar="PATH",
                   help="--metric fd_dinov2: dinov2_vitl14_pretrain.pth, local or s3:// (never downloaded)")
    p.add_argument("--kind", choices=["digits", "folder", "zip", "npz", "idx", "prepared"], default=None,
                   help="data kind (default: from the path; a folder or s3:// URI of `sida dataset prepare` is prepared)")
    p.add_argument("--resolution", type=_positive_int, default=None,
                   help="resolution the images are loaded at: the scored runs' data.resolution (digits: default 8)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None, help="1 or 3 (default: 1 for digits, else 3)")
    p.add_argument("--max-images", type=_positive_int, default=None, help="use only the first N images")
    p.add_argument("--endpoint-url", default=None, help="S3-API endpoint for an s3:// --out (else from env)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="feature extraction device")
    p.add_argument("--protocol", choices=["clean", "legacy_tensorflow"], default="clean",
                   help="clean-fid resizing mode: clean, or legacy_tensorflow (EDM's / the papers' FID protocol)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fid_stats)

    d = sub.add_parser("dataset", help="prepared datasets: sharded, in local or s3:// storage, read on demand").add_subparsers(
        dest="dataset_command", required=True, metavar="ACTION")
    p = d.add_parser("prepare", help="convert an image folder / EDM zip / .npz / IDX / EDM2 latent zip once into a "
                                     "sharded dataset (resumable; use it with data.kind: prepared)")
    p.add_argument("src", metavar="SRC", help="image folder, EDM dataset_tool zip, .npz, IDX file or folder, EDM2 latent zip")
    p.add_argument("--out", required=True, metavar="URI", help="folder or s3://bucket/prefix to write the shards to")
    p.add_argument("--kind", choices=["folder", "zip", "npz", "idx", "latents"], default=None,
                   help="source kind (default: from the path; a zip of .npy members is an EDM2 latent zip)")
    p.add_argument("--resolution", type=_positive_int, default=None,
                   help="resize every image to this (default: keep the size; images of another size are bad members)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None, help="1 or 3 (default: the source's)")
    p.add_argument("--shard-size", type=_positive_int, default=4096, help="items per shard (default 4096)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip members that cannot be decoded or have the wrong size (listed in the manifest) "
                        "instead of failing")
    p.add_argument("--endpoint-url", default=None, help="S3-API endpoint for an s3:// --out (else from env)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_dataset_prepare)
    p = d.add_parser("stage", help="copy a prepared dataset to this node's cache (s3://) or verify it (local), "
                                   "checking every shard's sha256; training does this itself")
    p.add_argument("uri", metavar="URI", help="prepared dataset: folder or s3://bucket/prefix")
    p.add_argument("--endpoint-url", default=None, help="S3-API endpoint for an s3:// URI (else from env)")
    p.set_defaults(func=cmd_dataset_stage)

    r = sub.add_parser("reference", help="reference statistics utilities").add_subparsers(
        dest="reference_command", required=True, metavar="ACTION")
    p = r.add_parser("import", help="store published Inception statistics (EDM .npz, clean-fid .npz, EDM2 .pkl) as a "
                                    "reference folder whose manifest states their FID protocol; never runs code")
    p.add_argument("src", metavar="SRC", help="the file (local or s3://): .npz with mu and sigma, or EDM2's reference .pkl")
    p.add_argument("--out", required=True, metavar="URI", help="folder or s3://bucket/prefix for stats.npz + manifest.json")
    p.add_argument("--resolution", type=_positive_int, required=True,
                   help="data.resolution of the runs to be scored against them (e.g. 32 for CIFAR-10)")
    p.add_argument("--protocol", choices=["clean", "legacy_tensorflow"], default=None,
                   help="the protocol they were taken in (default: what the file implies: EDM / EDM2 legacy_tensorflow, "
                        "clean-fid files by their name)")
    p.add_argument("--key", default="fid", choices=["fid", "fd_dinov2"],
                   help="EDM2 .pkl: which statistics (default fid; fd_dinov2 needs --dinov2)")
    p.add_argument("--dinov2", default=None, metavar="PATH",
                   help="--key fd_dinov2: the dinov2_vitl14_pretrain.pth the statistics were taken with (local or s3://; "
                        "its hash names the extractor in the manifest, so scoring with other weights is refused)")
    p.add_argument("--endpoint-url", default=None, help="S3-API endpoint for s3:// paths (else from env)")
    p.set_defaults(func=cmd_reference_import)

    t = sub.add_parser("teacher", help="teacher utilities").add_subparsers(dest="teacher_command", required=True,
                                                                            metavar="ACTION")
    p = t.add_parser("train", help="train (or reuse) the EDM teacher a config describes (built-in data: on the CPU)")
    _add_config_args(p)
    p.set_defaults(func=cmd_teacher_train)
    p = t.add_parser("import", help="convert a published EDM / EDM2 / SiD .pkl (or a .pt / .safetensors state dict) "
                                    "into a verified project checkpoint; never runs code from the file")
    p.add_argument("src", help="the file: .pkl (EDM / EDM2 / SiD), .pt / .pth or .safetensors (a state dict)")
    p.add_argument("--out", required=True, help="checkpoint folder to create: local path or s3://bucket/prefix")
    p.add_argument("--key", default=None, help="which network in the file (pickles: 'ema' by default)")
    p.add_argument("--config", default=None, help="run config giving the architecture of a state dict")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of --config (repeatable)")
    p.add_argument("--endpoint-url", default=None, help="S3-API endpoint for an s3:// --out (else from env)")
    p.set_defaults(func=cmd_teacher_import)
    p = t.add_parser("sample", help="sample a grid PNG from a checkpoint with EDM's Heun sampler")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--key", default="net", help="weights inside the checkpoint: net (teacher) or generator_ema")
    p.add_argument("--steps", type=_positive_int, default=18, help="Heun steps (18 = 35 NFE)")
    p.add_argument("--num", type=_positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="teacher_samples.png")
    p.set_defaults(func=cmd_teacher_sample)
    return parser


def set_cpu_threads() -> None:
    """Torch CPU threads from $SIDA_NUM_THREADS (default 1: the small nets of CPU runs are faster single-threaded
    than with two threads contending, measured on 2 cores; see README)."""
    import os

    import torch

    torch.set_num_threads(max(1, int(os.environ.get("SIDA_NUM_THREADS", "1"))))


def pin_cpu_kernels() -> None:
    """$SIDA_CPU_KERNELS (default avx2; sida_core/determinism.py) in a fresh process, before torch loads: the
    same CPU kernels on every x86 machine, inherited by the Ray workers this process starts."""
    import os

    from sida_core.determinism import pin_cpu_kernels as pin

    if "torch" in sys.modules:  # in-process callers (tests) chose their kernels already
        return
    try:
        pin(os.environ)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    pin_cpu_kernels()
    args = build_parser().parse_args(argv)
    if getattr(args, "torch_threads", True):
        set_cpu_threads()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        msg = str(exc) if not isinstance(exc, FileNotFoundError) else f"file not found: {exc.filename or exc}"
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
