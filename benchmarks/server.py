"""MONAI Label app under load: the same 8 requests serially, then 4 and then 8 at a time, one server.

    python benchmarks/server.py [--work DIR] [--max-new-tokens 160] [--format-steps 150] [--seed 0]
                                [--max-concurrent N] [--port 0]

Starts ONE real ``monailabel start_server`` on monailabel_app/ with the tiny format-trained CRM from
``medreasoner make-tiny`` (built once, cached under ``--work``) and LiteMedSAM (real weights), then sends
8 requests over HTTP for datastore images: 4 questions about a 2D slice (PNG) and 4 about a small volume
(NIfTI, a given key slice and a narrow slice range so box tracking stays short), 8 different questions.
Each phase has its own copy of the two images, differing only in a 2x2 corner patch, so no phase reuses
another's cached embeddings while the models see the same picture. ``--stock-route`` measures MONAI
Label 0.8.5's own infer route instead of the app's threaded one.

Printed per phase: wall time, throughput, p50/p95 latency, CRM calls and ASM encodes (summed from the
result records' ``counts``), statuses, the slowest ``GET /info/`` answered meanwhile; then the server's peak RSS (VmHWM of its PID) and the ratio of
8-at-a-time throughput to serial (target >= 1.5x). A benchmark, not a test: PASS/MISS is printed and
the exit status is 0 either way.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, tiny_crm  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TASK = "medreasoner"
QUESTIONS_2D = (
    "Which organ would explain the patient's jaundice?",
    "Where would a pleural effusion collect?",
    "Which structure explains the shortness of breath?",
    "Which organ is enlarged in this patient with right upper quadrant pain?",
)
QUESTIONS_3D = (
    "Which part of the brain would explain this patient's difficulty producing speech?",
    "Which organ is most likely affected in a patient with hepatitis?",
    "Where is the lesion causing the headache?",
    "Which structure would explain the loss of vision?",
)
VOLUME_OPTIONS = {"key_slice": "3", "slice_range": "2:5", "n_candidates": 1}
RATIO_TARGET = 1.5
PHASES = (1, 4, 8)


def write_inputs(folder: Path, phase: int) -> tuple[Path, Path]:
    """(2D PNG, NIfTI volume): the same picture every phase but a phase-valued 2x2 corner patch."""
    import SimpleITK as sitk
    from PIL import Image

    rng = np.random.default_rng(0)
    n, size = 8, 64
    z, y, x = np.ogrid[0:n, 0:size, 0:size]
    vol = 60 + 20 * rng.random((n, size, size))
    vol += 250 * ((((y - size / 2) / (0.45 * size)) ** 2 + ((x - size / 2) / (0.4 * size)) ** 2) <= 1)
    vol += 500 * ((((y - 0.4 * size) / (0.15 * size)) ** 2 + ((x - 0.6 * size) / (0.12 * size)) ** 2
                   + ((z - n / 2) / (0.45 * n)) ** 2) <= 1)
    vol[:, :2, :2] = 150 + 20 * phase  # inside the window, so every phase's slices differ
    image = sitk.GetImageFromArray(vol.astype(np.int16))
    image.SetSpacing((0.9, 0.9, 3.0))
    volume = folder / f"volume_p{phase}.nii.gz"
    sitk.WriteImage(image, str(volume))
    grey = vol[n // 2]
    grey = (255 * (grey - grey.min()) / (grey.max() - grey.min())).astype(np.uint8)
    grey[:2, :2] = 100 + 20 * phase
    png = folder / f"slice_p{phase}.png"
    Image.fromarray(grey).save(png)
    return png, volume


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(studies: Path, port: int, conf: dict[str, str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO / "monailabel_app"),
           "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]
    for k, v in conf.items():
        cmd += ["--conf", k, v]
    out = open(log, "wb")  # noqa: SIM115 - the server writes to it for its whole life
    return subprocess.Popen(cmd, cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                 "MONAI_LABEL_SESSION_PATH": str(studies.parent / "sessions")})


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> float:
    import requests

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"server exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if requests.get(url + "/info/", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.5)
    sys.exit(f"server not ready in {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")


def peak_rss_mib(pid: int) -> tuple[float, float]:
    """(peak, current) resident set of the server process, from /proc (psutil when /proc is absent)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
        return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        import psutil

        rss = psutil.Process(pid).memory_info().rss / 2**20
        return rss, rss


def ask(url: str, image: str, query: str, options: dict) -> dict:
    import requests
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    t0 = time.perf_counter()
    r = requests.post(f"{url}/infer/{TASK}", params={"image": image},
                      data={"params": json.dumps({"query": query, **options})}, timeout=1800)
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        return {"query": query, "seconds": seconds, "http": r.status_code, "error": r.text[:300]}
    record = {}
    for part in MultipartDecoder.from_response(r).parts:
        if b"filename=" not in part.headers.get(b"Content-Disposition", b""):
            record = json.loads(part.content)
    return {"query": query, "seconds": seconds, "http": 200, "record": record}


def probe_info(url: str, stop: threading.Event, seconds: list[float]) -> None:
    """GET /info/ every 0.25 s while a phase runs: how long the server keeps other clients waiting."""
    import requests

    while not stop.is_set():
        t0 = time.perf_counter()
        requests.get(url + "/info/", timeout=1800)
        seconds.append(time.perf_counter() - t0)
        stop.wait(0.25)


