"""The alias registry, full-size plans on the meta device, LLaDA's checkpoint layout, rehearsal
replicas with every expert hooked, and the offline one-line errors."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llada_sparsity.modeling  # noqa: F401  (registers the LLaDA rows)
import moe_sparsity.models  # noqa: F401  (registers the MoE rows)
from common.models.aliases import ModelAlias, alias_names, lookup, real_model_aliases, register
from common.models.loading import resolve_model_path
from common.models.plan import GIB, model_plan, print_plan
from common.cli.rehearsal import mark_rehearsal
from common.models.replica import build_replica, replica_config

REPO = Path(__file__).resolve().parents[2]
WEIGHT_NAMES = Path(__file__).parent / "data" / "llada_8b_weight_names.txt"


def _config(name: str) -> dict:
    return lookup(name).shipped_config()


# ---- the model cache ---------------------------------------------------------------------------------------------

def test_processes_started_together_build_a_cached_model_once(tmp_path, monkeypatch):
    """Two shards resolving the same GGUF alias at once: one dequantizes, the other waits for the
    lock and then reads the finished cache (flock conflicts between separate opens, so two threads
    stand in for two processes)."""
    import threading

    import common.models.loading as loading

    monkeypatch.setenv("ACTIVATION_SPARSITY_CACHE", str(tmp_path))
    calls, started = [], threading.Event()

    def slow_dequantize(alias, target):
        calls.append(alias)
        started.set()
        time.sleep(0.5)  # the second caller arrives while the cache is still being written
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"weights")
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_dequantize", slow_dequantize)
    results = []
    first = threading.Thread(target=lambda: results.append(loading.materialize_gguf_alias("gemma3-270m")))
    first.start()
    started.wait(5)
    results.append(loading.materialize_gguf_alias("gemma3-270m"))  # waits for the lock, then finds the cache
    first.join(5)
    assert calls == ["gemma3-270m"] and results == [tmp_path / "gemma3-270m"] * 2
    assert (tmp_path / "gemma3-270m" / "config.json").is_file()


# ---- one registry ------------------------------------------------------------------------------------------------

def test_every_family_registers_in_the_one_registry():
    assert {r.name for r in real_model_aliases()} == {"llada-8b-base", "llada-8b-instruct", "qwen3-30b-a3b",
                                                      "olmoe-1b-7b"}
    assert alias_names("moe") == ["moefied-smollm2-135m", "olmoe-1b-7b", "qwen3-30b-a3b"]
    assert alias_names("llada") == ["llada-8b-base", "llada-8b-instruct", "tiny-llada-chars"]
    assert {"smollm2-135m", "gemma3-270m", "gemma3-1b", "qwen2.5-0.5b"} <= set(alias_names("dense"))
    assert lookup("qwen3-30b-a3b", "llada") is None and lookup("qwen3-30b-a3b", "moe").hub_id == "Qwen/Qwen3-30B-A3B"
    register(lookup("olmoe-1b-7b"))  # the same row again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register(ModelAlias("olmoe-1b-7b", "moe", hub_id="someone/else"))
    with pytest.raises(ValueError, match="family must be one of"):
        ModelAlias("x", "vision", hub_id="a/b")


def test_one_resolver_one_line_errors(tmp_path):
    assert resolve_model_path("tiny-llada-chars", "llada") == str(llada_sparsity.modeling.EMBEDDED_LLADA)
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match=r"^unknown MoE model 'mixtral-huge': .*olmoe-1b-7b, qwen3-30b-a3b$"):
        resolve_model_path("mixtral-huge", "moe")
    with pytest.raises(ValueError, match="unknown LLaDA checkpoint 'smollm2-135m'"):  # a dense alias is no LLaDA one
        resolve_model_path("smollm2-135m", "llada")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path("results/some/checkpoint")


# ---- full-size plans on the meta device ----------------------------------------------------------------------------

def _llama_like_parameters(c: dict) -> int:
    """Parameter count from the config arithmetic (independent of any model class)."""
    d, layers, vocab = c["d_model"], c["n_layers"], c["embedding_size"]
    heads, kv = c["n_heads"], c["n_kv_heads"]
    attention = d * d * 2 + 2 * d * (kv * d // heads)
    return 2 * vocab * d + d + layers * (attention + 3 * d * c["mlp_hidden_size"] + 2 * d)


def _moe_parameters(c: dict) -> int:
    d, layers, vocab, experts = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["num_experts"]
    head = c.get("head_dim", d // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * head, c["num_key_value_heads"] * head
    qk_norm = (head + head) if c["model_type"] == "qwen3_moe" else (q + kv)  # per head vs over all heads
    width = c.get("moe_intermediate_size", c["intermediate_size"])
    layer = d * q * 2 + d * kv * 2 + qk_norm + 2 * d + experts * d + experts * 3 * d * width
    return 2 * vocab * d + d + layers * layer


@pytest.mark.parametrize("name, expected, formula", [
    ("qwen3-30b-a3b", 30.5e9, _moe_parameters), ("olmoe-1b-7b", 6.9e9, _moe_parameters),
    ("llada-8b-instruct", 8.0e9, _llama_like_parameters), ("llada-8b-base", 8.0e9, _llama_like_parameters)])
def test_full_size_plan_on_the_meta_device(name, expected, formula):
    plan = model_plan(name, torch.bfloat16, "cpu", batch=4, sequence=256)
    assert abs(plan.parameters - expected) / expected < 0.01
    assert plan.parameters == formula(_config(name))
    assert plan.weight_bytes == 2 * plan.parameters
    vocab = _config(name).get("vocab_size")
    assert plan.activation_bytes == 4 * 256 * vocab * 4 and "logits 4 x 256" in plan.activation_note
    assert plan.devices and plan.devices[0].total >= plan.devices[0].free > 0


def test_plan_is_printed_and_refuses_in_one_line(capsys):
    printed = print_plan("olmoe-1b-7b", torch.bfloat16, "cpu", batch=1, sequence=8, check=False)
    out = capsys.readouterr().out
    assert "6.92B parameters; the weights need about 12.89 GiB in bfloat16" in out
    assert printed.need_bytes / GIB == pytest.approx(12.89, abs=0.01)
    with pytest.raises(ValueError, match=r"qwen3-30b-a3b does not fit here: it needs about \d+ GiB") as error:
        print_plan("qwen3-30b-a3b", torch.float32, "cpu", batch=10 ** 6, sequence=512)
    assert "\n" not in str(error.value)
    by_hub_id = print_plan("Qwen/Qwen3-30B-A3B", torch.bfloat16, check=False)  # the alias's shipped config
    assert by_hub_id.parameters == _moe_parameters(_config("qwen3-30b-a3b"))
    assert print_plan("meta-llama/not-cached-anywhere", torch.bfloat16) is None
    assert "needs meta-llama/not-cached-anywhere's config.json from the hub" in capsys.readouterr().out


def test_host_memory_counts_the_page_cache_as_available(monkeypatch):
    """A machine whose RAM is mostly page cache (a checkpoint just read) has room: the plan reads
    the kernel's available memory, not its free memory."""
    from types import SimpleNamespace

    import psutil

    from common.models.plan import visible_memory

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=24 * GIB, free=6 * GIB,
                                                                          available=21 * GIB))
    [ram] = visible_memory("cpu")
    assert (ram.free, ram.total) == (21 * GIB, 24 * GIB)
    assert print_plan("olmoe-1b-7b", torch.bfloat16, "cpu", batch=1, sequence=8).need_bytes < ram.free


