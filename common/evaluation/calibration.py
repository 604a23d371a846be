"""The calibration step of the criteria: text that is never an evaluation item, its activations, a cache.

Calibrated criteria (``common.core.criteria``: a threshold per layer, SCAP's modes, LaRoSA's
rotations; WINA's column norms come from the weights) need activations on calibration text. This
module supplies that text (``task_data/calibration.jsonl``, built by
``scripts/build_calibration_text.py``), asserts before every use that no passage shares a run of
``NGRAM`` words with any item of the offline suites (the multiple-choice items of the small and
full suites, and the fables), captures the activations the score reads (one passage per forward,
at most ``CALIBRATION_TOKENS`` tokens), hands them to ``common.core.calibration.calibrate`` (the
math) and caches the result.

The cache lives under ``<cache>/calibration/`` (``ACTIVATION_SPARSITY_CACHE``), one file per key:
model name and a fingerprint of its weights, site, score, dtype, device type, the corpus (name and
digest) and the token budget, plus the target for thresholds. Files are written atomically under a
lock, so shard processes that need the same calibration compute it once; each file keeps the run's
provenance. Column norms are read from the weights on each use (a few milliseconds).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from common.core.calibration import Calibration, calibrate, column_norms, consumer_weights
from common.core.criteria import SCORES, Criterion
from common.core.hooks import ActivationCapture
from common.core.sites import expand_sites
from common.evaluation.provenance import environment
from common.evaluation.store import atomic_write_json
from common.evaluation.tasks import DATA, MULTIPLE_CHOICE_TASKS, PERPLEXITY_TASKS
from common.models.loading import cache_dir, cache_lock

CORPUS = DATA / "calibration.jsonl"
NGRAM = 8  # words: a passage sharing a run this long with an evaluation text is refused
CALIBRATION_TOKENS = 8192  # tokens of calibration text per calibration (passages in the file's order)
PASSAGE_TOKENS = 256  # each passage is cut to this many tokens


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(tokens: list[str], n: int):
    return (" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def evaluation_texts():
    """(task file, item index, text) of every item of the offline suites: each multiple-choice
    item's query with its choices, each fable."""
    files = sorted({file for file, _ in MULTIPLE_CHOICE_TASKS.values()} | set(PERPLEXITY_TASKS.values()))
    for file in files:
        for index, line in enumerate((DATA / file).read_text().splitlines()):
            item = json.loads(line)
            yield file, index, " ".join([item.get("query", ""), item.get("text", ""), *item.get("choices", [])])


def check_disjoint(passages: list[str], texts=None, n: int = NGRAM) -> None:
    """Raise a one-line ValueError naming the first calibration passage that shares a run of ``n``
    words with an evaluation text (default: every item of the offline suites and the fables), or
    that is shorter than ``n`` words (it could not be checked)."""
    grams: dict[str, int] = {}
    for number, passage in enumerate(passages):
        tokens = words(passage)
        if len(tokens) < n:
            raise ValueError(f"calibration passage {number} has fewer than {n} words, too short to check against the "
                             "evaluation items; remove it from the calibration text")
        for gram in _ngrams(tokens, n):
            grams.setdefault(gram, number)
    for file, index, text in evaluation_texts() if texts is None else texts:
        for gram in _ngrams(words(text), n):
            if gram in grams:
                raise ValueError(f"calibration passage {grams[gram]} shares the words {gram!r} with evaluation item "
                                 f"{index} of {file}: calibration text must never be an evaluation item; remove the "
                                 "passage from the calibration text")


