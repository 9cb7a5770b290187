"""Planning time (``engine.plan``: read the manifest, read, decode and hash every distinct input,
key every job) for N distinct inputs on local disk and on moto's S3 server over HTTP.

The manifest pairs N - N/100 sources with N/100 references (source i with reference i mod
N/100), so every input is distinct and each is read once. S3 runs the same plan with the
manifest, the inputs and the output under an s3:// bucket of a ThreadedMotoServer on loopback,
the client pointed at it through the AWS_* variables as tests/fixtures_s3.py does. A count
smaller than 10 000 on S3 is extrapolated linearly to 10 000 and labelled so.
"""

from __future__ import annotations

import io
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import Section, tiny_model, write_image, write_manifest
from tests.fixtures_s3 import moto_s3  # the same moto server and AWS environment as the tests
from vct.batch import engine

SETTINGS = {"content": {"num_inference_steps": 2, "num_inner_steps": 0}, "threads": 1}


def _split(n: int) -> tuple[int, int]:
    refs = max(1, n // 100)
    return n - refs, refs


def _rows(sources: list[str], refs: list[str]) -> list[tuple[str, str, str]]:
    return [(s, refs[i % len(refs)], f"p{i:05d}") for i, s in enumerate(sources)]


_last_cpu = [0.0]


def _plan_seconds(manifest: str, out: str, model: str) -> tuple[float, int]:
    request = engine.prepare(manifest, out, model, SETTINGS, run_id="bench")
    start, cpu = time.perf_counter(), time.process_time()
    the_plan = engine.plan(request)
    seconds = time.perf_counter() - start
    _last_cpu[0] = time.process_time() - cpu
    if the_plan.errors:
        raise RuntimeError(f"planning refused rows: {the_plan.errors[:2]}")
    return seconds, len(the_plan.pairs)


def local(n: int, model: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="vct-bench-plan-") as tmp:
        root = Path(tmp)
        s_n, r_n = _split(n)
        srcs = [str(write_image(root / "in" / f"s{i:05d}.png", i, 16)) for i in range(s_n)]
        refs = [str(write_image(root / "in" / f"r{j:03d}.png", 100_000 + j, 16))
                for j in range(r_n)]
        manifest = write_manifest(root / "m.csv", _rows(srcs, refs))
        seconds, pairs = _plan_seconds(str(manifest), str(root / "out"), model)
    return {"inputs": n, "pairs": pairs, "seconds": seconds, "cpu_s": _last_cpu[0]}


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def s3(n: int, model: str) -> dict:
    import boto3

    with moto_s3() as endpoint:
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        s_n, r_n = _split(n)
        keys = [f"in/s{i:05d}.png" for i in range(s_n)] + [f"in/r{j:03d}.png"
                                                           for j in range(r_n)]
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[1],
                                                       Body=_png(kv[0])), enumerate(keys)))
        upload_s = time.perf_counter() - start
        uris = [f"s3://{bucket}/{k}" for k in keys]
        rows = _rows(uris[:s_n], uris[s_n:])
        body = "source,reference,output_name\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows)
        client.put_object(Bucket=bucket, Key="m.csv", Body=body.encode())
        model_dir = model  # the model stays local: planning reads only its identity
        seconds, pairs = _plan_seconds(f"s3://{bucket}/m.csv", f"s3://{bucket}/out", model_dir)
    return {"inputs": n, "pairs": pairs, "seconds": seconds, "cpu_s": _last_cpu[0],
            "upload_s": upload_s}


def measure(local_n: int = 10_000, s3_n: int = 10_000) -> Section:
    sec = Section("planning")
    model = tiny_model()
    loc = local(local_n, model)
    sec.data["local"] = loc
    sec.data["seconds_10k_local"] = loc["seconds"] * 10_000 / local_n
    if local_n != 10_000:
        sec.data["seconds_10k_local_note"] = f"extrapolated linearly from {local_n} inputs"
    if s3_n:
        remote = s3(s3_n, model)
        sec.data["s3"] = remote
        sec.data["seconds_10k_s3"] = remote["seconds"] * 10_000 / s3_n
        if s3_n != 10_000:
            sec.data["seconds_10k_s3_note"] = f"extrapolated linearly from {s3_n} inputs"
    sec.target("planning.seconds_10k_local", sec.data["seconds_10k_local"], "<=", 30.0,
               sec.data.get("seconds_10k_local_note", "measured at 10 000 inputs"))
    label = "" if s3_n == 10_000 else f" (extrapolated from {s3_n})"
    sec.row(f"plan {local_n} local inputs s", f"{loc['seconds']:.1f} (CPU {loc['cpu_s']:.1f})")
    if s3_n:
        sec.row(f"plan {s3_n} S3 (moto) inputs s",
                f"{sec.data['s3']['seconds']:.1f}; 10 000: {sec.data['seconds_10k_s3']:.1f}"
                f"{label} (upload {sec.data['s3']['upload_s']:.1f})")
    return sec
