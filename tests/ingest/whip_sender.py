"""A WHIP sender in a process of its own, for tests that kill it: an aiortc peer sending a test pattern.

    .venv/bin/python tests/ingest/whip_sender.py http://127.0.0.1:PORT/whip/NAME TOKEN

Its ICE candidates stay on 127.0.0.1. Prints ``published`` once the server's answer is applied, then sends
until killed: SIGKILL leaves the server no DELETE, no RTCP BYE and no DTLS close, as a crashed encoder or a
pulled cable would.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import ClientSession
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

from ingest.webrtc import ice_host_addresses


async def main(url: str, token: str) -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    with ice_host_addresses(["127.0.0.1"]):
        await pc.setLocalDescription(await pc.createOffer())
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/sdp"}
    async with ClientSession() as http, http.post(url, data=pc.localDescription.sdp, headers=headers) as response:
        answer = await response.text()
        if response.status != 201:
            sys.exit(f"WHIP answered {response.status}: {answer}")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    print("published", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))
