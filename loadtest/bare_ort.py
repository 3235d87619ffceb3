"""Bare ONNX Runtime in a process of its own: the one-client reference (decode + inference, no server).

In the benchmark's own process, ORT shares the interpreter with the load generator's
gRPC/HTTP clients and sessions set up for other arms; measured there it came out slower
than the same session inside Triton's stub, which would flatter the pipeline. Here it has
a process to itself, like a real bare deployment. The parent sends ``decode`` or ``tensor``
per request on stdin; the child answers with the milliseconds it took (timed inside, so
the pipe is not counted).

    python -m loadtest.bare_ort MODEL THREADS SPINNING(0|1)
"""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np


class BareOrt:
    """A child process running one ORT session; ``time(what)`` -> ms of one request."""

    def __init__(self, model: str, threads: int, spinning: bool):
        self.proc = subprocess.Popen([sys.executable, "-m", "loadtest.bare_ort", model, str(threads),
                                      "1" if spinning else "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("bare ORT child did not start")

    def time(self, what: str = "decode") -> float:
        self.proc.stdin.write(what + "\n")
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def main(argv=None) -> int:
    import onnxruntime as ort

    from loadtest.payloads import PHOTOS, photos
    from rtinfer import imaging
    model, threads, spinning = (argv or sys.argv[1:])[:3]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    # Spinning threads stop at the end of each run: their tail would otherwise spin on into the arm
    # measured next (same speed: 6.5 ms p50 with and without it, alone, 5 ms between runs).
    opts.add_session_config_entry("session.force_spinning_stop", spinning)
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    chelsea = photos()[PHOTOS.index("chelsea")]
    tensor = imaging.preprocess(chelsea)[np.newaxis]
    print("ready", flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        x = imaging.preprocess(chelsea)[np.newaxis] if line.strip() == "decode" else tensor
        session.run(None, {"input": x})
        print((time.perf_counter() - t0) * 1e3, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
