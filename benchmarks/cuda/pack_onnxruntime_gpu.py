"""Packs onnxruntime-gpu for one lent GPU machine in a single device call (../shared/gpu/README.md
carries the whole wheel in five): the wheel's CUDA kernels for other GPU architectures are zeroed
(their headers stay, so the CUDA driver still reads every fat binary and picks its own), the
TensorRT provider and the C API library go, and what is left is xz-compressed. For sm_90 (H100,
H200) onnxruntime-gpu 1.31.1 packs into about 61 MB.

    python benchmarks/cuda/pack_onnxruntime_gpu.py --arch 90     # → .ortgpu/ort.tar.xz (git ignores .ortgpu/)

On the GPU machine, with `.ortgpu` carried:
    mkdir -p /tmp/ort && tar -xJf .ortgpu/ort.tar.xz -C /tmp/ort && export PYTHONPATH=/tmp/ort:$PWD
"""

from __future__ import annotations

import argparse
import io
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
DROP = ("onnxruntime/capi/libonnxruntime_providers_tensorrt.so", "onnxruntime/capi/libonnxruntime.so")


def keep_arch(library: bytes, arch: int) -> tuple[bytes, int]:
    """The library with every cubin for another architecture zeroed, in fat binaries that hold one
    for `arch`; → (library, bytes zeroed)."""
    data = bytearray(library)
    start, size = _section(data, ".nv_fatbin")
    position, zeroed = start, 0
    while position < start + size:
        magic, _, header, length = struct.unpack_from("<IHHQ", data, position)
        if magic != FATBIN_MAGIC:
            position += 8
            continue
        entries, entry = [], position + header
        while entry < position + header + length:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            (entry_arch,) = struct.unpack_from("<I", data, entry + 28)
            entries.append((kind, entry_arch, entry + entry_header, payload))
            entry += entry_header + payload
        if any(kind == 2 and entry_arch == arch for kind, entry_arch, _, _ in entries):  # 2: an ELF cubin
            for _, entry_arch, offset, payload in entries:
                if entry_arch != arch:
                    data[offset : offset + payload] = bytes(payload)
                    zeroed += payload
        position += header + length
    return bytes(data), zeroed


def _section(data: bytearray, name: str) -> tuple[int, int]:
    """(file offset, size) of an ELF64 section."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    names_offset, = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)
    for i in range(shnum):
        header = shoff + i * shentsize
        name_index, = struct.unpack_from("<I", data, header)
        end = data.index(b"\0", names_offset + name_index)
        if data[names_offset + name_index : end].decode() == name:
            offset, size = struct.unpack_from("<QQ", data, header + 0x18)
            return offset, size
    raise SystemExit(f"no {name} section")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default="1.31.1")
    parser.add_argument("--arch", type=int, default=90, help="the GPU's compute capability, as a number (90: sm_90)")
    parser.add_argument("--out", type=Path, default=Path(".ortgpu/ort.tar.xz"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                        "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                        "-d", tmp, f"onnxruntime-gpu=={args.version}"], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive, tarfile.open(args.out, "w:xz", preset=9) as packed:
            for item in archive.infolist():
                if item.is_dir() or item.filename.startswith(DROP):
                    continue
                content = archive.read(item)
                if item.filename.endswith("libonnxruntime_providers_cuda.so"):
                    content, zeroed = keep_arch(content, args.arch)
                    print(f"zeroed {zeroed / 1e6:.0f} MB of kernels for other architectures than sm_{args.arch}")
                info = tarfile.TarInfo(item.filename)
                info.size, info.mode = len(content), 0o755 if item.filename.endswith(".so") else 0o644
                packed.addfile(info, io.BytesIO(content))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