# ---- LLaDA checkpoint layout -------------------------------------------------------------------------------------

def test_every_llada_checkpoint_name_maps_onto_a_parameter_of_the_right_shape():
    from llada_sparsity.modeling import LLaDAModelLM, llama_config_from_llada, official_to_llama_name
    from official_llada import OfficialLLaDA  # independent port of the official modules (tests/)

    official_config = _config("llada-8b-instruct")
    names = WEIGHT_NAMES.read_text().split()
    with torch.device("meta"):
        official = OfficialLLaDA(official_config)  # the official module layout: names and shapes
        ours = LLaDAModelLM(llama_config_from_llada(official_config))
    official_shapes = {k: v.shape for k, v in official.state_dict().items()}
    ours_shapes = {k: v.shape for k, v in ours.named_parameters()}
    assert len(names) == 291 and set(names) == set(official_shapes)  # the published index, tensor for tensor
    mapped = {name: official_to_llama_name(name) for name in names}
    assert None not in mapped.values()
    assert sorted(mapped.values()) == sorted(ours_shapes)  # one-to-one: nothing unmapped, nothing uninitialized
    for name, target in mapped.items():
        assert ours_shapes[target] == official_shapes[name], (name, target)
    assert ours_shapes["lm_head.weight"] == (126464, 4096)


