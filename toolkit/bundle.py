"""Everything a node without network needs to train, in one folder: wheels, tokenizer, data, scripts, run.sh.

main() is the recipe: options and inputs checked (nothing written if one is wrong) -> the packages the node
lacks worked out from the toolkit's requirements and the node's `pip list --format=freeze` -> their wheels
fetched for the node's Python (a pure-Python sdist, such as DeepSpeed's, built into a wheel here) -> the
tokenizer (and with --with-weights the model), the data rows and the repository's scripts copied -> run.sh
and bundle.json written. The folder is built beside OUTPUT_DIR and renamed into place at the end, so a
failure leaves no half bundle.

On the node: `bash BUNDLE/run.sh python3 benchmarks/gpu_check.py` installs the wheels into BUNDLE/site
(never the node's own site-packages) once, then runs the command from the bundle folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version
from rich.console import Console

from .core.config import DEFAULT_MODEL, DataConfig, option
from .core.errors import ToolkitError
from .output.console import plain

ROOT = Path(__file__).resolve().parents[1]
TOOLKIT = "bert-finetune-toolkit"
# torch and its CUDA libraries are the node's: a CUDA build is gigabytes and must match the node's driver
NODE_ONLY = ("torch", "triton")
NODE_ONLY_PREFIXES = ("nvidia-",)
# manylinux x86-64, newest first: any node of the last years runs these
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
REPO_FOLDERS = ("launch", "benchmarks", "accelerate_configs", "slurm")
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
               "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def _python_version(text: str) -> str:
    parts = text.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or parts[0] != "3":
        raise ValueError(text)
    return text


@dataclass
class BundleConfig:
    output_dir: Optional[str] = option(None, "the bundle folder to write (must not exist yet)", required=True)
    model: str = option(DEFAULT_MODEL, "local model folder (or a cached Hub id) whose tokenizer the bundle carries")
    with_weights: bool = option(False, "also carry the model's weights (bert-base: 420 MiB)")
    python_version: str = option(f"{sys.version_info.major}.{sys.version_info.minor}",
                                 "the node's Python as MAJOR.MINOR: wheels are chosen for it (default: this one's)",
                                 type=_python_version)
    skip_installed: Optional[str] = option(None, "the node's `python3 -m pip list --format=freeze`: bundle only what "
                                           "it lacks (default: every requirement except torch)")
    extras: tuple = option(("deepspeed", "peft", "evaluate", "tune", "tensorboard"),
                           "the toolkit's optional parts to carry, comma-separated (see pyproject.toml)",
                           type=lambda s: tuple(n.strip() for n in s.split(",") if n.strip()))
    data: DataConfig = field(default_factory=DataConfig)


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    why: str  # the requirement that brought it in, for the listing


# ---------------------------------------------------------------- what the node lacks


def read_node_packages(path: Path) -> dict[str, Optional[str]]:
    """name -> version from `pip list --format=freeze` / `pip freeze`; a bare name means "there, version unknown"."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolkitError(f"--skip-installed {path}: cannot read it ({exc})",
                           "pass the file written by `python3 -m pip list --format=freeze > node.txt` on the node")
    found: dict[str, Optional[str]] = {}
    for number, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text or text.startswith("-"):
            continue
        name, sep, version = text.partition("==")
        if " @ " in name:  # `pip freeze` writes direct URLs as "name @ url": there, version unknown
            name, sep, version = name.split(" @ ")[0], "", ""
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or (sep and not version):
            raise ToolkitError(f"--skip-installed {path}, line {number}: {plain(raw)!r} is not NAME==VERSION",
                               "pass the output of `python3 -m pip list --format=freeze` unchanged")
        found[canonicalize_name(name)] = version.strip() or None
    return found


def _node_only(name: str) -> bool:
    return name in NODE_ONLY or name.startswith(NODE_ONLY_PREFIXES)


def _satisfies(version: Optional[str], req: Requirement) -> bool:
    if version is None:
        return True  # listed without a version: trust the node
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return True


