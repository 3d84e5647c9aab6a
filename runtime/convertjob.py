"""The conversion Job's command: fetch a version's source, convert it, publish the package.

``python -m modelyard.runtime.convertjob --source URI ...`` is what the operator's
conversion Job runs (``operator/conversion.py`` renders it) in the runtime image:

1. fetch the source from its store and verify its digest (``storage.fetch``, as the
   runtime does);
2. compile, verify and measure it (``convert.convert``: nothing is written unless the
   package reproduces the source within the tolerance);
3. publish the package next to the source, content-addressed:
   ``<source's folder>/aoti/<sha256>.pt2`` and its manifest beside it, in the same store
   (``file://`` and mounted ``pvc://`` paths, or ``s3://``; an ``http(s)://`` store is
   read only, and the API refuses it for conversion);
4. report, as the container's termination message (``/dev/termination-log``, or
   ``$MODELYARD_TERMINATION_LOG``), a JSON summary the operator reads from the pod's
   status: the package's URI and digest, the source's digest, the speed-up and the
   accuracy delta. A failure reports ``{"error": ...}`` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelyard.runtime import storage
from modelyard.runtime.convert import (
    QUANTIZE,
    SOURCE_FORMATS,
    ConvertOptions,
    VerificationFailed,
    convert,
    manifest_file,
)
from modelyard.runtime.errors import ConfigError, ModelLoadError, StorageError

__all__ = ["artifact_uri", "main", "publish"]

log = logging.getLogger(__name__)

TERMINATION_LOG = "/dev/termination-log"
MESSAGE_LIMIT = 4096  # what a kubelet keeps of a termination message


def artifact_uri(uri: str, sha256: str) -> str:
    """Where the package converted from ``uri`` goes: beside it, named by its digest."""
    return f"{uri.rsplit('/', 1)[0]}/aoti/{sha256}.pt2"


def publish(package: Path, manifest: Path, source_uri: str, sha256: str) -> str:
    """Write the package (then its manifest) next to the source; returns its URI."""
    target = artifact_uri(source_uri, sha256)
    parsed = urllib.parse.urlparse(target)
    if parsed.scheme in ("", "file"):
        path = Path(urllib.parse.unquote(parsed.path) if parsed.scheme else target)
        path.parent.mkdir(parents=True, exist_ok=True)
        for src, dest in ((package, path), (manifest, manifest_file(path))):
            partial = dest.with_name(f".{dest.name}.partial")
            shutil.copyfile(src, partial)
            partial.replace(dest)
        return target
    if parsed.scheme == "s3":
        _upload_s3(parsed.netloc, parsed.path.lstrip("/"), package, manifest)
        return target
    raise StorageError(f"cannot write a converted package to {target}: a {parsed.scheme}:// "
                       "store is read only (use s3://, pvc:// or file://)")


def _upload_s3(bucket: str, key: str, package: Path, manifest: Path) -> None:
    import boto3  # type: ignore[import-untyped]
    import botocore.exceptions  # type: ignore[import-untyped]

    client = boto3.client("s3")  # AWS_* variables, AWS_ENDPOINT_URL
    try:
        client.upload_file(str(package), bucket, key)
        client.upload_file(str(manifest), bucket, key + ".manifest.json")
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError,
            boto3.exceptions.S3UploadFailedError) as error:
        raise StorageError(f"cannot write s3://{bucket}/{key}: {error}") from None


def _report(value: dict[str, Any]) -> None:
    text = json.dumps(value, separators=(",", ":"))
    if len(text) > MESSAGE_LIMIT:
        value = {k: v for k, v in value.items() if k != "error"} | {
            "error": str(value.get("error", ""))[: MESSAGE_LIMIT // 2]}
        text = json.dumps(value, separators=(",", ":"))[:MESSAGE_LIMIT]
    path = Path(os.environ.get("MODELYARD_TERMINATION_LOG", TERMINATION_LOG))
    try:
        path.write_text(text)
    except OSError as error:  # outside a pod: the report still goes to stdout
        log.warning("cannot write the termination message to %s: %s", path, error)
    print(text, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modelyard.runtime.convertjob",
        description="Convert a model version into a verified AOTInductor package and publish "
                    "it next to its source (the operator's conversion Job).")
    parser.add_argument("--source", required=True, help="the source's URI, as the pod sees it")
    parser.add_argument("--publish-as", help="the source's URI in its store, when the pod sees "
                                             "it elsewhere (pvc://CLAIM/PATH mounted)")
    parser.add_argument("--sha256", help="the source's expected digest")
    parser.add_argument("--format", choices=SOURCE_FORMATS, required=True)
    parser.add_argument("--entry-point")
    parser.add_argument("--metadata")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--quantize", choices=QUANTIZE)
    parser.add_argument("--tolerance", type=float)
    parser.add_argument("--device", default=os.environ.get("MODELYARD_DEVICE", "auto"))
    parser.add_argument("--bench-seconds", type=float, default=1.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cache = Path(os.environ.get("MODELYARD_CACHE_DIR") or tempfile.gettempdir()) / "convert"
    summary: dict[str, Any] = {"source": args.publish_as or args.source}
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        _report(summary | {"error": f"no C++ compiler ({compiler}) in this image: compiling a "
                                    "package needs one; set spec.model.convert.image to an "
                                    "image with modelyard's runtime and g++"})
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="modelyard-convertjob-"))
    try:
        source = storage.fetch(args.source, cache, args.sha256)
        options = ConvertOptions(
            source=source, source_format=args.format, entry_point=args.entry_point,
            metadata=args.metadata, max_batch=args.max_batch, quantize=args.quantize,
            device=args.device, tolerance=args.tolerance, bench_seconds=args.bench_seconds)
        package = workdir / "model.pt2"
        manifest = convert(options, package)
        publish(package, manifest_file(package), args.source, manifest["sha256"])
        uri = artifact_uri(args.publish_as or args.source, manifest["sha256"])
    except VerificationFailed as error:
        verification = error.verification
        summary |= {"error": str(error), "accuracyDelta": verification.accuracy_delta,
                    "tolerance": verification.tolerance}
        _report(summary)
        return 1
    except (ConfigError, ModelLoadError, StorageError) as error:
        _report(summary | {"error": str(error)})
        return 1
    except Exception as error:  # a compiler's or torch's own failure: its first line
        log.exception("the conversion failed")
        first = (str(error).strip().splitlines() or [""])[0][:1000]
        _report(summary | {"error": f"{type(error).__name__}: {first}"})
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    performance = manifest["performance"]
    _report(summary | {
        "sourceSha256": manifest["source"]["sha256"],
        "artifactUri": uri, "artifactSha256": manifest["sha256"],
        "speedup": performance.get("speedupMaxBatch"),
        "speedupBatch1": performance.get("speedupBatch1"),
        "accuracyDelta": manifest["verification"]["accuracyDelta"],
        "tolerance": manifest["verification"]["tolerance"],
        "compileSeconds": manifest["compileSeconds"],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
