"""``ttscale serve``: load the model (and PRM), build the app, run uvicorn until SIGTERM.

On SIGTERM the server stops taking requests (503 to any that still arrive), lets the ones in
flight finish within the grace period, and exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

SERVE_EXTRA = ("fastapi", "uvicorn", "sse_starlette", "prometheus_client")


def missing_modules() -> list[str]:
    import importlib.util

    return [m for m in SERVE_EXTRA if importlib.util.find_spec(m) is None]


def run(args) -> int:
    missing = missing_modules()
    if missing:
        print(f"ttscale serve: needs the serve extra ({', '.join(missing)} missing): "
              "pip install 'ttscale[serve]'", file=sys.stderr)
        return 1
    import uvicorn

    from ttscale.serve.app import ServerConfig, build_app
    from ttscale.serve.async_llm import AsyncLLM

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, prm_dir, prm_format, delimiter = resolve_models(args)
    engine = AsyncLLM(model, device=args.device, dtype=args.dtype, seed=args.seed, max_n=args.max_n,
                      **({"memory_share": 0.6} if prm_dir is not None and args.device != "cpu"
                         and _on_gpu(args.device) else {}))
    prm = None
    if prm_dir is not None:
        import ttscale

        prm = ttscale.PRM(prm_dir, format=prm_format, device=args.device, dtype=args.dtype,
                          **({"memory_share": 0.4} if _on_gpu(args.device) else {}))
    config = ServerConfig(
        model_name=args.served_model_name or ("toy" if args.model == "toy" else os.path.basename(
            os.path.normpath(args.model))),
        api_key=args.api_key or os.environ.get("TTSCALE_API_KEY") or None,
        max_queue=args.max_queue, max_n=args.max_n, default_max_tokens=args.max_tokens,
        step_delimiter=delimiter, prm=prm)
    app = build_app(engine, config)
    state = app.state.ttscale

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state["draining"] = True  # new requests get 503; in-flight ones finish
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", [])
            if sig == signal.SIGTERM and sig in captured:
                captured.remove(sig)  # a drained SIGTERM is a clean exit (0), not a re-raised signal

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"ttscale serve: ready at http://{host}:{port} (model {config.model_name!r}"
                      f"{', PRM ' + str(prm_dir) if prm_dir else ''})", flush=True)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                   timeout_graceful_shutdown=args.grace, access_log=False))
    server.run()
    engine.shutdown()
    return 0


def _on_gpu(device) -> bool:
    import torch

    return (device is None and torch.cuda.is_available()) or (device is not None and str(device).startswith("cuda"))


def resolve_models(args):
    """The policy's and PRM's folders, the PRM format and the step delimiter; ``toy`` names the
    embedded models (the PRM's format math-shepherd, the task's step delimiter)."""
    from ttscale.toy import policy_dir, prm_dir, task

    model = policy_dir() if args.model == "toy" else args.model
    prm, prm_format = args.prm, args.prm_format
    if prm == "toy":
        prm, prm_format = prm_dir(), prm_format or "math-shepherd"
    delimiter = args.step_delimiter
    if delimiter is None:
        delimiter = task.STEP_DELIMITER if args.model == "toy" else "\n\n"
    return model, prm, prm_format, delimiter