@lru_cache(maxsize=4)
def calibration_passages(path: Path = CORPUS) -> tuple[str, ...]:
    """The calibration passages, checked against every evaluation item first (``check_disjoint``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration text {path} is missing; run python scripts/build_calibration_text.py")
    passages = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    if not passages:
        raise ValueError(f"calibration text {path} holds no passages")
    check_disjoint(passages)
    return tuple(passages)


def corpus_id(path: Path = CORPUS) -> str:
    """The corpus's name and the digest of its bytes: part of every cache key and cell key."""
    path = Path(path)
    return f"{path.stem}-{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the model's parameter names, shapes, dtypes and a strided sum of each: two
    models with one name but other weights (a tiny random model, a retrained checkpoint) never
    share a cache entry."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        flat = parameter.detach().reshape(-1)
        probe = float(flat[:: max(1, flat.numel() // 4096)].double().sum())
        digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}:{probe!r};".encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def capture(model, tokenizer, site: str, passages, max_tokens: int = CALIBRATION_TOKENS
            ) -> tuple[dict[tuple[int, str], torch.Tensor], dict]:
    """Dense activations [tokens, D] per (layer, ``site``) over the first passages, one per
    forward, until ``max_tokens`` tokens; and what was read (passages, tokens)."""
    device = next(model.parameters()).device
    tokens = used = 0
    with ActivationCapture(model, site, keep=True) as observed:
        for passage in passages:
            if tokens >= max_tokens:
                break
            encoded = list(tokenizer(passage)["input_ids"])[:min(PASSAGE_TOKENS, max_tokens - tokens)]
            ids = torch.tensor([encoded], device=device)
            model(input_ids=ids)
            tokens, used = tokens + ids.shape[-1], used + 1
    return {key: torch.cat(rows) for key, rows in observed.activations.items()}, {"passages": used, "tokens": tokens}


def _digest(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Calibrator:
    """The calibration a criterion's cells need, for one model: ``calibrator(site, value)`` gives
    the ``Calibration`` of a cell (its target is ``value`` for a calibrated selection), computed
    once per (site, quantities) for every target in ``targets`` and cached on disk."""

    model: torch.nn.Module
    tokenizer: object
    model_name: str
    criterion: Criterion
    targets: tuple[float, ...] = ()
    max_tokens: int = CALIBRATION_TOKENS
    corpus: Path = CORPUS
    root: Path | None = None

    def __post_init__(self):
        parameter = next(self.model.parameters())
        self.dtype = str(parameter.dtype).replace("torch.", "")
        self.device_type = parameter.device.type
        self.root = Path(self.root) if self.root is not None else cache_dir() / "calibration"
        self._loaded: dict[tuple[str, float | None], Calibration] = {}
        self._fingerprint: str | None = None
        self._provenance: dict = {}

    @property
    def corpus_id(self) -> str | None:
        """The corpus in the cell keys of a criterion that reads text (None otherwise)."""
        return corpus_id(self.corpus) if self.criterion.reads_text else None

    def __call__(self, site: str, value: float) -> Calibration:
        target = float(value) if self.criterion.calibrated else None
        parts = [self._base(base, target) for base in expand_sites(site)]
        merged = Calibration(self.criterion, target)
        for part in parts:
            for table in ("thresholds", "column_norms", "modes", "rotations"):
                getattr(merged, table).update(getattr(part, table))
        return merged

    def provenance(self, site: str) -> dict:
        """Where the calibration of ``site`` came from (corpus, tokens, library versions)."""
        return {base: self._provenance.get(base) for base in expand_sites(site)}

    # ---- one base site ------------------------------------------------------------------------
    def _base(self, site: str, target: float | None) -> Calibration:
        if (site, target) not in self._loaded:
            weights = consumer_weights(self.model, site) if "column_norms" in SCORES[self.criterion.score].needs \
                else None
            if not self.criterion.reads_text:
                self._loaded[(site, target)] = calibrate(self.criterion, None, weights=weights)[0]
                self._provenance[site] = {"weights": self.fingerprint}
            else:
                targets = sorted({target, *self.targets} - {None}) if self.criterion.calibrated else [None]
                for t, calibration in zip(targets, self._text_calibrations(site, targets, weights)):
                    self._loaded[(site, t)] = calibration
        return self._loaded[(site, target)]

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    def _key(self, site: str, target: float | None = None) -> dict:
        key = {"model": self.model_name, "weights": self.fingerprint, "site": site, "score": self.criterion.score,
               "dtype": self.dtype, "device_type": self.device_type, "corpus": corpus_id(self.corpus),
               "tokens": self.max_tokens}
        if target is not None:
            key.update(selection=self.criterion.selection, target=round(float(target), 6))
        return key

    def _path(self, key: dict, suffix: str) -> Path:
        return self.root / re.sub(r"[^A-Za-z0-9.+-]+", "-", self.model_name) / f"{_digest(key)}{suffix}"

    def _text_calibrations(self, site: str, targets: list, weights) -> list[Calibration]:
        """Every target's calibration of one base site: from the cache, else computed (once, under a lock)."""
        with cache_lock(f"calibration-{_digest(self._key(site))}"):
            cached = self._read(site, targets)
            if cached is not None:
                return cached
            read = "gate" if SCORES[self.criterion.score].reads_gate and site == "intermediate" else site
            activations, used = capture(self.model, self.tokenizer, read, calibration_passages(self.corpus),
                                        self.max_tokens)
            activations = {(layer, site): rows for (layer, _), rows in activations.items()}
            out = calibrate(self.criterion, activations, targets, weights)
            del activations
            parameter = next(self.model.parameters())
            provenance = {**environment(parameter.dtype, parameter.device), **used,
                          "corpus": corpus_id(self.corpus), "weights": self.fingerprint}
            self._write(site, targets, out, provenance)
            self._provenance[site] = provenance
            return out

    def _read(self, site: str, targets: list) -> list[Calibration] | None:
        """The cached calibrations of every target, or None when one of them is missing."""
        quantities = self._path(self._key(site), ".json")
        if not quantities.is_file():
            return None
        record = json.loads(quantities.read_text())
        device = next(self.model.parameters()).device
        shared = Calibration(self.criterion)
        shared.modes = {(int(layer), site): float(m) for layer, m in record.get("modes", {}).items()}
        if record.get("rotations"):
            from safetensors.torch import load_file

            tensors = load_file(str(self._path(self._key(site), ".safetensors")), device=str(device))
            shared.rotations = {(int(name), site): tensor for name, tensor in tensors.items()}
        if "column_norms" in SCORES[self.criterion.score].needs:
            shared.column_norms = {key: column_norms(matrices).to(device)
                                   for key, matrices in consumer_weights(self.model, site).items()}
        out = []
        for target in targets:
            calibration = Calibration(self.criterion, target, column_norms=shared.column_norms, modes=shared.modes,
                                      rotations=shared.rotations)
            if target is not None:
                path = self._path(self._key(site, target), ".json")
                if not path.is_file():
                    return None
                calibration.thresholds = {(int(layer), site): float(t) for layer, t in
                                          json.loads(path.read_text())["thresholds"].items()}
            out.append(calibration)
        self._provenance[site] = record["provenance"]
        return out

    def _write(self, site: str, targets: list, calibrations: list[Calibration], provenance: dict) -> None:
        first = calibrations[0]
        key = self._key(site)
        if first.rotations:  # the tensors first: the JSON that points at them is the sign the entry is whole
            from safetensors.torch import save_file

            path = self._path(key, ".safetensors")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({str(layer): q.float().cpu().contiguous() for (layer, _), q in first.rotations.items()},
                      str(tmp))
            tmp.replace(path)
        for target, calibration in zip(targets, calibrations):
            if target is not None:
                atomic_write_json(self._path(self._key(site, target), ".json"),
                                  {"key": self._key(site, target), "provenance": provenance,
                                   "thresholds": {str(layer): t for (layer, _), t in calibration.thresholds.items()}})
        atomic_write_json(self._path(key, ".json"),
                          {"key": key, "provenance": provenance, "rotations": bool(first.rotations),
                           "modes": {str(layer): m for (layer, _), m in first.modes.items()}})


__all__ = ["CALIBRATION_TOKENS", "CORPUS", "Calibrator", "calibration_passages", "capture",
           "check_disjoint", "corpus_id", "evaluation_texts", "weights_fingerprint"]
