"""The `vcflash` command."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy: commands that only talk gRPC never load torch or transformers
    from collections.abc import Sequence

    from protos.vcflash.v1 import vcflash_pb2 as pb
    from vcflash.client import Client
    from vcflash.serve.settings import Settings

# Per command: the default gRPC port and metrics port, so the split deployment's three processes can share one
# host. VCFLASH_ADDRESS / VCFLASH_METRICS_PORT, then --port / --metrics-port, override them.
SERVICE_PORTS = {"up": (50051, 9464), "ingest": (50051, 9464), "encoder": (50052, 9465), "reasoner": (50053, 9466)}


def cmd_ask(args: argparse.Namespace) -> int:
    from hico import VideoChatFlash
    from hico.checkpoint import DEFAULT_MODEL

    model = VideoChatFlash.from_pretrained(args.model or DEFAULT_MODEL, dtype=args.dtype, device=args.device)
    if args.adapter:
        from hico.lora import load_adapter

        model = load_adapter(model, args.adapter)
    answer = model.answer(
        args.video,
        args.question,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        compress=args.compress,
        max_num_frames=args.max_frames,
        start_s=args.start,
        end_s=args.end,
        seed=args.seed,
        progress=not args.json and sys.stderr.isatty(),  # bars for encoding and generation, on a terminal only
        temperature=args.temperature,
    )
    if args.json:
        drop = model.resolve_drop(args.compress)
        record = {
            "answer": answer.text,
            "frames": answer.num_frames,
            "duration_s": round(answer.duration_s, 3),
            "visual_tokens": answer.visual_tokens,
            "prompt_tokens": answer.prompt_tokens,
            "new_tokens": len(answer.token_ids),
            "stop": answer.stop,
            "dropout": None if drop is None else {"type": drop.type, "layers": drop.layers, "ratios": drop.ratios},
            "timings_s": {k: round(v, 4) for k, v in answer.timings.items()},
        }
        print(json.dumps(record, indent=2))
    else:
        print(answer.text)
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from hico.checkpoint import make_tiny_checkpoint

    if args.preset == "shapes":
        if args.tower != "umt":
            raise ValueError(f"--preset shapes has a UMT tower; --tower {args.tower} is for the tiny preset")
        from hico.checkpoint import shapes_config
        from vcflash.shapes import corpus

        if args.heads is not None and len(args.heads) != 2:
            raise ValueError(f"--heads takes Q,KV (two numbers, as 8,4), got {args.heads}")

        made = make_tiny_checkpoint(
            args.dir,
            seed=args.seed,
            config=shapes_config(*(args.heads or ())),  # its defaults without --heads
            corpus=corpus(),
            greedy=True,
            for_training=True,
            **({} if args.layer_std is None else {"layer_std": args.layer_std}),
        )
        print(made)
        return 0
    if args.layer_std is not None or args.heads is not None:
        raise ValueError("--layer-std and --heads set the base to train from: they go with --preset shapes")
    print(make_tiny_checkpoint(args.dir, res=args.res, seed=args.seed, tower=args.tower))
    return 0


def cmd_make_test_video(args: argparse.Namespace) -> int:
    from vcflash.shapes import demo_scene

    print(demo_scene(seconds=args.seconds, fps=args.fps).write(args.path))
    return 0


def csv(kind: type) -> object:
    """argparse type: comma-separated values of `kind`."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from e

    return parse


def cmd_make_dataset(args: argparse.Namespace) -> int:
    from vcflash.shapes import make_dataset

    if (args.kind == "hard") != (args.model is not None):
        print(
            "vcflash: make-dataset hard needs --model (the model whose key index picks the distractors)"
            if args.kind == "hard"
            else f"vcflash: --model is for make-dataset hard, not {args.kind}",
            file=sys.stderr,
        )
        return 2
    if args.jobs is not None and args.jobs < 1:
        print("vcflash: --jobs must be at least 1", file=sys.stderr)
        return 2
    if args.kind == "hard" and not (0 <= args.hard_share <= 1 and 0 < args.top_share <= 1):
        print("vcflash: --hard-share must be in [0, 1] and --top-share in (0, 1]", file=sys.stderr)
        return 2
    if args.kind == "hard":
        from hico import VideoChatFlash
        from hico.checkpoint import resolve_checkpoint
        from vcflash.mining import make_hard_dataset

        model = VideoChatFlash.from_pretrained(resolve_checkpoint(args.model))
        model.eval()
        paths = make_hard_dataset(
            args.out,
            model,
            videos=args.videos,
            test_videos=args.test_videos,
            pool_clips=args.pool_clips,
            seed=args.seed,
            progress=sys.stderr.isatty(),
            hard_share=args.hard_share,
            top_share=args.top_share,
        )
    else:
        try:
            paths = make_dataset(
                args.out,
                videos=args.videos,
                test_videos=args.test_videos,
                seconds=args.seconds,
                fps=args.fps,
                seed=args.seed,
                progress=sys.stderr.isatty(),
                kind=args.kind,
                jobs=args.jobs,
            )
        except ValueError as e:
            print(f"vcflash: {e}", file=sys.stderr)
            return 2
    for path in paths.values():
        print(path)
    return 0


