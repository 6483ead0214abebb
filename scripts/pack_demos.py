"""Pack demonstration folders into one ``.tar.xz`` for a GPU-machine call.

Why: a device call carries at most 64 MiB beside the repository. Each recorded episode is a
deflate-compressed ``.npz`` (about 12 KB), and deflate sees one episode at a time; the frames of
different episodes share the same table, cubes and arm, so xz over one tar of *uncompressed* npz
files is about 2.4x smaller (50 MiB of demos -> about 21 MiB). Unpack on the other side with
``tar xJf FILE -C data``: every folder comes back under its own name and loads with
``kv_vla_sim.demos.load_episodes`` unchanged (uncompressed npz reads like compressed npz).

Usage: ``python scripts/pack_demos.py OUT.tar.xz data/demos data/demos2 ...``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import numpy as np
from tqdm import tqdm

from kv_vla.atomic import atomic_write


def pack(out: str, folders: list[str]) -> None:
    with tempfile.TemporaryDirectory() as staging:
        for folder in folders:
            name = os.path.basename(os.path.normpath(folder))
            os.makedirs(os.path.join(staging, name))
            files = sorted(f for f in os.listdir(folder) if f.endswith(".npz"))
            for f in tqdm(files, desc=f"stage {name}"):
                with np.load(os.path.join(folder, f), allow_pickle=False) as z:
                    np.savez(os.path.join(staging, name, f), **{k: z[k] for k in z.files})
        names = [os.path.basename(os.path.normpath(f)) for f in folders]
        atomic_write(
            out,
            lambda tmp: subprocess.run(
                ["tar", "-C", staging, "-cf", tmp, "--use-compress-program=xz -6 -T0", *names], check=True
            ),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the .tar.xz to write")
    ap.add_argument("folders", nargs="+", help="`kv-vla collect` output folders")
    args = ap.parse_args()
    pack(args.out, args.folders)
    print(f"{args.out}: {os.path.getsize(args.out) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