def missing_packages(python_version: str, extras: tuple[str, ...], node: Optional[dict[str, Optional[str]]]
                     ) -> tuple[list[Pin], list[str]]:
    """The distributions to carry (at the versions this machine runs and the tests use) and the requirements
    the node itself must meet (torch and its CUDA libraries).

    A walk of the requirement graph from the toolkit with `extras`, with markers evaluated for the node's
    Python on Linux x86-64. A requirement the node already meets ends the walk on that branch: its own
    requirements are the node's business.
    """
    env = {**default_environment(), "python_version": python_version, "python_full_version": f"{python_version}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    try:
        known = set(metadata.metadata(TOOLKIT).get_all("Provides-Extra") or [])
    except metadata.PackageNotFoundError:
        raise ToolkitError(f"{TOOLKIT} is not installed in this Python",
                           "run bash .ci/install (or pip install -e .) first, then this command from that venv")
    unknown = sorted(set(extras) - known)
    if unknown:
        raise ToolkitError(f"--extras: unknown {', '.join(unknown)}", f"use some of: {', '.join(sorted(known))}")
    pins: dict[str, Pin] = {}
    node_needs: list[str] = []
    seen: set[tuple[str, str]] = set()
    todo: list[tuple[str, tuple[str, ...], str]] = [(TOOLKIT, tuple(extras), "")]
    while todo:
        name, wanted_extras, why = todo.pop()
        dist = metadata.distribution(name)
        for text in dist.requires or []:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            active = [""] + list(wanted_extras)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in active):
                continue
            dep = canonicalize_name(req.name)
            if (dep, ",".join(sorted(req.extras))) in seen:
                continue
            seen.add((dep, ",".join(sorted(req.extras))))
            if _node_only(dep):
                if node is not None and (dep not in node or not _satisfies(node[dep], req)):
                    have = f"has {dep} {node[dep]}" if dep in node and node[dep] else f"has no {dep}"
                    raise ToolkitError(f"the node {have}; the toolkit needs {req} ({name} requires it), which a "
                                       "bundle cannot carry (a CUDA build is gigabytes and must match the driver)",
                                       f"install {req} on the node (its admins' CUDA build), then rebuild the bundle")
                if dep == "torch":
                    node_needs.append(str(req))
                continue
            if node is not None and dep in node and _satisfies(node[dep], req):
                continue
            try:
                here = metadata.distribution(dep)
            except metadata.PackageNotFoundError:
                raise ToolkitError(f"{req} (required by {name}) is not installed here, so its version is untested",
                                   f"pip install '{req}' into this venv, check it, then rebuild the bundle")
            if not _satisfies(here.version, req):
                raise ToolkitError(f"{name} requires {req}, but this venv has {dep} {here.version}",
                                   "fix this venv's packages (pip check), then rebuild the bundle")
            pins.setdefault(dep, Pin(dep, here.version, f"{name} requires {req}"))
            todo.append((dep, tuple(req.extras), str(req)))
    pins.pop(canonicalize_name(TOOLKIT), None)
    return sorted(pins.values(), key=lambda p: p.name), node_needs


# ---------------------------------------------------------------- wheels


def supported_tags(python_version: str) -> set:
    major, minor = (int(x) for x in python_version.split("."))
    return {*cpython_tags((major, minor), platforms=PLATFORMS + ["linux_x86_64"]),
            *compatible_tags((major, minor), f"cp{major}{minor}", PLATFORMS + ["linux_x86_64"])}


