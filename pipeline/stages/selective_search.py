"""OpenCV selective search, run in a small helper process so that its ranking is reproducible.

Why a process: OpenCV (``cv2.ximgproc.segmentation``) ranks regions with C ``rand()`` --
``rank = rand() / RAND_MAX * level``, lower first -- and ``rand()`` has one state per process.
Seeding it with ``srand(seed)`` right before ``process()`` makes the output reproducible in a
process where nothing else draws from it, but a Ray actor runs other native threads that do,
and there the order (hence which ``top_k`` boxes are kept) changed from call to call. The helper
is a plain ``python selective_search.py`` child with only numpy and cv2 imported; it serves one
image at a time over stdin/stdout (a 24-byte header plus the BGR bytes in; an int32 array out).
The segmentation and grouping themselves are deterministic; only the ranking used ``rand()``.

Output of :meth:`SelectiveSearchProcess.search`: (N, 4) int32 ``x, y, w, h`` rectangles
(``cv::Rect``, **xywh**) in OpenCV's ranked order, duplicates removed by OpenCV.
"""

from __future__ import annotations

import ctypes
import struct
import subprocess
import sys

import numpy as np

REQUEST = struct.Struct("<4sIIIQ")  # magic, height, width, mode (0 fast, 1 quality), seed
REPLY = struct.Struct("<4sI")  # magic b"SSOK" + rect count, or b"SSER" + message length
MODES = {"fast": 0, "quality": 1}


def search_in_this_process(bgr: np.ndarray, mode: str, seed: int) -> np.ndarray:
    """Selective search on a BGR uint8 (H, W, 3) image here: (N, 4) int32 xywh, ranked.

    Reproducible only where no other thread calls ``rand()``; the stages use the helper process.
    """
    import cv2

    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(bgr))
    if mode == "quality":
        search.switchToSelectiveSearchQuality()
    else:
        search.switchToSelectiveSearchFast()
    ctypes.CDLL(None).srand(ctypes.c_uint(seed))
    return np.asarray(search.process(), np.int32).reshape(-1, 4)


class SelectiveSearchProcess:
    """A helper process that runs :func:`search_in_this_process`; restarted if it dies.

    Example::

        worker = SelectiveSearchProcess(threads=1)
        rects = worker.search(bgr, mode="fast", seed=0)  # (N, 4) int32 xywh
        worker.close()
    """

    def __init__(self, *, threads: int | None = None):
        self.threads = threads or 0
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-u", __file__, str(self.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def search(self, bgr: np.ndarray, *, mode: str, seed: int) -> np.ndarray:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        h, w = bgr.shape[:2]
        try:
            self._proc.stdin.write(REQUEST.pack(b"SSRQ", h, w, MODES[mode], seed))
            self._proc.stdin.write(np.ascontiguousarray(bgr, np.uint8).tobytes())
            self._proc.stdin.flush()
            magic, n = REPLY.unpack(_read_exact(self._proc.stdout, REPLY.size))
            payload = _read_exact(self._proc.stdout, n if magic == b"SSER" else 16 * n)
        except (OSError, EOFError) as exc:
            code = self._proc.poll()
            self.close()
            raise RuntimeError(f"selective search helper process failed on a {w}x{h} image (exit code {code})") from exc
        if magic == b"SSER":
            raise RuntimeError(f"selective search failed: {payload.decode('utf-8', 'replace')}")
        return np.frombuffer(payload, np.int32).reshape(n, 4).copy()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to clean up with
            pass


def _read_exact(stream, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError(f"helper process closed its output ({n - left} of {n} bytes read)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _serve(threads: int) -> None:
    """The helper's loop: one request in, one reply out, until stdin closes."""
    import cv2

    if threads:
        cv2.setNumThreads(threads)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = inp.read(REQUEST.size)
        if len(header) < REQUEST.size:
            return
        _, h, w, mode, seed = REQUEST.unpack(header)
        bgr = np.frombuffer(_read_exact(inp, h * w * 3), np.uint8).reshape(h, w, 3)
        try:
            rects = search_in_this_process(bgr, "quality" if mode else "fast", seed)
        except Exception as exc:  # noqa: BLE001 - reported to the stage, which fails this row only
            message = f"{type(exc).__name__}: {exc}".encode("utf-8")
            out.write(REPLY.pack(b"SSER", len(message)) + message)
        else:
            out.write(REPLY.pack(b"SSOK", len(rects)) + rects.astype("<i4").tobytes())
        out.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
