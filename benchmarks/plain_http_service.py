"""The service as shipped but served by uvicorn's stock httptools protocol (no header limits):
the "before" of the header-limit cost in `python -m benchmarks.security`.

service.py installs the bounded protocol when it is imported; this module, imported by the
worker in its place, puts uvicorn's own back before the worker builds its server."""

import uvicorn.config

from service import BankChurn

uvicorn.config.HTTP_PROTOCOLS["auto"] = "uvicorn.protocols.http.auto:AutoHTTPProtocol"
uvicorn.config.HTTP_PROTOCOLS["httptools"] = "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol"

__all__ = ["BankChurn"]
