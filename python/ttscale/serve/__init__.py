"""Serving: ``AsyncLLM`` (the engine for asyncio programs) and ``ttscale serve``, an
OpenAI-compatible HTTP server on it. The server needs the ``serve`` extra
(``pip install 'ttscale[serve]'``); ``AsyncLLM`` does not."""
