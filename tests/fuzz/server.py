"""The fuzz suite's server process (run as a script, not collected by pytest).

`vcflash up` (`vcflash.app.App`) with a tiny model generated into the work dir, plus the Encoder service that
`vcflash up` does not serve, sharing the model, over a memory of its own. Settings come from `VCFLASH_*`
variables as they do for `vcflash up`. Everything the process writes to stderr is the log the tests search for
secrets and tracebacks: Python logging at DEBUG, FFmpeg's and gRPC's own output. Prints one JSON line with the
ports on stdout once both serve, then serves until SIGTERM.

    python tests/fuzz/server.py WORK_DIR
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from encoder_svc.server import EncoderService
from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from vcflash.app import App
from vcflash.serve.settings import Settings


async def serve(work: Path) -> None:
    model = await asyncio.to_thread(lambda: VideoChatFlash.from_pretrained(make_tiny_checkpoint(work / "tiny")))
    app = App(Settings.from_env(), model, registry=CollectorRegistry())
    await app.start()
    encoder_settings = Settings.from_env(address="127.0.0.1:0", http_port=0, data_dir=work / "encoder-data")
    encoder = EncoderService(encoder_settings, CollectorRegistry())
    encoder.model = model
    await encoder.start()
    print(json.dumps({"grpc": app.port, "encoder": encoder.port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await encoder.stop(1.0)
        await app.stop(1.0)


def main() -> None:
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