# ---- rehearsal replicas --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, layers, experts, top_k, norm", [("qwen3-30b-a3b", 48, 128, 8, True),
                                                                 ("olmoe-1b-7b", 16, 64, 8, False)])
def test_replica_keeps_the_structure_and_every_expert_is_hooked(name, layers, experts, top_k, norm):
    from moe_sparsity.experts import ExpertSparsifier

    real = _config(name)
    model, tokenizer = build_replica(name, "moe")
    c = model.config
    assert (c.num_hidden_layers, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob) == (layers, experts, top_k,
                                                                                             norm)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size, c.eos_token_id) == (
        real["num_attention_heads"], real["num_key_value_heads"], real["vocab_size"], real["eos_token_id"])
    assert c.hidden_size < real["hidden_size"] // 8
    layer = model.model.layers[0]
    assert hasattr(layer.self_attn, "q_norm") and hasattr(layer.self_attn, "k_norm")  # QK-norm kept
    ids = tokenizer(["def function(x): return x + 1", "class Example: pass"], return_tensors="pt",
                    padding=True).input_ids
    with ExpertSparsifier(model, sites="intermediate", value=0.9) as sparsifier:
        model(ids)
    assert len(sparsifier.modules) == layers and sparsifier.num_experts == experts
    recorder = sparsifier.recorder
    assert sorted(key[0] for key in recorder.expert_routed) == list(range(layers))
    for routed in recorder.expert_routed.values():  # every token sent to top_k experts, per layer
        assert routed.shape == (experts,) and int(routed.sum()) == ids.numel() * top_k


def test_llada_replica_keeps_mask_and_eos_ids():
    model, _ = build_replica("llada-8b-instruct", "llada", layers=2)
    assert type(model).__name__ == "LLaDAModelLM"
    assert (model.config.mask_token_id, model.config.eos_token_id, model.config.vocab_size) == (126336, 126081, 126464)
    assert replica_config("llada-8b-instruct").num_hidden_layers == 32
    with pytest.raises(ValueError, match="no shipped config for 'gemma3-1b'"):
        replica_config("gemma3-1b")


def test_moe_rehearsal_runs_the_study_end_to_end(tmp_path):
    out = tmp_path / "rehearsal"
    started = time.perf_counter()
    result = _rehearse("moe_experts.py", "--model", "olmoe-1b-7b", "--tasks", "bb_general_knowledge", "--limit", "4",
                       "--grid", "1.0", "0.5", "--critical-value", "0.5", "--output", str(out))
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert "plan for olmoe-1b-7b" in result.stdout and "REHEARSAL: random-weight replica" in result.stdout
    experts = json.loads((out / "experts.json").read_text())
    assert experts["rehearsal"] is True and experts["rehearsal_of"] == "olmoe-1b-7b"
    rows = experts["sites"]["intermediate"]["per_layer_pooled"]
    assert [row["layer"] for row in rows] == list(range(16))
    assert all(row["experts_routed"] + row["experts_unrouted"] == 64 for row in rows)
    assert json.loads((out / "critical.json").read_text())["rehearsal"] is True
    assert json.loads((out / "rehearsal.json").read_text())["config"]["num_experts"] == 64
    assert (out / "figures" / "expert_heatmap_intermediate.png").is_file()
    print(f"olmoe rehearsal (1 task, 4 items, 2 values): {elapsed:.1f} s")


