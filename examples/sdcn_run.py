#!/usr/bin/env python3
"""Send one SDCN job to a gateway and save the images.

    sdcn_run.py txt2img PARAMS.json OUT.png
    sdcn_run.py img2img PARAMS.json INIT.png OUT.png

PARAMS.json holds the SDCN parameters (see params-txt2img.json); for img2img the init image
is read from INIT.png. Every returned image is written: OUT.png, OUT-1.png, ... The gateway is
--gateway URL, else $SDCN_GATEWAY, else http://127.0.0.1:8080. On failure the gateway's
message is printed and the exit status is 1. Standard library only: copy it anywhere.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_GATEWAY = "http://127.0.0.1:8080"


def output_paths(out: Path, count: int) -> list[Path]:
    """OUT.png, OUT-1.png, OUT-2.png, ... for `count` images."""
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count)]


def run(kind: str, params: dict, gateway: str, timeout: float) -> dict:
    """POST the job; return the gateway's JSON answer (raises RuntimeError with its msg)."""
    request = urllib.request.Request(
        f"{gateway.rstrip('/')}/{kind}",
        data=json.dumps(params).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("msg", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        raise RuntimeError(f"{exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise RuntimeError(f"cannot reach the gateway at {gateway}: {exc.reason}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Send one SDCN job to a gateway.")
    parser.add_argument("kind", choices=("txt2img", "img2img"))
    parser.add_argument("params", type=Path, help="JSON file of SDCN parameters")
    parser.add_argument("files", type=Path, nargs="+", help="[INIT.png] OUT.png")
    parser.add_argument("--gateway", default=os.environ.get("SDCN_GATEWAY", DEFAULT_GATEWAY))
    parser.add_argument("--timeout", type=float, default=600, help="seconds (default 600)")
    args = parser.parse_args(argv)
    wanted = 2 if args.kind == "img2img" else 1
    if len(args.files) != wanted:
        parser.error("img2img takes INIT.png OUT.png" if wanted == 2 else "txt2img takes OUT.png")
    try:
        params = json.loads(args.params.read_text())
        if args.kind == "img2img":
            params["init_image"] = base64.b64encode(args.files[0].read_bytes()).decode()
    except (OSError, ValueError) as exc:
        print(f"sdcn_run: {exc}", file=sys.stderr)
        return 1
    try:
        answer = run(args.kind, params, args.gateway, args.timeout)
    except RuntimeError as exc:
        print(f"sdcn_run: {exc}", file=sys.stderr)
        return 1
    images = answer.get("images") or []
    for path, image in zip(output_paths(args.files[-1], len(images)), images, strict=True):
        path.write_bytes(base64.b64decode(image))
        print(path)
    info = answer.get("info", {})
    print(
        f"seed {info.get('seed')}, model {info.get('model')}, provider {info.get('provider')}, "
        f"{info.get('run_ms')} ms",
        file=sys.stderr,
    )
    return 0 if images else 1


if __name__ == "__main__":
    raise SystemExit(main())
