"""Live ingest: RTSP (PyAV) and WebRTC (aiortc, WHIP) streams sampled into 4-frame clips (issue 4)."""
