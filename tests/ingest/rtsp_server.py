"""A camera-like RTSP server on 127.0.0.1 for ingest tests and benchmarks: a live H.264 test pattern.

Run with Debian's ``/usr/bin/python3`` (PyGObject and GstRtspServer are system packages, not in the
venv). Prints ``ready <port>`` once it listens; stop it with SIGTERM or SIGKILL.

    /usr/bin/python3 tests/ingest/rtsp_server.py 8554 /cam [--auth user:password] [--clock-offset SECONDS]

``--clock-offset`` makes it a camera whose clock is that far off: its RTCP sender reports (the NTP time each
report pairs with an RTP timestamp) read this host's clock plus the offset.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, GObject, Gst, GstRtspServer  # noqa: E402

Gst.init(None)  # before a GStreamer class is subclassed below

NTP_EPOCH_S = 2208988800  # 1900-01-01 (NTP's epoch) to 1970-01-01 (Unix's)
PIPELINE = (
    "( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},framerate={fps}/1"
    " ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} ! rtph264pay name=pay0 pt=96 )"
)


class ClockTimeMedia(GstRtspServer.RTSPMedia):
    """A media whose sender reports carry its pipeline clock's time as the NTP time (rtpbin's default is this
    host's real-time clock): with the clock from :func:`offset_clock`, a camera whose clock is off."""

    def do_setup_rtpbin(self, rtpbin: Gst.Element) -> bool:
        rtpbin.set_property("ntp-time-source", "clock-time")
        return True


def offset_clock(offset_s: float) -> Gst.Clock:
    """This host's real-time clock plus ``offset_s``, counted from NTP's epoch (what "clock-time" sends as is)."""
    clock = GObject.new(Gst.SystemClock, clock_type=Gst.ClockType.REALTIME)
    clock.set_calibration(0, round((NTP_EPOCH_S + offset_s) * Gst.SECOND), 1, 1)  # time = internal + offset
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("mount", help="path of the stream, e.g. /cam")
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="require HTTP basic auth")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--gop", type=int, default=25, help="frames between keyframes")
    parser.add_argument(
        "--clock-offset", type=float, metavar="SECONDS", help="sender reports carry this host's clock plus SECONDS"
    )
    args = parser.parse_args()

    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")  # loopback only
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE.format(width=args.width, height=args.height, fps=args.fps, gop=args.gop))
    factory.set_shared(True)  # one encoder for all clients, like a camera
    if args.clock_offset is not None:
        factory.set_media_gtype(ClockTimeMedia)
        factory.set_clock(offset_clock(args.clock_offset))
    if args.auth:
        user, _, password = args.auth.partition(":")
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        permissions.add_role_from_structure(
            Gst.Structure.from_string("viewer, media.factory.access=true, media.factory.construct=true")[0]
        )
        factory.set_permissions(permissions)
    server.get_mount_points().add_factory(args.mount, factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{args.port}")

    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)
    print(f"ready {args.port}", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