def cmd_pretrain_tower(args: argparse.Namespace) -> int:
    from vcflash.pretrain import PretrainConfig, pretrain_tower

    cfg = PretrainConfig(
        model=args.model,
        out=Path(args.out),
        steps=args.steps,
        labels=args.labels,
        clips=args.clips,
        mirror=args.mirror,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        seed=args.seed,
        eval_every=args.eval_every,
        threads=args.threads,
    )
    summary = pretrain_tower(cfg, report=lambda line: print(line, file=sys.stderr, flush=True), progress=True)
    print(json.dumps({"out": str(cfg.out), "held_out": summary["evals"][-1]}))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hico.train import TrainConfig, train

    cfg = TrainConfig(
        data=args.data[0] if len(args.data) == 1 else tuple(args.data),
        model=args.model,
        out=args.out,
        eval_data=args.eval,
        data_root=args.data_root,
        train=args.train,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        merge_lora=args.merge_lora,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        vision_lr=args.vision_lr,
        optimizer=args.optimizer,
        warmup=args.warmup,
        videos_per_step=args.videos_per_step,
        questions_per_video=args.questions_per_video,
        max_frames=args.frames,
        anchors=args.anchors,
        relevance=args.relevance,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples,
        device=args.device,
        dtype=args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"),
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        resume=args.resume,
        bad_videos=args.bad_videos,
        frame_cache=args.frame_cache,
        compile=args.compile,
        threads=args.threads,
    )
    result = train(cfg, report=lambda line: print(line, file=sys.stderr, flush=True), progress=True)
    summary = {
        "out": str(result.out),
        "steps": result.steps,
        "samples": result.samples,
        "seconds": round(result.seconds, 1),
        "samples_per_s": round(result.samples_per_s, 3),
        "peak_memory_gb": round(result.peak_memory_gb, 3),
        "final_loss": round(result.final_loss, 4),
        "last_eval": result.evals[-1] if result.evals else None,
        "skipped_videos": result.skipped,
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hico.dataset import check_videos, read_samples
    from vcflash.evaluate import answer_live, answer_offline, grade, report

    samples, bad = check_videos(read_samples(args.data, args.data_root), args.bad_videos)
    for line in bad:
        print(f"vcflash: skipping a bad video: {line}", file=sys.stderr)
    if args.live:
        with client(args, reasoner=True) as c:
            answers = answer_live(
                c, samples, args.max_frames, progress=sys.stderr.isatty(), anchors=not args.no_anchors
            )
    else:
        model = load_for_answers(args)
        answers = answer_offline(model, samples, args.max_frames, progress=sys.stderr.isatty())
    print(report(grade(samples, answers), args.json, args.data))
    return 0


def cmd_eval_niah(args: argparse.Namespace) -> int:
    import tempfile

    from vcflash import niah

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = niah.NiahConfig(
        frames=args.frames,
        depths=args.depths,
        hops=args.hops,
        selections=args.selection,
        trials=args.trials,
        max_frames=args.max_frames,
        seed=args.seed,
        two_hop_frames=args.two_hop_frames,
    )
    model = load_for_answers(args)
    with tempfile.TemporaryDirectory(prefix="niah-") as tmp:
        store = None
        if args.redis:
            from memory import open_store

            store = open_store(args.redis, Path(tmp), redis_timeout_s=30.0)
        report = niah.run(model, cfg, store, progress=lambda line: print(line, file=sys.stderr, flush=True))
        if store is not None:
            store.close()
    print(niah.format_summary(report["summary"]))
    if args.json:
        niah.write_json(report, args.json)
    if args.heatmap:
        niah.heatmap(report, args.heatmap)
    return 0


def load_for_answers(args: argparse.Namespace):
    """`--model` (and `--adapter`, merged in) as `ask` loads it."""
    from hico import VideoChatFlash
    from hico.checkpoint import DEFAULT_MODEL

    model = VideoChatFlash.from_pretrained(args.model or DEFAULT_MODEL, dtype=args.dtype, device=args.device)
    if args.adapter:
        from hico.lora import load_adapter

        model = load_adapter(model, args.adapter)
    return model


def service_settings(args: argparse.Namespace) -> Settings:
    from vcflash.serve.settings import Settings

    port, metrics_port = SERVICE_PORTS[args.command]
    if args.port is not None:
        address: str | None = f"{args.host}:{args.port}"
    else:  # VCFLASH_ADDRESS, else this command's default port
        address = None if os.environ.get("VCFLASH_ADDRESS") else f"{args.host}:{port}"
    if args.metrics_port is not None:
        metrics_port = args.metrics_port
    elif os.environ.get("VCFLASH_METRICS_PORT"):
        metrics_port = None
    return Settings.from_env(
        model=getattr(args, "model", None),
        redis_url=args.redis,
        address=address,
        metrics_port=metrics_port,
        device=getattr(args, "device", None),
        dtype=getattr(args, "dtype", None),
        data_dir=Path(args.data_dir) if args.data_dir else None,
        frame_size=getattr(args, "frame_size", None),
        reasoner_address=getattr(args, "reasoner", None),
        encoder_address=getattr(args, "encoder", None),
        ingest_shard=getattr(args, "shard", None),
        ingest_shards=getattr(args, "shards", None),
        media_root=Path(args.media_root).resolve() if getattr(args, "media_root", None) else None,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """`up`, `ingest`, `encoder` and `reasoner`: build the service and run it until a signal."""
    import asyncio

    from vcflash.serve.lifecycle import PortInUse, run

    settings = service_settings(args)
    if args.command == "up":
        from vcflash.app import App

        service = App(settings)
    elif args.command == "ingest":  # with the web console, its chat asking the reasoner service
        from vcflash.console.split import IngestWithConsole

        service = IngestWithConsole(settings)
    elif args.command == "encoder":
        from encoder_svc.server import EncoderService

        service = EncoderService(settings)
    else:
        from reasoner.server import ReasonerService
        from vcflash.app import alert_shard

        service = ReasonerService(settings)
        service.alert_owns = alert_shard(settings).owns  # VCFLASH_REASONER_SHARD(S): replicated reasoners
    try:
        asyncio.run(run(service))
    except PortInUse as e:
        print(f"vcflash: error: {e}", file=sys.stderr)
        return 2
    return 0


def client(args: argparse.Namespace, reasoner: bool = False) -> Client:
    from vcflash.client import Client
    from vcflash.serve.settings import ClientSettings

    settings = ClientSettings.from_env(
        api_token=args.token, tls_ca=tls_ca(args), http_url=getattr(args, "http_url", None)
    )
    address = args.address or (settings.reasoner_address if reasoner else None) or settings.address
    return Client(address, settings.token(), tls_ca=settings.tls_ca, http_url=settings.http_url)


def tls_ca(args: argparse.Namespace) -> Path | None:
    return Path(args.tls_ca).expanduser() if args.tls_ca else None


def cmd_streams(args: argparse.Namespace) -> int:
    with client(args) as c:
        if args.action == "add":
            local = Path(args.source)  # a file named relative to here means this file, wherever the server runs
            source = str(local.resolve()) if "://" not in args.source and local.exists() else args.source
            s = c.add_stream(
                args.name,
                source,
                fps=args.fps,
                realtime=not args.fast,
                loop=args.loop,
                transport=args.transport,
                keyframes_only=args.keyframes_only,
                listen=args.listen,
                camera_clock=args.camera_clock,
                record=args.record,
            )
            print(f"{s.stream_id}: {s.state} ({s.source}, {s.fps:g} fps)")
        elif args.action == "rm":
            c.remove_stream(args.name, delete_memory=args.delete_memory)
            print(f"{args.name}: removed")
        elif args.action == "restart":
            s = c.restart_stream(args.name)
            print(f"{s.stream_id}: {s.state} ({s.source}, {s.fps:g} fps)")
        else:  # ls: the streams come from ingest alone, so they are listed even while the memory is down
            listed = c.list_streams()
            stats, stats_error = memory_or_error(c)
            if args.json:
                from google.protobuf.json_format import MessageToDict

                streams = []
                for s in listed:
                    d = MessageToDict(s, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                    mem = stats.get(s.stream_id)
                    d["memory"] = None if mem is None else MessageToDict(mem, preserving_proto_field_name=True)
                    d["memory_error"] = s.memory_error or stats_error
                    streams.append(d)
                print(json.dumps(streams, indent=2))
                return 0
            for s in listed:
                dropped = sum(s.frames_dropped.values())
                mem, memory_error = stats.get(s.stream_id), s.memory_error or stats_error
                print(
                    f"{s.stream_id}\t{s.state}\t{s.source}\t{s.fps:g} fps\tframes in {s.frames_in}, "
                    f"sampled {s.frames_sampled}, dropped {dropped}\tclips stored {s.clips_stored}"
                    + (f", in memory {mem.clips} ({mem.bytes / 1e6:.1f} MB)" if mem else "")
                    + (f"\trecording {s.recording_bytes / 1e6:.1f} MB" if s.recording_bytes else "")
                    + (f"\tclock: {s.clock}" if s.clock not in ("", "server") else "")  # with --camera-clock
                    + (f"\tdecode: {s.decode}" if s.decode not in ("", "all frames") else "")  # --keyframes-only
                    + (f"\terror: {s.error}" if s.error else "")
                    + (f"\tmemory error: {memory_error}" if memory_error else "")
                )
    return 0


def memory_or_error(c: Client) -> tuple[dict[str, pb.StreamMemoryStats], str]:
    """Every stream's memory statistics, or none and why when the memory is unavailable (Redis down)."""
    import grpc

    try:
        return {m.stream_id: m for m in c.stats()}, ""
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
            raise
        return {}, e.details()  # type: ignore[attr-defined]


def iso(t: float, timespec: str = "auto") -> str:
    """Unix seconds as an ISO date-time in UTC, which `--from/--to` read back."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def memory_row(m: pb.StreamMemoryStats, state: str | None) -> dict[str, object]:
    """One stream of `memory ls`: what memory holds, its config, and its state if this server runs it."""
    return {
        "stream_id": m.stream_id,
        "clips": m.clips,
        "bytes": m.bytes,
        "first_wall": iso(m.first.wall_start) if m.HasField("first") else None,
        "last_wall": iso(m.last.wall_end) if m.HasField("last") else None,
        "retention_max_age_s": m.retention_max_age_s if m.HasField("retention_max_age_s") else None,
        "retention_max_bytes": m.retention_max_bytes if m.HasField("retention_max_bytes") else None,
        "evicted_clips": m.evicted_clips,
        "configured": m.configured,  # memory holds its config (source, fps, ...)
        "active": m.active,  # that config is resumed when ingest restarts
        "state": state,  # running, finished, ... on this server; None: it runs no such stream
    }


def describe_memory(m: pb.StreamMemoryStats, state: str | None) -> str:
    """One line of `memory ls`: stream, clips, size, wall-clock span, retention, and where the stream stands."""
    span = f"{iso(m.first.wall_start, 'seconds')} to {iso(m.last.wall_end, 'seconds')}" if m.HasField("first") else ""
    age = f"{m.retention_max_age_s:g} s" if m.HasField("retention_max_age_s") else "any age"
    size = f"{m.retention_max_bytes / 1e6:g} MB" if m.HasField("retention_max_bytes") else "any size"
    config = "not running, resumed at restart" if m.active else "stopped" if m.configured else "not configured"
    return (
        f"{m.stream_id}\t{m.clips} clips\t{m.bytes / 1e6:.1f} MB\t{span or 'no clips'}\t"
        f"retention {age}, {size}\t{state or config}"
    )


def cmd_memory(args: argparse.Namespace) -> int:
    """`memory ls [STREAM]` and `memory rm STREAM`: what memory holds, whether or not a server runs the stream."""
    import grpc

    with client(args) as c:
        if args.action == "rm":
            return remove_memory(c, args)
        if args.action == "thumbnails":
            return save_thumbnails(c, args)
        if args.action == "recording":
            return save_recording(c, args)
        if args.name:
            return list_clips(c, args)
        if args.start or args.end:
            raise ValueError("--from/--to list one stream's clips: name the stream")
        stats = c.stats()
        try:  # the state of the streams this server runs; a server that runs none (a reasoner) has no Ingest
            states = {s.stream_id: s.state for s in c.list_streams()}
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                raise
            states = {}
    if args.json:
        print(json.dumps([memory_row(m, states.get(m.stream_id)) for m in stats], indent=2))
        return 0
    for m in stats:
        print(describe_memory(m, states.get(m.stream_id)))
    return 0


def list_clips(c: Client, args: argparse.Namespace) -> int:
    start, end, wall = parse_range(args.start, args.end, args.wall)
    clips = c.clips(args.name, start, end, wall_clock=wall, limit=args.limit)
    if args.json:
        keys = ("seq", "media_start", "media_end")
        rows = [
            {k: getattr(m, k) for k in keys} | {"wall_start": iso(m.wall_start), "wall_end": iso(m.wall_end)}
            for m in clips
        ]
        print(json.dumps(rows, indent=2))
        return 0
    for m in clips:
        print(
            f"#{m.seq}\tmedia {m.media_start:.1f}-{m.media_end:.1f} s\t"
            f"wall {iso(m.wall_start, 'seconds')} to {iso(m.wall_end, 'seconds')}"
        )
    return 0


def save_thumbnails(c: Client, args: argparse.Namespace) -> int:
    """Write the thumbnails of a stream's clips in a range as OUTDIR/SEQ.jpg (seq zero-padded, so they sort)."""
    if args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    start, end, wall = parse_range(args.start, args.end, args.wall)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for t in c.thumbnails(args.name, start, end, wall_clock=wall, limit=args.limit):
        path = out / f"{t.clip.seq:010d}.jpg"
        path.write_bytes(t.jpeg)
        n += 1
        if args.verbose:
            print(f"{path}\tmedia {t.clip.media_start:.1f} s\twall {iso(t.clip.wall_start, 'seconds')}")
    print(f"{args.name}: wrote {n} thumbnails to {out}")
    return 0


def save_recording(c: Client, args: argparse.Namespace) -> int:
    """Write a recorded moment (wall clock: ISO date-times, or Unix seconds) as an MP4 cut by remux."""
    import urllib.error

    start, end = (parse_time(v)[0] for v in (args.start, args.end))
    try:
        first, last = c.recording(args.name, start, end, args.out)
    except urllib.error.HTTPError as e:
        raise ValueError(f"HTTP {e.code}: {e.read().decode(errors='replace').strip()}") from None
    except urllib.error.URLError as e:
        raise ValueError(f"cannot reach {c.http_url} (--http-url): {e.reason}") from None
    print(f"{args.name}: wrote {args.out} ({iso(first, 'milliseconds')} to {iso(last, 'milliseconds')})")
    return 0


def remove_memory(c: Client, args: argparse.Namespace) -> int:
    """Delete after saying what goes: asks on a terminal, needs `--yes` otherwise."""
    (m,) = c.stats(args.name)  # NOT_FOUND when memory holds nothing of it
    what = f"{m.clips} clips ({m.bytes / 1e6:.1f} MB) of {args.name}"
    if not args.yes:
        if not sys.stdin.isatty():
            print(f"vcflash: error: this deletes {what}; pass --yes to confirm", file=sys.stderr)
            return 2
        if input(f"Delete {what} from memory? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    c.delete_memory(args.name)
    print(f"{args.name}: deleted {m.clips} clips ({m.bytes / 1e6:.1f} MB) from memory")
    return 0


def check_health(args: argparse.Namespace, timeout_s: float = 3.0) -> tuple[str, str]:
    """(address, status name) of the server's gRPC health check; needs no token."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from vcflash.serve.settings import ClientSettings
    from vcflash.serve.tls import channel as open_channel

    settings = ClientSettings.from_env(tls_ca=tls_ca(args))
    address = args.address or settings.address
    with open_channel(address, settings.tls_ca) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=timeout_s
        )
    return address, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the server reports SERVING (compose healthchecks)."""
    address, status = check_health(args)
    if args.json:
        print(json.dumps({"address": address, "service": args.service, "status": status}))
    else:
        print(status)
    return 0 if status == "SERVING" else 1


def cmd_wait(args: argparse.Namespace) -> int:
    """Poll the health check until SERVING (exit 0) or `--timeout` seconds pass (exit 1)."""
    import grpc

    deadline = time.monotonic() + args.timeout
    status, address = "UNREACHABLE", args.address
    while True:
        try:
            address, status = check_health(args, timeout_s=max(0.1, min(2.0, deadline - time.monotonic())))
        except grpc.RpcError as e:
            status = f"UNREACHABLE ({e.code().name})"  # type: ignore[attr-defined]
        if status == "SERVING":
            print(status)
            return 0
        if time.monotonic() >= deadline:
            print(f"vcflash: not serving after {args.timeout:g} s: {status}", file=sys.stderr)
            return 1
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def parse_when(value: str) -> float | datetime:
    """Seconds (media time), or an ISO 8601 date-time (wall clock)."""
    try:
        t = float(value)
    except ValueError:
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is neither seconds nor an ISO date-time (2026-11-21T14:05, 2026-11-21T14:05:00+01:00)"
            ) from None
    if not math.isfinite(t):
        raise ValueError(f"a time must be finite, got {value!r}")
    return t


def parse_time(value: str) -> tuple[float, bool]:
    """(seconds, on the wall clock?): media seconds, or an ISO date-time as Unix seconds (naive: UTC)."""
    from vcflash.client import wall_seconds

    t = parse_when(value)
    return (t, False) if isinstance(t, float) else (wall_seconds(t), True)


def parse_range(start: str | None, end: str | None, wall: bool = False) -> tuple[float | None, float | None, bool]:
    """`--from/--to` (None: open) as (start, end, on the wall clock?); `wall` (--wall) reads numbers as Unix
    seconds. A date-time with media seconds is a ValueError: the two clocks are unrelated."""
    from vcflash.client import resolve_range

    return resolve_range(*(None if v is None else parse_when(v) for v in (start, end)), wall_clock=wall)


def media_seconds(value: str) -> float:
    """`--from/--to` of `vcflash ask`: a video file has media time only."""
    try:
        t = parse_when(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not isinstance(t, float):
        raise argparse.ArgumentTypeError(f"{value!r}: a video file has no wall clock; give seconds from its start")
    return t


def cmd_ask_live(args: argparse.Namespace) -> int:
    from hico.prompt import wall_clock

    start, end, wall = parse_range(args.start, args.end, args.wall)
    with client(args, reasoner=True) as c:
        result = None
        for event in c.ask(
            args.stream,
            args.question,
            start=start,
            end=end,
            wall_clock=wall,
            max_frames=args.max_frames,
            retrieval=args.retrieval,
            selection=args.selection,
            dropout=args.compress or "",
            max_new_tokens=args.max_new_tokens,
        ):
            if isinstance(event, str):
                if not args.json:
                    print(event, end="", flush=True)
            else:
                result = event
    if args.json:
        from google.protobuf.json_format import MessageToDict

        record = (
            None
            if result is None
            else MessageToDict(result, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        )
        print(json.dumps(record, indent=2))
        return 0
    print()
    if result is not None:
        if result.note:
            print(f"({result.note})")
        print(f"evidence: {len(result.evidence)} clips, {result.frames} frames, {result.visual_tokens} visual tokens")
        for e in result.evidence:
            clip = e.clip
            print(
                f"  {clip.stream_id} #{clip.seq}  media {clip.media_start:.1f}-{clip.media_end:.1f} s  "
                f"wall {wall_clock(clip.wall_start)}-{wall_clock(clip.wall_end)[11:]} UTC"
                + (f"  retrieved ({e.score:.2f})" if e.retrieved else "")
            )
        if result.moments:
            print("moments:")
            print_moments(result.moments)
    return 0


def print_moments(moments: Sequence[pb.Moment]) -> None:
    """One line per ranked moment (`pb.Moment`), best first."""
    from hico.prompt import wall_clock

    for i, m in enumerate(moments, 1):
        seqs = f"#{m.first_seq}" + (f"-{m.last_seq}" if m.last_seq != m.first_seq else "")
        print(
            f"  {i:>2}. {m.stream_id} {seqs}  media {m.media_start:.1f}-{m.media_end:.1f} s  "
            f"wall {wall_clock(m.wall_start)}-{wall_clock(m.wall_end)[11:]} UTC  score {m.score:.4g}"
        )


def cmd_search(args: argparse.Namespace) -> int:
    """`vcflash search`: the ranked moments of a running server's memory, without an answer."""
    start, end, wall = parse_range(args.start, args.end, args.wall)
    with client(args, reasoner=True) as c:
        response = c.search(
            args.stream,
            args.question,
            start=start,
            end=end,
            wall_clock=wall,
            limit=args.limit,
            selection=args.selection,
        )
    if args.json:
        from google.protobuf.json_format import MessageToDict

        record = MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        print(json.dumps(record, indent=2))
        return 0
    if response.note:
        print(f"({response.note})")
    print(f"{len(response.moments)} moments from {response.clips_scored} clips, best first:")
    print_moments(response.moments)
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    """`alerts add|ls|rm`: the standing questions of a running server (its reasoner)."""
    with client(args, reasoner=True) as c:
        if args.action == "add":
            a = c.add_alert(
                args.name,
                args.stream,
                args.question,
                window_frames=args.window_frames,
                every_clips=args.every_clips,
                threshold=args.threshold,
                min_duration_s=args.min_duration,
                cooldown_s=args.cooldown,
                webhook_url=args.webhook,
                mqtt_topic=args.mqtt,
            )
            print(f"{a.name}: added ({describe_alert(a)})")
            if a.webhook_secret:
                print(f"webhook secret (shown this once; X-Vcflash-Signature is its HMAC-SHA256): {a.webhook_secret}")
        elif args.action == "rm":
            c.remove_alert(args.name)
            print(f"{args.name}: removed (its events stay in the log)")
        else:
            alerts = c.alerts()
            if args.json:
                from google.protobuf.json_format import MessageToDict

                rows = [
                    MessageToDict(a, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                    for a in alerts
                ]
                print(json.dumps([{k: v for k, v in r.items() if k != "webhook_secret"} for r in rows], indent=2))
                return 0
            for a in alerts:
                print(f"{a.name}\t{a.question!r}\t{describe_alert(a)}")
    return 0


def describe_alert(a: pb.Alert) -> str:
    """An alert's streams, schedule, hysteresis and destinations, in one line."""
    return ", ".join(
        [
            f"streams {','.join(a.stream_ids)}",
            f"{a.window_frames}-frame window every {a.every_clips} clip{'s' if a.every_clips != 1 else ''}",
            f"threshold {a.threshold:g}",
            *([f"min duration {a.min_duration_s:g} s"] if a.min_duration_s else []),
            *([f"cooldown {a.cooldown_s:g} s"] if a.cooldown_s else []),
            *([f"webhook {a.webhook_url}"] if a.webhook_url else []),
            *([f"mqtt {a.mqtt_topic}"] if a.mqtt_topic else []),
        ]
    )


def cmd_events(args: argparse.Namespace) -> int:
    """`vcflash events`: the alert event log, then with --follow new records as they come (one line, or one JSON
    object, per record)."""
    from vcflash.client import event_record

    if args.after < 0:
        raise ValueError(f"--after must be >= 0, got {args.after}")
    start, end, wall = parse_range(args.start, args.end, args.wall)
    with client(args, reasoner=True) as c:
        for e in c.events(
            after=args.after, alert=args.alert, follow=args.follow, start=start, end=end, wall_clock=wall
        ):
            if args.json:
                print(json.dumps(event_record(e)), flush=True)
                continue
            media = f"media {e.start_media_s:.1f}" + (f"-{e.end_media_s:.1f}" if e.HasField("end_media_s") else "")
            when = f"  wall {iso(e.start_wall, 'seconds')}" if e.HasField("start_wall") else ""
            clips = f"#{e.clips[0]}" + (f"-{e.clips[-1]}" if len(e.clips) > 1 else "") if e.clips else "none"
            print(
                f"{e.id}\t{e.kind}\t{e.alert}\t{e.stream_id}\t{media} s{when}\tscore {e.score:.3f} (peak "
                f"{e.peak:.3f})\tclips {clips}",
                flush=True,
            )
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    """An MCP server over a running vcflash (vcflash.mcp_server): stdio, or streamable HTTP with --http-port."""
    try:
        import mcp  # noqa: F401
    except ImportError:
        print("vcflash: error: vcflash mcp needs the MCP SDK: pip install 'vcflash[mcp]'", file=sys.stderr)
        return 2
    from vcflash.mcp_server import Tools, build, serve_http
    from vcflash.serve.settings import ClientSettings

    with client(args) as c, client(args, reasoner=True) as reasoner:
        server = build(Tools(c, reasoner))
        if args.http_port is None:
            server.run("stdio")
        else:
            token = ClientSettings.from_env(api_token=args.token).token()
            serve_http(server, token, args.host, args.http_port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vcflash", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about a video file, offline")
    ask.add_argument("video", help="video file (anything PyAV opens)")
    ask.add_argument("question")
    ask.add_argument(
        "--model",
        help="hub id or local checkpoint dir (default: OpenGVLab/VideoChat-Flash-Qwen2_5-2B_res448); "
        "'tiny': the shipped tiny model, trained on synthetic shapes; 'tiny-random': random tiny weights",
    )
    ask.add_argument("--adapter", help="a LoRA adapter directory (vcflash train --lora-rank) to apply to --model")
    ask.add_argument("--dtype", help="float32, bfloat16 or float16 (default bfloat16 on CUDA, float32 on CPU)")
    ask.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    ask.add_argument("--max-frames", type=int, default=512, help="frame budget, about 1 fps up to this (512)")
    ask.add_argument("--from", "--start", dest="start", type=media_seconds, help="look at the video from this second")
    ask.add_argument("--to", "--end", dest="end", type=media_seconds, help="look at the video up to this second")
    ask.add_argument(
        "--compress",
        help="visual dropout: off, recommended (uniform0_attention:4,18:1,0.75,0.25) or TYPE:LAYERS:RATIOS; "
        "default: the checkpoint's config",
    )
    ask.add_argument(
        "--max-new-tokens",
        type=int,
        help="answer length limit (default: generation_config.json's, else 512); degenerate output "
        "(whitespace, one repeated token) stops early",
    )
    ask.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ask.add_argument("--temperature", type=float, help="sampling temperature (default from generation_config.json)")
    ask.add_argument("--seed", type=int, help="random seed for --sample")
    ask.add_argument("--json", action="store_true", help="print answer, frames, duration, tokens and timings as JSON")
    ask.set_defaults(func=cmd_ask)

    tiny = sub.add_parser("make-tiny-checkpoint", help="write a random tiny checkpoint in the official layout")
    tiny.add_argument("dir")
    tiny.add_argument("--res", type=int, choices=(224, 448), default=224)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--tower",
        choices=("umt", "internvideo2"),
        default="umt",
        help="vision tower: umt (default) or internvideo2 (the 7B InternVideo2-1B variant's layout, 224 px only)",
    )
    tiny.add_argument(
        "--preset",
        choices=("tiny", "shapes"),
        default="tiny",
        help="shapes: the wider base (shapes vocabulary, greedy answers) that vcflash train makes the shipped tiny of",
    )
    tiny.add_argument(
        "--layer-std",
        type=float,
        help="--preset shapes: std of the LLM decoder layers' starting weights (default 0.08, "
        "hico.checkpoint.LAYER_STD; the shipped tiny started from 0.02, Qwen's initializer_range)",
    )
    tiny.add_argument(
        "--heads",
        type=csv(int),
        metavar="Q,KV",
        help="--preset shapes: attention heads and key-value heads (default 4,2; 8,4 splits the same weights in "
        "heads of 16)",
    )
    tiny.set_defaults(func=cmd_make_tiny)

    def service(name: str, help: str, model: bool) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        if model:
            p.add_argument("--model", help="hub id, local dir or 'tiny' (default: VCFLASH_MODEL or the 2B checkpoint)")
            p.add_argument("--device", help="cpu or cuda (default: VCFLASH_DEVICE or cpu)")
            p.add_argument("--dtype", help="float32, bfloat16 or float16")
        p.add_argument("--redis", help="Redis URL for the memory (default: embedded, file-backed in the data dir)")
        port, metrics_port = SERVICE_PORTS[name]
        p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
        p.add_argument("--port", type=int, help=f"gRPC port (default: VCFLASH_ADDRESS, else {port})")
        p.add_argument(
            "--metrics-port",
            type=int,
            help=f"Prometheus port, 0: off (default: VCFLASH_METRICS_PORT, else {metrics_port})",
        )
        p.add_argument("--data-dir", help="embedded memory and API token (default ~/.local/share/vcflash)")
        if name in ("up", "ingest"):
            p.add_argument(
                "--media-root", help="local video files streams may read, under this dir only (default: none)"
            )
        p.set_defaults(func=cmd_serve)
        return p

    service("up", "run ingest, encoder, memory and reasoner in one process (gRPC server)", model=True)
    ingest = service("ingest", "split deployment: streams in, clips to the encoder service", model=False)
    ingest.add_argument("--frame-size", type=int, help="the encoder's input size S (default VCFLASH_FRAME_SIZE or 448)")
    ingest.add_argument(
        "--reasoner",
        help="the reasoner the web console's chat asks (default: VCFLASH_REASONER_ADDRESS or 127.0.0.1:50053)",
    )
    ingest.add_argument(
        "--encoder",
        help="the encoder(s) clips go to: host:port, dns:///name:port (every address of the name) or a "
        "comma-separated list (default: VCFLASH_ENCODER_ADDRESS or 127.0.0.1:50052)",
    )
    ingest.add_argument(
        "--shard",
        help="this process's shard, 0..SHARDS-1, or 'auto': the host name's trailing -<ordinal> "
        "(default: VCFLASH_INGEST_SHARD or 0)",
    )
    ingest.add_argument(
        "--shards",
        type=int,
        help="ingest processes sharing the streams by a hash of their names (default: VCFLASH_INGEST_SHARDS or 1)",
    )
    service("encoder", "split deployment: clips -> visual tokens -> memory", model=True)
    service("reasoner", "split deployment: Ask and memory inspection", model=True)

    def tls(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tls-ca", help="CA certificate (PEM) to connect over TLS (default: VCFLASH_TLS_CA; plaintext)")

    def connection(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", help="server address (default: VCFLASH_ADDRESS or 127.0.0.1:50051)")
        p.add_argument("--token", help="API token (default: VCFLASH_API_TOKEN or the data dir's api_token)")
        tls(p)

    streams = sub.add_parser("streams", help="add, list or remove live streams on a running server")
    streams_sub = streams.add_subparsers(dest="action", required=True)
    add = streams_sub.add_parser("add", help="start ingesting a source")
    add.add_argument("name")
    add.add_argument("source", help="file, URL or camera address (rtsp://user:pass@host/...)")
    add.add_argument("--fps", type=float, default=1.0, help="sampling rate (default 1)")
    add.add_argument("--fast", action="store_true", help="read a file as fast as possible instead of in real time")
    add.add_argument("--loop", action="store_true", help="replay a file when it ends")
    add.add_argument("--transport", choices=("tcp", "udp"), default="tcp", help="RTSP transport (default tcp)")
    add.add_argument(
        "--keyframes-only",
        action="store_true",
        help="decode keyframes only (cheap at 1 fps); every frame while keyframes come less often than --fps",
    )
    add.add_argument("--listen", action="store_true", help="RTSP push: wait for a publisher on the URL's port")
    add.add_argument(
        "--record",
        action="store_true",
        help="keep the video (stream copy; WebRTC: the sampled frames), cut with `memory recording`",
    )
    add.add_argument(
        "--camera-clock",
        action="store_true",
        help="RTSP: wall times on the camera's clock (RTCP sender reports), not the server's; trust it only if "
        "the camera is synchronised (NTP)",
    )
    rm = streams_sub.add_parser("rm", help="stop a stream")
    rm.add_argument("name")
    rm.add_argument("--delete-memory", action="store_true", help="also forget its clips")
    restart = streams_sub.add_parser("restart", help="start a failed or finished stream again (e.g. fixed credentials)")
    restart.add_argument("name")
    ls = streams_sub.add_parser("ls", help="list streams with their counters")
    ls.add_argument("--json", action="store_true", help="print the streams and their memory as JSON")
    for p in (add, rm, restart, ls):
        connection(p)
    streams.set_defaults(func=cmd_streams)

    memory = sub.add_parser("memory", help="list or delete what memory holds, streams no longer configured too")
    memory_sub = memory.add_subparsers(dest="action", required=True)
    mls = memory_sub.add_parser("ls", help="every stream in memory (clips, bytes, time span, retention, config)")
    mls.add_argument("name", nargs="?", help="list this stream's clips instead")
    mls.add_argument("--from", dest="start", help="clips from: media seconds, or an ISO date-time (wall clock)")
    mls.add_argument("--to", dest="end", help="clips up to: media seconds, or an ISO date-time (wall clock)")
    mls.add_argument("--wall", action="store_true", help="read --from/--to as Unix seconds on the wall clock")
    mls.add_argument("--limit", type=int, default=0, help="at most this many clips (default: the server's limit)")
    mls.add_argument("--json", action="store_true", help="print the streams (or clips) as JSON")
    mrm = memory_sub.add_parser("rm", help="delete a stream's clips, retention and config (not while it runs)")
    mrm.add_argument("name")
    mrm.add_argument("--yes", action="store_true", help="do not ask (needed when stdin is not a terminal)")
    mth = memory_sub.add_parser("thumbnails", help="write the JPEG thumbnails of a stream's clips to a directory")
    mth.add_argument("name")
    mth.add_argument("outdir", help="directory to write SEQ.jpg files to (made if missing)")
    mth.add_argument("--from", dest="start", help="clips from: media seconds, or an ISO date-time (wall clock)")
    mth.add_argument("--to", dest="end", help="clips up to: media seconds, or an ISO date-time (wall clock)")
    mth.add_argument("--wall", action="store_true", help="read --from/--to as Unix seconds on the wall clock")
    mth.add_argument("--limit", type=int, default=1000, help="at most this many thumbnails (default 1000)")
    mth.add_argument("-v", "--verbose", action="store_true", help="print each file with its clip's times")
    mrec = memory_sub.add_parser("recording", help="write a recorded moment of a stream as an MP4 (remux)")
    mrec.add_argument("name")
    mrec.add_argument("start", help="wall clock: an ISO date-time (naive: UTC) or Unix seconds")
    mrec.add_argument("end", help="wall clock: an ISO date-time (naive: UTC) or Unix seconds")
    mrec.add_argument("out", help="MP4 file to write")
    mrec.add_argument("--http-url", help="the server's HTTP API (default: VCFLASH_HTTP_URL, or port 8080)")
    for p in (mls, mrm, mth, mrec):
        connection(p)
    memory.set_defaults(func=cmd_memory)

    live = sub.add_parser("ask-live", help="ask a running server about its streams' memory")
    live.add_argument("question")
    live.add_argument("--stream", action="append", required=True, help="stream name; repeat for several cameras")
    live.add_argument(
        "--from",
        dest="start",
        help="start: media seconds (0 when the server first saw the stream), or an ISO date-time on the wall clock "
        "(no zone: UTC); clips overlapping [from, to) are used",
    )
    live.add_argument("--to", dest="end", help="end: media seconds, or an ISO date-time (wall clock; no zone: UTC)")
    live.add_argument("--wall", action="store_true", help="read numbers in --from/--to as Unix seconds (wall clock)")
    live.add_argument("--max-frames", type=int, default=512)
    live.add_argument(
        "--retrieval", action="store_true", help="uniform backbone plus the clips closest to the question"
    )
    live.add_argument(
        "--selection",
        choices=["uniform", "retrieval", "scan", "index"],
        help="clips over the budget: index (default: as scan, scored by the key index), uniform, retrieval (as "
        "--retrieval) or scan (every clip scored by the model's attention; the best with their neighbours, a uniform "
        "backbone and the latest clips)",
    )
    live.add_argument("--compress", help="visual dropout: off, recommended or TYPE:LAYERS:RATIOS")
    live.add_argument("--max-new-tokens", type=int, default=512)
    live.add_argument("--json", action="store_true", help="print only the result (answer, evidence, timings) as JSON")
    connection(live)
    live.set_defaults(func=cmd_ask_live)

    search = sub.add_parser("search", help="rank the moments of a running server's memory for a question (no answer)")
    search.add_argument("question")
    search.add_argument("--stream", action="append", required=True, help="stream name; repeat for several cameras")
    search.add_argument("--from", dest="start", help="start: media seconds, or an ISO date-time (wall clock; UTC)")
    search.add_argument("--to", dest="end", help="end: media seconds, or an ISO date-time (wall clock; no zone: UTC)")
    search.add_argument("--wall", action="store_true", help="read numbers in --from/--to as Unix seconds (wall clock)")
    search.add_argument("--limit", type=int, default=10, help="moments to return, 1-100 (10)")
    search.add_argument(
        "--selection",
        choices=["scan", "index", "retrieval"],
        default="scan",
        help="scan: the model's attention over every clip in range (default); index: the same score from per-clip "
        "keys; retrieval: the FAISS heuristic",
    )
    search.add_argument("--json", action="store_true", help="print the moments as JSON")
    connection(search)
    search.set_defaults(func=cmd_search)

    alerts = sub.add_parser("alerts", help="standing questions evaluated on every new clip: add, list or remove")
    alerts_sub = alerts.add_subparsers(dest="action", required=True)
    aadd = alerts_sub.add_parser("add", help="add a yes/no question evaluated as the streams' memory grows")
    aadd.add_argument("name", help="[A-Za-z0-9_.-], 1-64 characters")
    aadd.add_argument("question", help='a yes/no question, e.g. "Is a person at the loading bay door?"')
    aadd.add_argument("--stream", action="append", required=True, help="stream name; repeat for several cameras")
    aadd.add_argument("--window-frames", type=int, default=16, help="latest frames scored each time (16; x4)")
    aadd.add_argument("--every-clips", type=int, default=1, help="evaluate after every N new clips (1)")
    aadd.add_argument("--threshold", type=float, default=0.5, help="P(yes) above which it counts as yes (0.5)")
    aadd.add_argument(
        "--min-duration", type=float, default=0.0, help="media seconds above the threshold before an event starts"
    )
    aadd.add_argument("--cooldown", type=float, default=0.0, help="after an event ends, none starts for this long (s)")
    aadd.add_argument("--webhook", help="POST each event as signed JSON to this http(s) URL")
    aadd.add_argument("--mqtt", help="publish each event to this MQTT topic (VCFLASH_MQTT_URL's broker)")
    als = alerts_sub.add_parser("ls", help="list the alerts")
    als.add_argument("--json", action="store_true", help="print the alerts as JSON")
    arm = alerts_sub.add_parser("rm", help="remove an alert (its events stay)")
    arm.add_argument("name")
    for p in (aadd, als, arm):
        connection(p)
    alerts.set_defaults(func=cmd_alerts)

    events = sub.add_parser("events", help="the alerts' event log (start and end of each event); --follow for new ones")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events as they come")
    events.add_argument("--alert", help="only this alert's events")
    events.add_argument("--after", type=int, default=0, help="events after this id (resume where a reader stopped)")
    events.add_argument("--from", dest="start", help="events overlapping from: media seconds or an ISO date-time")
    events.add_argument("--to", dest="end", help="events overlapping up to: media seconds or an ISO date-time")
    events.add_argument("--wall", action="store_true", help="read numbers in --from/--to as Unix seconds (wall clock)")
    events.add_argument("--json", action="store_true", help="one JSON record per line, as webhooks receive them")
    connection(events)
    events.set_defaults(func=cmd_events)

    mcp = sub.add_parser(
        "mcp", help="MCP server over a running vcflash (tools: list_cameras, camera_status, ask, get_thumbnails)"
    )
    mcp.add_argument(
        "--http-port", type=int, help="serve streamable HTTP at http://HOST:PORT/mcp (bearer token) instead of stdio"
    )
    mcp.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default 127.0.0.1)")
    connection(mcp)
    mcp.set_defaults(func=cmd_mcp)

    health = sub.add_parser("health", help="gRPC health check of a running server (exit 0 when SERVING)")
    health.add_argument("--address", help="server address (default: VCFLASH_ADDRESS or 127.0.0.1:50051)")
    health.add_argument("--service", default="", help="a service name, e.g. vcflash.v1.Reasoner (default: all)")
    health.add_argument("--json", action="store_true", help="print address, service and status as JSON")
    tls(health)
    health.set_defaults(func=cmd_health)

    wait = sub.add_parser("wait", help="wait until a server is SERVING (exit 0), or time out (exit 1)")
    wait.add_argument("--address", help="server address (default: VCFLASH_ADDRESS or 127.0.0.1:50051)")
    wait.add_argument("--service", default="", help="a service name (default: all)")
    wait.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    tls(wait)
    wait.set_defaults(func=cmd_wait)

    video = sub.add_parser(
        "make-test-video", help="write a synthetic H.264 video: a red circle and a blue square (the tiny model knows)"
    )
    video.add_argument("path")
    video.add_argument("--seconds", type=float, default=16.0)
    video.add_argument("--fps", type=int, default=25)
    video.set_defaults(func=cmd_make_test_video)

    dataset = sub.add_parser("make-dataset", help="write a synthetic training and held-out set (videos + JSON lines)")
    dataset.add_argument(
        "kind",
        choices=("shapes", "order", "brief", "hard"),
        help="shapes: coloured shapes moving over textures; order: three shapes popping in 4 s or more apart, asked"
        " only which of two came first, the shape seen first answering half; brief: long 1 fps videos of such"
        " scenes, asked about brief events among distractors; hard: brief events among the clips --model's key"
        " index ranks highest for the question (the hard negatives a long-memory Ask shows it)",
    )
    dataset.add_argument("out")
    dataset.add_argument("--videos", type=int, default=1000, help="training videos (default 1000)")
    dataset.add_argument("--test-videos", type=int, help="held-out videos (default a fifth as many, at least 10)")
    dataset.add_argument(
        "--seconds",
        type=csv(float),
        help="lengths drawn from: shapes 8,8,8,8,16,24; order 16,24; brief 32,48,64,96,128",
    )
    dataset.add_argument("--fps", type=csv(int), default=(1,) * 9 + (10,), help="frame rates drawn from 1 x9, 10")
    dataset.add_argument("--seed", type=int, default=0)
    dataset.add_argument(
        "--jobs", type=int, help="processes encoding videos (default: one per CPU; the files are the same for any)"
    )
    dataset.add_argument(
        "--model", help="hard: the model whose key index ranks the distractors (tiny, a dir, a hub id)"
    )
    dataset.add_argument("--pool-clips", type=int, default=2000, help="hard: 4 s clips ranked per split (default 2000)")
    dataset.add_argument(
        "--hard-share", type=float, default=0.75, help="hard: share of distractors from the top of the ranking (0.75)"
    )
    dataset.add_argument(
        "--top-share", type=float, default=0.1, help="hard: the top of the ranking, as a share of the pool (0.1)"
    )
    dataset.set_defaults(func=cmd_make_dataset)

    tower = sub.add_parser(
        "pretrain-tower", help="teach a tiny model's vision tower the shapes scenes from per-patch labels (stage 0)"
    )
    tower.add_argument("--model", required=True, help="base checkpoint (make-tiny-checkpoint --preset shapes)")
    tower.add_argument("--out", required=True, help="the base with the trained tower, in the official layout")
    tower.add_argument("--steps", type=int, default=1000)
    tower.add_argument("--labels", type=csv(str), default=("shape", "colour"), help="of shape,colour,direction")
    tower.add_argument("--clips", type=int, default=16, help="rendered 4-frame scenes a step")
    tower.add_argument(
        "--mirror", action="store_true", help="train each rendered batch twice: as drawn, then mirrored left-right"
    )
    tower.add_argument("--lr", type=float, default=1e-3)
    tower.add_argument(
        "--min-lr-ratio", type=float, default=1.0, help="cosine decay to lr x this over the steps (1: constant)"
    )
    tower.add_argument("--seed", type=int, default=0)
    tower.add_argument("--eval-every", type=int, default=250)
    tower.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    tower.set_defaults(func=cmd_pretrain_tower)

    fit = sub.add_parser("train", help="fine-tune a checkpoint on LLaVA / VideoChat-Flash format JSON lines")
    fit.add_argument(
        "data",
        nargs="+",
        help="JSON lines: a video path and `conversations` of human/gpt turns per line; several files are mixed "
        "(one given twice counts twice)",
    )
    fit.add_argument("--model", required=True, help="base checkpoint: hub id, local dir or tiny")
    fit.add_argument("--out", required=True, help="where the checkpoint (or LoRA adapter) and OUT/last/ go")
    fit.add_argument("--eval", help="held-out JSON lines: loss and exact-match accuracy every --eval-every steps")
    fit.add_argument("--data-root", help="video paths are relative to this (default: each file's directory)")
    fit.add_argument("--train", type=csv(str), default=("projector", "llm"), help="parts: vision,projector,llm")
    fit.add_argument("--lora-rank", type=int, default=0, help="LoRA on the LLM with this rank (default 0: full)")
    fit.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 2 x rank)")
    fit.add_argument("--merge-lora", action="store_true", help="write merged weights, not an adapter")
    fit.add_argument("--epochs", type=float, default=1.0)
    fit.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    fit.add_argument("--lr", type=float, default=1e-4)
    fit.add_argument("--vision-lr", type=float, help="learning rate of the vision tower (default --lr)")
    fit.add_argument(
        "--optimizer",
        choices=("adamw", "muon"),  # hico.train.OPTIMIZERS, written out: building the parser loads no torch
        default="adamw",
        help="muon: Muon for the hidden matrices (half the steps on the tiny recipe), AdamW for the rest",
    )
    fit.add_argument("--warmup", type=float, default=0.03, help="warm-up, as a fraction of the steps")
    fit.add_argument("--videos-per-step", type=int, default=4)
    fit.add_argument("--questions-per-video", type=int, default=16, help="conversations sharing one encoding")
    fit.add_argument("--frames", type=int, default=512, help="frame budget per video, as ask --max-frames")
    fit.add_argument("--anchors", type=float, default=0.0, help="share of prompts with ask-live's wall-clock span")
    fit.add_argument(
        "--relevance", type=float, default=0.0, help="weight of the loss teaching the key index the lines' `moments`"
    )
    fit.add_argument("--eval-every", type=int, default=200, help="steps between evaluations and checkpoints")
    fit.add_argument("--eval-samples", type=int, default=64)
    fit.add_argument("--device", default="cpu")
    fit.add_argument("--dtype", help="default bfloat16 on CUDA, float32 on CPU (trained tensors stay float32)")
    fit.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="default: on for CUDA")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--resume", action="store_true", help="continue from OUT/last/")
    fit.add_argument("--bad-videos", choices=("skip", "fail"), default="skip", help="missing or corrupt videos")
    fit.add_argument(
        "--frame-cache", metavar="DIR", help="keep decoded frames here, so later runs on the same videos skip decoding"
    )
    fit.add_argument(
        "--compile", action="store_true", help="the LLM's forward through torch.compile (needs a C++ compiler on CPU)"
    )
    fit.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    fit.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="measure a model")
    evaluate_sub = evaluate.add_subparsers(dest="what", required=True)
    qa = evaluate_sub.add_parser("qa", help="exact-match accuracy per question category, with chance")
    qa.add_argument("data", help="JSON lines as for train (make-dataset's test.jsonl)")
    qa.add_argument("--model", help="hub id, local dir or tiny (offline)")
    qa.add_argument("--adapter", help="a LoRA adapter directory to apply to --model")
    qa.add_argument("--live", action="store_true", help="stream each video into a running server and ask-live")
    qa.add_argument(
        "--no-anchors", action="store_true", help="--live without the wall-clock span in the prompt (the offline one)"
    )
    qa.add_argument("--data-root", help="video paths are relative to this (default: the file's directory)")
    qa.add_argument("--max-frames", type=int, default=512)
    qa.add_argument("--device", default="cpu")
    qa.add_argument("--dtype", default="float32")
    qa.add_argument("--bad-videos", choices=("skip", "fail"), default="skip")
    qa.add_argument("--json", action="store_true", help="the table and every answer as JSON")
    connection(qa)
    qa.set_defaults(func=cmd_eval)
    niah = evaluate_sub.add_parser(
        "niah", help="needle in a haystack over live memory: each selection's answers, moments, recall and latency"
    )
    niah.add_argument("--frames", type=csv(int), default=(512, 2000, 10000, 30000), help="haystack lengths (1 fps)")
    niah.add_argument("--depths", type=csv(float), default=(0.0, 0.25, 0.5, 0.75, 1.0), help="needle depths, 0-1")
    niah.add_argument("--hops", type=csv(int), default=(1, 2), help="1: a needle; 2: a chain with 3 decoys")
    niah.add_argument(
        "--two-hop-frames", type=csv(int), help="the lengths two hops are run at (default: every --frames)"
    )
    niah.add_argument(
        "--selection",
        type=csv(str),
        default=("uniform", "retrieval", "scan", "index", "oracle"),
        help="selections asked on the same memory; oracle: each hop over only the needle's neighbourhood",
    )
    niah.add_argument("--trials", type=int, default=1, help="needles per (length, depth, hops)")
    niah.add_argument("--max-frames", type=int, default=512, help="each Ask's frame budget")
    niah.add_argument("--model", help="hub id, local dir or tiny (offline)")
    niah.add_argument("--adapter", help="a LoRA adapter directory to apply to --model")
    niah.add_argument("--redis", help="a Redis URL for the memory (default: an embedded store in a temporary dir)")
    niah.add_argument("--json", help="write the report (config, summary, cells, cost, every row) here")
    niah.add_argument("--heatmap", help="write answer accuracy per length x depth here (PNG)")
    niah.add_argument("--seed", type=int, default=0)
    niah.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    niah.add_argument("--device", default="cpu")
    niah.add_argument("--dtype", default="float32")
    niah.set_defaults(func=cmd_eval_niah)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # The error types are looked up only in modules already loaded: importing them would load torch
        # (hico) or grpc into commands that need neither.
        if isinstance(e, loaded("grpc", "RpcError")):
            print(f"vcflash: error: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
        usage = (FileNotFoundError, ValueError, TypeError, *loaded("hico.checkpoint", "CheckpointError"))
        if isinstance(e, usage + loaded("hico.tokenizer", "TokenizerLoadError")):
            print(f"vcflash: error: {e}", file=sys.stderr)
            return 2
        raise


def loaded(module: str, name: str) -> tuple[type[BaseException], ...]:
    """The exception class `module.name` if that module is already imported, else nothing."""
    m = sys.modules.get(module)
    return (getattr(m, name),) if m is not None else ()


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("vcflash")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
