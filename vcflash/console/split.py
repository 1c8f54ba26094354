"""`vcflash ingest` with the web console and the OpenAI-compatible chat API (`vcflash.openai_api`): the split
deployment's console, on ingest's HTTP port.

Ingest runs the cameras and reads the memory (clips, thumbnails, recordings), so the cameras and timeline pages are
served as in `vcflash up`, by the same `Console`; only the chat differs: it asks the reasoner service over gRPC
(`RemoteAnswers`, VCFLASH_REASONER_ADDRESS). No model, no torch: this runs in the ingest image.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ingest.server import IngestService
from vcflash.console.remote import RemoteAnswers
from vcflash.console.server import add_console
from vcflash.openai_api import add_openai_api
from vcflash.serve.lifecycle import ServiceEntry


class IngestWithConsole(IngestService):
    """The ingest service, and on its HTTP port (VCFLASH_HTTP_PORT; 0: neither) the web console and the chat API."""

    answers: RemoteAnswers | None = None

    async def setup(self) -> tuple[list[ServiceEntry], list[Any]]:
        services, tasks = await super().setup()
        s = self.settings
        if s.server.http_port:
            self.answers = RemoteAnswers(
                s.link.reasoner_address,
                token=s.server.api_token or "",
                tls_ca=s.link.tls_ca,
                max_question_chars=s.reasoner.max_question_chars,
                max_message_bytes=s.server.max_message_bytes,
                registry=self.registry,
            )
            tasks.append(self.answers.watch())
        return services, tasks

    def extend_http(self, app: web.Application) -> None:
        if self.answers is not None:
            add_console(app, self.streams, self.answers, self.settings.server)
            add_openai_api(app, self.answers, self.settings, self.store)

    async def stop(self, grace_s: float = 5.0) -> None:
        await super().stop(grace_s)
        if self.answers is not None:
            await self.answers.close()
