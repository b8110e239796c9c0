"""Memory one image decode needs, per pixel, for each kind of file `prepare` meets.

For every mode (L, RGB, RGBA, LA, P with a transparent colour, 16-bit gray, CMYK, JPEG, an RGBA
image with EXIF rotation) it writes one --side x --side image of noise (so compression does not
shrink the file), then decodes it with `process_file` in a fresh process and reports the growth
of resident memory from before reading the file to the peak, in bytes per pixel, with and
without the file's own bytes. Compare with `DECODE_BYTES_PER_PIXEL`, the bound `prepare` uses to
choose how many decoding processes fit in memory. Prints one JSON line.

    python benchmarks/decode_memory.py --side 4000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fastclr.ingest import decode
from fastclr.ingest.decode import DECODE_BYTES_PER_PIXEL
from harness import report

_MEASURE = """
import importlib.util, sys
from pathlib import Path
# decode.py alone (it needs only numpy and Pillow): importing the package would load torch first.
spec = importlib.util.spec_from_file_location("decode", sys.argv[2])
decode = importlib.util.module_from_spec(spec)
sys.modules["decode"] = decode
spec.loader.exec_module(decode)
DecodeOptions, process_file = decode.DecodeOptions, decode.process_file
def kib(key):
    return next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() if l.startswith(key))
from PIL import Image
Image.init()  # every format's reader loaded before the peak restarts: the decode alone is measured
Path('/proc/self/clear_refs').write_text('5')  # the peak (VmHWM) restarts from the current size (Linux >= 4.0)
before = kib('VmRSS:')
out = process_file(Path(sys.argv[1]), 'x', DecodeOptions(size=96))
assert not out.reason, out.reason
print((kib('VmHWM:') - before) * 1024, out.width * out.height, out.mode)
"""


def write_images(folder: Path, side: int, only: tuple[str, ...] = ()) -> list[Path]:
    """One noise image per mode, in the formats that carry it (those named in `only`, if given)."""
    a = np.random.default_rng(0).integers(0, 256, (side, side, 4), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = Image.fromarray(a[..., 0], "L").convert("P")
    files = {
        "L.png": lambda f: Image.fromarray(a[..., 0], "L").save(f, compress_level=1),
        "RGB.png": lambda f: Image.fromarray(a[..., :3], "RGB").save(f, compress_level=1),
        "RGBA.png": lambda f: Image.fromarray(a, "RGBA").save(f, compress_level=1),
        "LA.png": lambda f: Image.fromarray(a[..., :2].copy(), "LA").save(f, compress_level=1),
        "P-transparent.png": lambda f: p.save(f, transparency=0, compress_level=1),
        "I16.png": lambda f: Image.fromarray(a[..., 0].astype(np.uint16) * 257).save(f, compress_level=1),
        "CMYK.tif": lambda f: Image.fromarray(a, "RGBA").convert("CMYK").save(f),
        "RGB.jpg": lambda f: Image.fromarray(a[..., :3], "RGB").save(f, quality=90),
        "RGBA-rotated.png": lambda f: Image.fromarray(a, "RGBA").save(f, exif=exif.tobytes(), compress_level=1),
    }
    names = [n for n in files if not only or n in only]
    for name in names:
        files[name](folder / name)
    return [folder / n for n in names]


def measure(path: Path) -> dict[str, float | str]:
    """Peak resident growth decoding `path` in a fresh process, per pixel."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), decode.__file__], capture_output=True, text=True,
                         check=True)
    grown, pixels, mode = out.stdout.split()
    per_pixel = int(grown) / int(pixels)
    # Since 9356c79 process_file reads the file as it decodes, never whole: the growth is the decode's
    # own (the figures of 2026-12 before it subtracted the file's bytes, which it then held).
    return {"file": path.name, "mode": mode, "bytes_per_pixel": round(per_pixel, 2),
            "file_bytes_per_pixel": round(path.stat().st_size / int(pixels), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=4000, help="image side in pixels")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(f) for f in write_images(Path(tmp), args.side)]
    for r in rows:
        print(json.dumps(r), file=sys.stderr)
    report("decode_memory", {"side": args.side, "bound_bytes_per_pixel": DECODE_BYTES_PER_PIXEL, "files": rows})


if __name__ == "__main__":
    main()