def test_mark_rehearsal_labels_summaries_but_not_the_store(tmp_path):
    (tmp_path / "critical.json").write_text(json.dumps({"critical": []}))
    (tmp_path / "search.json").write_text(json.dumps([{"site": "input"}]))
    (tmp_path / "store.json").write_text(json.dumps({"dtype": "float32"}))
    model, _ = build_replica("olmoe-1b-7b", "moe", layers=1)
    mark_rehearsal(tmp_path, "olmoe-1b-7b", model)
    assert json.loads((tmp_path / "critical.json").read_text()) == {"critical": [], "rehearsal": True,
                                                                     "rehearsal_of": "olmoe-1b-7b"}
    assert json.loads((tmp_path / "search.json").read_text())["entries"] == [{"site": "input"}]
    assert json.loads((tmp_path / "store.json").read_text()) == {"dtype": "float32"}


# ---- offline errors ------------------------------------------------------------------------------------------------

def test_uncached_hub_id_fails_in_one_line_within_seconds(tmp_path):
    """The scripts, the hub unreachable and HF_HUB_OFFLINE unset: one line, no retries, no traceback."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    cases = [("moe_experts.py", "someone/uncached-moe", "someone/uncached-moe"),  # no shipped config: no plan
             ("llada_jaccard.py", "GSAI-ML/LLaDA-uncached", "GSAI-ML/LLaDA-uncached")]
    for script, model, repo in cases:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, str(REPO / "experiments" / script), "--model", model,
                                 "--output", str(tmp_path / script)],
                                capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
        elapsed = time.perf_counter() - started
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert f"{repo} is not in the local hub cache" in lines[0] and f"hf download {repo}" in lines[0]
        assert "cannot be reached" in lines[0]
        assert elapsed < 30, (script, elapsed)  # mostly imports; the resolver itself answers within a second


def test_resolver_answers_an_uncached_hub_id_in_a_fraction_of_a_second(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a port nothing listens on
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="cannot be reached") as error:
        resolve_model_path("someone/uncached-model")
    assert time.perf_counter() - started < 10 and "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen2.5-0.5B is not in the local hub cache"):
        resolve_model_path("qwen2.5-0.5b")  # a dotted hub id is not a directory path
    (tmp_path / "models--someone--cached" / "snapshots" / "abc").mkdir(parents=True)
    (tmp_path / "models--someone--cached" / "snapshots" / "abc" / "config.json").write_text("{}")
    (tmp_path / "models--someone--cached" / "refs").mkdir()
    (tmp_path / "models--someone--cached" / "refs" / "main").write_text("abc")
    # cached but unreachable: the cached snapshot directory, so the load never touches the network
    assert resolve_model_path("someone/cached") == str(tmp_path / "models--someone--cached" / "snapshots" / "abc")
    with pytest.raises(FileNotFoundError, match="cannot find LLaDA checkpoint 'llada-8b-base': GSAI-ML/LLaDA-8B-Base "
                                                "is not in the local hub cache"):
        llada_sparsity.modeling.load_llada("llada-8b-base")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no probe at all
    with pytest.raises(FileNotFoundError, match=r"someone/uncached-model is not in the local hub cache .* and "
                                                r"HF_HUB_OFFLINE is set: download it .*`hf download someone/"):
        resolve_model_path("someone/uncached-model")


def _rehearse(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "experiments" / script), "--rehearse", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_llada_jaccard_rehearsal_runs_end_to_end(tmp_path):
    out = tmp_path / "llada"
    result = _rehearse("llada_jaccard.py", "--model", "llada-8b-instruct", "--limit", "1", "--steps", "4",
                       "--gen-length", "8", "--block-length", "4", "--reuse", "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rehearsal"] is True and summary["rehearsal_of"] == "llada-8b-instruct"
    config = json.loads((out / "rehearsal.json").read_text())["config"]
    assert config["num_hidden_layers"] == 32 and config["vocab_size"] == 126464
    assert 0 < summary["sparsity_per_site"]["intermediate"]["element_weighted"] < 1


def test_dense_sweep_rehearsal_of_llada_runs_end_to_end(tmp_path):
    out = tmp_path / "dense"
    result = _rehearse("dense_sweep.py", "--model", "llada-8b-base", "--tasks", "bb_general_knowledge", "--limit", "2",
                       "--grid", "1.0", "0.5", "--mc-num", "2", "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    critical = json.loads((out / "critical.json").read_text())
    assert critical["rehearsal"] is True and critical["rehearsal_of"] == "llada-8b-base"
    assert {entry["site"] for entry in critical["critical"]} == {"input", "intermediate"}  # the quick protocol's
