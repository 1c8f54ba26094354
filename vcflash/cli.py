"""The `vcflash` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy: commands that only talk gRPC never load torch or transformers
    from vcflash.client import Client
    from vcflash.serve.settings import Settings

# Per command: the default gRPC port and metrics port, so the split deployment's three processes can share one
# host. VCFLASH_ADDRESS / VCFLASH_METRICS_PORT, then --port / --metrics-port, override them.
SERVICE_PORTS = {"up": (50051, 9464), "ingest": (50051, 9464), "encoder": (50052, 9465), "reasoner": (50053, 9466)}


def cmd_ask(args: argparse.Namespace) -> int:
    from hico import VideoChatFlash
    from hico.checkpoint import DEFAULT_MODEL

    model = VideoChatFlash.from_pretrained(args.model or DEFAULT_MODEL, dtype=args.dtype, device=args.device)
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

    print(make_tiny_checkpoint(args.dir, res=args.res, seed=args.seed))
    return 0


def cmd_make_test_video(args: argparse.Namespace) -> int:
    from vcflash.media import write_test_video

    print(write_test_video(args.path, seconds=args.seconds, fps=args.fps))
    return 0


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
    elif args.command == "ingest":
        from ingest.server import IngestService

        service = IngestService(settings)
    elif args.command == "encoder":
        from encoder_svc.server import EncoderService

        service = EncoderService(settings)
    else:
        from reasoner.server import ReasonerService

        service = ReasonerService(settings)
    try:
        asyncio.run(run(service))
    except PortInUse as e:
        print(f"vcflash: error: {e}", file=sys.stderr)
        return 2
    return 0


def client(args: argparse.Namespace, reasoner: bool = False) -> Client:
    from vcflash.client import Client
    from vcflash.serve.settings import ClientSettings

    settings = ClientSettings.from_env(api_token=args.token, tls_ca=tls_ca(args))
    address = args.address or (settings.reasoner_address if reasoner else None) or settings.address
    return Client(address, settings.token(), tls_ca=settings.tls_ca)


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
            )
            print(f"{s.stream_id}: {s.state} ({s.source}, {s.fps:g} fps)")
        elif args.action == "rm":
            c.remove_stream(args.name, delete_memory=args.delete_memory)
            print(f"{args.name}: removed")
        elif args.json:
            from google.protobuf.json_format import MessageToDict

            stats = {m.stream_id: MessageToDict(m, preserving_proto_field_name=True) for m in c.stats()}
            streams = []
            for s in c.list_streams():
                d = MessageToDict(s, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                streams.append(d | {"memory": stats.get(s.stream_id)})
            print(json.dumps(streams, indent=2))
        else:
            stats = {m.stream_id: m for m in c.stats()}
            for s in c.list_streams():
                dropped = sum(s.frames_dropped.values())
                mem = stats.get(s.stream_id)
                print(
                    f"{s.stream_id}\t{s.state}\t{s.source}\t{s.fps:g} fps\tframes in {s.frames_in}, "
                    f"sampled {s.frames_sampled}, dropped {dropped}\tclips stored {s.clips_stored}"
                    + (f", in memory {mem.clips} ({mem.bytes / 1e6:.1f} MB)" if mem else "")
                    + (f"\terror: {s.error}" if s.error else "")
                )
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


def parse_time(value: str) -> tuple[float, bool]:
    """Seconds of media time, or an ISO date-time (then on the wall clock)."""
    from datetime import UTC, datetime

    try:
        return float(value), False
    except ValueError:
        t = datetime.fromisoformat(value)
        return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp(), True


def cmd_ask_live(args: argparse.Namespace) -> int:
    from hico.prompt import wall_clock

    start, wall_a = parse_time(args.start) if args.start else (None, False)
    end, wall_b = parse_time(args.end) if args.end else (None, False)
    with client(args, reasoner=True) as c:
        result = None
        for event in c.ask(
            args.stream,
            args.question,
            start=start,
            end=end,
            wall_clock=args.wall or wall_a or wall_b,
            max_frames=args.max_frames,
            retrieval=args.retrieval,
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
        "'tiny' makes and uses a random tiny checkpoint",
    )
    ask.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    ask.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    ask.add_argument("--max-frames", type=int, default=512, help="frame budget, about 1 fps up to this (512)")
    ask.add_argument("--start", type=float, help="only look at the video from this second")
    ask.add_argument("--end", type=float, help="only look at the video up to this second")
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
    add.add_argument("--keyframes-only", action="store_true", help="decode keyframes only (cheap at 1 fps)")
    add.add_argument("--listen", action="store_true", help="RTSP push: wait for a publisher on the URL's port")
    rm = streams_sub.add_parser("rm", help="stop a stream")
    rm.add_argument("name")
    rm.add_argument("--delete-memory", action="store_true", help="also forget its clips")
    ls = streams_sub.add_parser("ls", help="list streams with their counters")
    ls.add_argument("--json", action="store_true", help="print the streams and their memory as JSON")
    for p in (add, rm, ls):
        connection(p)
    streams.set_defaults(func=cmd_streams)

    live = sub.add_parser("ask-live", help="ask a running server about its streams' memory")
    live.add_argument("question")
    live.add_argument("--stream", action="append", required=True, help="stream name; repeat for several cameras")
    live.add_argument("--from", dest="start", help="start: media seconds, or an ISO date-time (wall clock)")
    live.add_argument("--to", dest="end", help="end: media seconds, or an ISO date-time (wall clock)")
    live.add_argument("--wall", action="store_true", help="read --from/--to as Unix seconds on the wall clock")
    live.add_argument("--max-frames", type=int, default=512)
    live.add_argument(
        "--retrieval", action="store_true", help="uniform backbone plus the clips closest to the question"
    )
    live.add_argument("--compress", help="visual dropout: off, recommended or TYPE:LAYERS:RATIOS")
    live.add_argument("--max-new-tokens", type=int, default=512)
    live.add_argument("--json", action="store_true", help="print only the result (answer, evidence, timings) as JSON")
    connection(live)
    live.set_defaults(func=cmd_ask_live)

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

    video = sub.add_parser("make-test-video", help="write a synthetic H.264 test video")
    video.add_argument("path")
    video.add_argument("--seconds", type=float, default=80.0)
    video.add_argument("--fps", type=int, default=25)
    video.set_defaults(func=cmd_make_test_video)
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