def _pip(args: list[str], what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = plain("\n".join(proc.stderr.strip().splitlines()[-6:]))
        raise ToolkitError(f"{what} failed: {tail}",
                           "check that this machine reaches its package index (pip download works), then rerun")


def fetch_wheels(pins: list[Pin], python_version: str, dest: Path, log) -> None:
    """Wheels for the node: binaries for its Python and manylinux x86-64; sdists built into wheels here."""
    downloads = dest / "downloads"
    downloads.mkdir(parents=True)
    if pins:
        platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
        _pip(["download", "--no-deps", "--quiet", "--python-version", python_version, "--implementation", "cp",
              *platform_args, "--dest", str(downloads), *[f"{p.name}=={p.version}" for p in pins]],
             f"pip download of {len(pins)} package(s) for Python {python_version}")
    sdists = [f for f in downloads.iterdir() if not f.name.endswith(".whl")]
    for f in downloads.glob("*.whl"):
        f.rename(dest / f.name)
    for sdist in sdists:
        log(f"building a wheel from {sdist.name}")
        _pip(["wheel", "--no-deps", "--quiet", "--wheel-dir", str(dest), str(sdist)], f"building {sdist.name}")
    log("building the toolkit's wheel")
    leftover = not (ROOT / "build").exists()  # setuptools builds in the source tree: remove only what it adds
    _pip(["wheel", "--no-deps", "--quiet", "--wheel-dir", str(dest), str(ROOT)], "building the toolkit's wheel")
    if leftover:
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    shutil.rmtree(downloads)
    tags = supported_tags(python_version)
    for wheel in sorted(dest.glob("*.whl")):
        if not tags & set(parse_wheel_filename(wheel.name)[3]):
            raise ToolkitError(f"{wheel.name} does not run on CPython {python_version} / Linux x86-64 (built here from "
                               "an sdist that is not pure Python)",
                               f"build it on a machine with Python {python_version}, or install it on the node")


# ---------------------------------------------------------------- model, data, scripts


def _model_folder(model: str) -> Path:
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; each means "not here"
        raise ToolkitError(f"--model {model}: not a local folder and not in the Hugging Face cache "
                           f"({type(exc).__name__})",
                           "pass the path of a model folder (config.json and tokenizer files)") from exc


def copy_model(model: str, dest: Path, with_weights: bool) -> None:
    src = _model_folder(model)
    dest.mkdir(parents=True)
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    if with_weights:
        for pattern in WEIGHT_PATTERNS:
            for f in src.glob(pattern):
                shutil.copy2(f, dest / f.name)


def check_model(model: str, with_weights: bool) -> None:
    from transformers import AutoTokenizer

    src = _model_folder(model)
    if not (src / "config.json").is_file():
        raise ToolkitError(f"--model {model}: no config.json in {src}", "pass a model folder saved by save_pretrained")
    try:
        AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"--model {model}: its tokenizer does not load ({plain(str(exc))[:200]})",
                           "pass a model folder with its tokenizer files") from exc
    if with_weights and not any(next(src.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ToolkitError(f"--model {model}: --with-weights, but {src} holds no weights",
                           "drop --with-weights, or pass a folder with model.safetensors")


def data_rows(cfg: DataConfig, log):
    """The exact train and eval rows a run with these data options uses, in its order (None: no data asked)."""
    if cfg.data_dir is None and cfg.train_file is None:
        return None
    import datasets  # here, not above: --help and a bad option answer before datasets and transformers load

    from .data.dataset import build_splits

    datasets.disable_progress_bars()  # a bundle prints its own few lines
    return build_splits(cfg, log=log)


def write_data(splits, cfg: DataConfig, dest: Path) -> list[str]:
    """train.parquet / eval.parquet (text, label as the class name) and the options that read them back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dest.mkdir(parents=True)
    names = list(cfg.label_names or [])
    for split, ds in zip(("train", "eval"), splits):
        ids = list(ds["labels"])
        labels = [names[i] for i in ids] if names else ids
        pq.write_table(pa.table({"text": list(ds["text"]), "label": labels}), dest / f"{split}.parquet",
                       compression="zstd")
    args = ["--train-file", "data/train.parquet", "--eval-file", "data/eval.parquet", "--text-column", "text",
            "--label-column", "label"]
    return args + (["--label-names", ",".join(names)] if names else [])


RUN_SH = """#!/usr/bin/env bash
# Run a command from this bundle on a node without network:   bash run.sh python3 benchmarks/gpu_check.py
# The first call installs the bundle's wheels into ./site with pip --no-index (never into the node's own
# site-packages, and with no pip configuration of the node's); every call puts ./site first on PYTHONPATH
# and runs the command from this folder.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
if [ $# -eq 0 ]; then
  echo "usage: bash run.sh COMMAND [ARGS...]   e.g. bash run.sh python3 benchmarks/gpu_check.py" >&2
  exit 2
fi
if [ ! -f "$HERE/site/.installed" ]; then
  # Several first calls at once (the ranks of a job, the nodes of an array on a shared folder) must not
  # install over each other: one installs while the others on this node wait for its lock, and a finished
  # install appears whole, by one rename of a private folder, so no call ever sees half of one.
  exec 9>>"$HERE/.install.lock"
  if command -v flock >/dev/null; then flock 9; fi
  if [ ! -f "$HERE/site/.installed" ]; then
    start=$(date +%s)
    partial="$HERE/.site.${HOSTNAME:-node}.$$"
    trap 'rm -rf "$partial"' EXIT  # a failed install leaves nothing behind
    PIP_CONFIG_FILE=/dev/null "$PY" -m pip install --quiet --no-index --no-deps --no-cache-dir \\
        --disable-pip-version-check --target "$partial" "$HERE"/wheels/*.whl
    touch "$partial/.installed"
    if [ -d "$HERE/site" ] && [ ! -f "$HERE/site/.installed" ]; then
      rm -rf "$HERE/site"  # left by an install of an older run.sh that was killed
    fi
    if mv -T "$partial" "$HERE/site" 2>/dev/null; then
      wheels=$(ls "$HERE"/wheels/*.whl | wc -l)
      echo "[bundle] installed $wheels wheels into $HERE/site in $(( $(date +%s) - start )) s" >&2
    else
      rm -rf "$partial"  # another node's call finished first; its install is the same
    fi
    trap - EXIT
  fi
  exec 9>&-
fi
export PYTHONPATH="$HERE/site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$HERE/site/bin:$PATH"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOOLKIT_BUNDLE="$HERE"
cd "$HERE"
exec "$@"
"""


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


# ---------------------------------------------------------------- the recipe


def main(cfg: BundleConfig) -> int:
    console = Console(highlight=False)
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    if out.exists():
        raise ToolkitError(f"--output-dir {out} already exists", "pass a new folder (a bundle is written whole)")
    if not out.parent.is_dir():
        raise ToolkitError(f"--output-dir {out}: its parent folder does not exist", "create it first")
    node = read_node_packages(Path(cfg.skip_installed)) if cfg.skip_installed else None
    pins, node_needs = missing_packages(cfg.python_version, cfg.extras, node)
    check_model(cfg.model, cfg.with_weights)
    splits = data_rows(cfg.data, log=lambda *a, **k: None)

    work = out.parent / f".{out.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        console.print(f"bundling {len(pins)} package(s) the node lacks, for CPython {cfg.python_version} "
                      f"(manylinux x86-64): {plain(', '.join(f'{p.name} {p.version}' for p in pins))}")
        fetch_wheels(pins, cfg.python_version, work / "wheels", log=console.print)
        copy_model(cfg.model, work / "model", cfg.with_weights)
        data_args = write_data(splits, cfg.data, work / "data") if splits is not None else []
        for name in REPO_FOLDERS:
            shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        (work / "run.sh").write_text(RUN_SH)
        (work / "run.sh").chmod(0o755)
        sizes = {part: round(folder_mib(work / part), 2) for part in ("wheels", "model", "data", *REPO_FOLDERS)
                 if (work / part).exists()}
        manifest = {"python_version": cfg.python_version, "platforms": "manylinux x86-64",
                    "wheels": sorted(f.name for f in (work / "wheels").glob("*.whl")),
                    "packages": [{"name": p.name, "version": p.version, "why": p.why} for p in pins],
                    "node_must_have": node_needs, "skip_installed": cfg.skip_installed,
                    "model": cfg.model, "with_weights": cfg.with_weights, "tokenizer": "model",
                    "data_args": data_args, "rows": ({"train": len(splits[0]), "eval": len(splits[1])}
                                                     if splits is not None else None),
                    "sizes_mib": sizes, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (work / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
        total = folder_mib(work)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    parts = ", ".join(f"{k} {v:.1f}" for k, v in sizes.items())
    console.print(f"bundle {plain(str(out))}: {total:.1f} MiB ({parts} MiB) in {time.perf_counter() - start:.0f} s")
    if node_needs:
        console.print(f"the node must have: {plain(', '.join(node_needs))}")
    console.print(f"on the node: bash {plain(str(out))}/run.sh python3 benchmarks/gpu_check.py")
    return 0
