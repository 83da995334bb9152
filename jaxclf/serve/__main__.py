"""Serve a trained run over HTTP: `python -m jaxclf.serve --workdir RUN [--checkpoint best] [--port 8000]`.

Or an exported model, `--artefact PATH` instead of `--workdir` (StableHLO, ONNX or TFLite with its
PATH.json sidecar, see jaxclf.runs.artefact): a serving box then needs no checkpoint.

Endpoints: POST /v1/classify (multipart files, base64 JSON or one raw image; top_k), POST
/v1/explain, GET /v1/model, /healthz, /readyz (200 once every batch shape is compiled), /metrics
(Prometheus) and the demo page at /. Concurrent requests are batched: up to --max_batch images or
--max_wait_ms, padded to a compiled batch size.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from jaxclf.runs import artefact, inference
from jaxclf.serve.app import ServeSettings, create_app
from jaxclf.serve.model import from_loaded


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit status 0 when stopped, or 2 for a mistake in the arguments or workdir."""
    return inference.run_tool(_run, argv)


def _run(argv: Sequence[str]) -> int:
    import uvicorn  # the `serve` extra

    defaults = ServeSettings()
    parser = argparse.ArgumentParser(prog="python -m jaxclf.serve", description=__doc__.splitlines()[0])
    artefact.add_model_arguments(parser)
    parser.add_argument("--image_size", type=int, default=0,
                        help="side of the square images served, where the run's data.pp_eval leaves the size open")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="0: a free port, shown in uvicorn's start-up line")
    parser.add_argument("--max_batch", type=int, default=defaults.max_batch, help="images in one model call")
    parser.add_argument("--max_wait_ms", type=float, default=defaults.max_wait_ms,
                        help="longest an image waits for others to fill its batch; 0: no waiting")
    parser.add_argument("--max_upload_mb", type=float, default=defaults.max_upload_mb, help="largest request body (413 over it)")
    parser.add_argument("--max_images", type=int, default=defaults.max_images, help="images in one request (413 over it)")
    parser.add_argument("--decode_workers", type=int, default=defaults.decode_workers, help="threads decoding uploads")
    parser.add_argument("--max_image_pixels", type=int, default=0,
                        help="most pixels (width x height) an upload may declare in its header (413 over it, before "
                             "decoding); default: the run's config.data.max_image_pixels")
    args = parser.parse_args(argv)
    for flag in ("max_batch", "max_images", "decode_workers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: give at least 1")
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0:
        parser.error("--max_wait_ms must be >= 0 and --max_upload_mb > 0")
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb,
                             max_images=args.max_images, decode_workers=args.decode_workers)
    if args.max_image_pixels < 0:
        parser.error(f"--max_image_pixels {args.max_image_pixels}: give a positive number (0: the run's)")
    served = from_loaded(artefact.load_from_args(args), args.image_size or None, args.max_image_pixels or None)
    _log_to_stderr(logging.getLogger("jaxclf.serve"))
    print(f"serving {served.name} ({served.provenance['format']}, checkpoint step {served.step}, {len(served.class_names)} classes, input "
          f"{served.input_size[0]}x{served.input_size[1]}) on {f'http://{args.host}:{args.port}' if args.port else args.host}; "
          "/readyz answers 200 once "
          "every batch shape is compiled", file=sys.stderr, flush=True)
    uvicorn.run(create_app(served, settings), host=args.host, port=args.port, log_level="info")
    return 0


def _log_to_stderr(logger: logging.Logger) -> None:
    # Its own handler: JAX's absl logging owns the root logger's, at level WARNING.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())
