"""What a lent GPU machine needs beside the working tree, in one folder to carry (`.gpu/`, git-ignored): that
machine has torch, Triton and most of the scientific stack but not this project's training packages, no registry
and no ../shared; bench/gpu_check.sh runs there from this bundle.

    .gpu/wheels/  Python 3.12 x86-64 wheels of the pinned versions missing or older there (requirements.txt; its
                  huggingface-hub 1.33 and pyarrow serve);
                  bitsandbytes keeps only its CUDA 13 libraries (the machine's torch is built for CUDA 13), so the
                  bundle fits the 64 MiB the device tool carries; deepspeed is the wheel pip builds from its sdist
    .gpu/glue/    the GLUE task folders configs/prep/glue.yaml reads (copied to ../shared/data/glue there)
    .gpu/smollm2/ SmolLM2-135M-Instruct's config and tokenizer, without weights (random models of its family are
                  built there: its own shape for the issue's model, a ~1B for throughput)

    .venv/bin/python bench/gpu_bundle.py --glue ../shared/data/glue --model models/smollm2-135m-instruct
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ["bitsandbytes==0.50.2", "transformers==5.24.0", "tokenizers==0.23.3",
          "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "peft==0.21.2", "accelerate==1.16.0",
          "trl==1.16.0", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
          "typing-inspection==0.4.5", "typing-extensions==4.16.0", "hjson==3.1.0"]
SDIST_ONLY = ["deepspeed==0.19.8"]  # built into a py3-none-any wheel here
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]
BNB_KEEP = ("libbitsandbytes_cuda13", "libbitsandbytes_cpu")
TOKENIZER_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja"]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def slim_bitsandbytes(wheel: Path) -> None:
    """Rewrite the wheel without the libraries of other CUDA/ROCm/XPU versions (and their RECORD lines)."""
    def keep(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return not base.startswith("libbitsandbytes_") or base.startswith(BNB_KEEP)

    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if not keep(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "\n".join(line for line in data.decode().splitlines() if keep(line.split(",", 1)[0])
                                 ).encode() + b"\n"
            dst.writestr(info, data)
    tmp.replace(wheel)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--glue", type=Path, required=True, help="folder of the GLUE task folders (save_to_disk)")
    ap.add_argument("--model", type=Path, default=ROOT / "models/smollm2-135m-instruct",
                    help="a SmolLM2 folder (`make model`): its config and tokenizer only are taken")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu")
    a = ap.parse_args()
    if not (a.model / "tokenizer.json").is_file():
        sys.exit(f"--model {a.model}: no tokenizer.json (run `make model` first)")
    tasks = [p for p in sorted(a.glue.iterdir()) if (p / "dataset_dict.json").is_file()] if a.glue.is_dir() else []
    if not tasks:
        sys.exit(f"--glue {a.glue}: no GLUE task folders (dataset_dict.json) in it")
    with tempfile.TemporaryDirectory(dir=a.out.parent) as tmp:
        stage = Path(tmp)
        wheels = stage / "wheels"
        platforms = [x for p in PLATFORMS for x in ("--platform", p)]
        pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation",
            "cp", *platforms, "-d", str(wheels), *WHEELS)
        pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), *SDIST_ONLY)
        slim_bitsandbytes(next(wheels.glob("bitsandbytes-*.whl")))
        shutil.copytree(a.glue, stage / "glue", ignore=shutil.ignore_patterns("*.lock"))
        (stage / "smollm2").mkdir()
        for name in TOKENIZER_FILES:
            if (a.model / name).is_file():
                shutil.copy2(a.model / name, stage / "smollm2" / name)
        if a.out.exists():
            shutil.rmtree(a.out)
        stage.rename(a.out)
        stage.mkdir()  # TemporaryDirectory removes it
    size = sum(p.stat().st_size for p in a.out.rglob("*") if p.is_file())
    print(f"wrote {a.out}: {size / 2**20:.1f} MiB ({len(list((a.out / 'wheels').iterdir()))} wheels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