def run_phase(url: str, phase: int, concurrency: int) -> dict:
    png, volume = f"slice_p{phase}", f"volume_p{phase}"  # datastore ids (file names without suffix)
    jobs = [(png, q, {}) for q in QUESTIONS_2D] + [(volume, q, VOLUME_OPTIONS) for q in QUESTIONS_3D]
    stop, info_s = threading.Event(), []
    prober = threading.Thread(target=probe_info, args=(url, stop, info_s), daemon=True)
    prober.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda job: ask(url, *job), jobs))
    wall = time.perf_counter() - t0
    stop.set()
    prober.join()
    lat = np.array([a["seconds"] for a in answers])
    records = [a.get("record", {}) for a in answers]
    mixed = sum(1 for a, r in zip(answers, records) if r and r.get("query") != a["query"])
    statuses: dict[str, int] = {}
    for a, r in zip(answers, records):
        key = r.get("status") if a["http"] == 200 else f"http {a['http']}"
        statuses[key] = statuses.get(key, 0) + 1
    return {"concurrency": concurrency, "n": len(jobs), "wall": wall, "throughput": len(jobs) / wall,
            "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "crm_calls": sum(r.get("counts", {}).get("crm_calls", 0) for r in records),
            "asm_encodes": sum(r.get("counts", {}).get("asm_encodes", 0) for r in records),
            "statuses": statuses, "mixed": mixed, "info_max": max(info_s, default=float("nan")),
            "errors": [a["error"] for a in answers if a["http"] != 200][:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "medreasoner_bench"))
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--format-steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-concurrent", type=int, default=None, help="--conf max_concurrent (app default 4)")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--stock-route", action="store_true",
                    help="keep MONAI Label 0.8.5's own infer route (--conf replace_infer_route false), to compare")
    ap.add_argument("--plugins", default="", help="--conf plugins (modules or .py files)")
    args = ap.parse_args()

    print(machine(), flush=True)
    crm = tiny_crm(args.work, args.format_steps, args.seed) / "crm"
    root = Path(tempfile.mkdtemp(prefix="medreasoner_server_bench_"))
    studies = root / "studies"
    studies.mkdir()
    for phase in range(len(PHASES) + 1):  # before the server starts, so its datastore lists them
        write_inputs(studies, phase)
    conf = {"crm": str(crm), "asm": "litemedsam", "device": "cpu", "max_new_tokens": str(args.max_new_tokens)}
    if args.max_concurrent:
        conf["max_concurrent"] = str(args.max_concurrent)
    if args.stock_route:
        conf["replace_infer_route"] = "false"
    if args.plugins:
        conf["plugins"] = args.plugins
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    proc = start_server(studies, port, conf, log)
    try:
        import requests

        ready = wait_ready(url, proc, log)
        info = requests.get(url + "/info/", timeout=30).json()["medreasoner"]
        print(f"server PID {proc.pid} ready in {ready:.0f} s; max_concurrent={info['max_concurrent']}, "
              f"threaded infer route={info['threaded_infer_route']}; peak RSS after load "
              f"{peak_rss_mib(proc.pid)[0]:.0f} MiB", flush=True)
        warm = run_phase(url, 0, 1)  # first-call costs (lazy imports, allocator) stay out of the table
        print(f"warm-up: {warm['n']} requests in {warm['wall']:.1f} s, statuses {warm['statuses']}", flush=True)
        rows = []
        for i, c in enumerate(PHASES, start=1):
            rows.append(run_phase(url, i, c))
            r = rows[-1]
            print(f"  phase {c} at a time: {r['wall']:.1f} s, statuses {r['statuses']}", flush=True)
        peak, now = peak_rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    print()
    print(f"{'at a time':>9} | {'requests':>8} | {'wall s':>7} | {'req/s':>6} | {'p50 s':>6} | {'p95 s':>6} | "
          f"{'CRM calls':>9} | {'ASM encodes':>11} | {'max /info/ s':>12} | statuses")
    print("-" * 115)
    for r in rows:
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(r["statuses"].items()))
        print(f"{r['concurrency']:>9} | {r['n']:>8} | {r['wall']:>7.1f} | {r['throughput']:>6.3f} | {r['p50']:>6.1f} | "
              f"{r['p95']:>6.1f} | {r['crm_calls']:>9} | {r['asm_encodes']:>11} | {r['info_max']:>12.2f} | {statuses}")
    print(f"\nserver peak RSS (VmHWM, PID {proc.pid}): {peak:.0f} MiB (at the end {now:.0f} MiB)")
    mixed = sum(r["mixed"] for r in rows)
    print(f"answers carrying another request's query: {mixed}; errors: {[e for r in rows for e in r['errors']]}")
    ratio = rows[-1]["throughput"] / rows[0]["throughput"]
    failed = mixed or any(r["errors"] or set(r["statuses"]) - {"ok", "no_target"} for r in rows)
    verdict = "INVALID (failed requests)" if failed else ("PASS" if ratio >= RATIO_TARGET else "MISS")
    print(f"throughput 8 at a time / serial: {ratio:.2f}x (target >= {RATIO_TARGET}x): {verdict}")
    print(f"(server log: {log})")


if __name__ == "__main__":
    main()
