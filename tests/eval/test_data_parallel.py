"""Data-parallel evaluation (``accelerate launch -m lm_eval --model sparse-hf``): two CPU processes
(gloo) each score their share of the documents, padded the way lm-eval pads a rank's share, and
report the same statistics as one process on all documents."""

import json
import multiprocessing
import os
import random
import socket

import pytest

WORLD_SIZE = 2
TIME_LIMIT_S = 180
SETTINGS = {"llama": "intermediate", "qwen3_moe": "input+intermediate"}


def _documents(count=7, seed=0):
    """(context, [continuations]) documents as text for the character tokenizer."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    text = lambda n: "".join(rng.choice(letters) for _ in range(n))  # noqa: E731
    return [(text(rng.randrange(4, 20)), [" " + text(rng.randrange(1, 6)) for _ in range(rng.randrange(2, 5))])
            for _ in range(count)]


def _instances(documents):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=i,
                     metadata=("t", d, 1))
            for d, (context, continuations) in enumerate(documents) for i, continuation in enumerate(continuations)]


def _statistics(arch, instances, shared, rank=0, world_size=1):
    import torch

    from common.evaluation.bridge import SparseHFLM
    from tiny_models import char_tokenizer, tiny_model, tiny_moe

    model = tiny_moe(arch) if arch == "qwen3_moe" else tiny_model(arch)
    lm = SparseHFLM(pretrained=model, tokenizer=char_tokenizer(), batch_size=3, sites=SETTINGS[arch], value=0.7,
                    shared_context=shared)
    # What HFLM sets under ``accelerate launch`` on several GPUs (a model object passed in, as
    # here, is taken for a single process).
    lm._rank, lm._world_size = rank, world_size
    with torch.no_grad():
        answers = lm.loglikelihood(instances, disable_tqdm=True)
    statistics = lm.sparsity_statistics()
    return [a for a, _ in answers], {"summary": statistics["summary"], "experts": statistics.get("experts")}


def _rank_share(documents, rank):
    """This rank's documents and lm-eval's padding: repeats of its last request object until every
    rank has as many requests as the largest share."""
    shares = [_instances(documents[r::WORLD_SIZE]) for r in range(WORLD_SIZE)]
    mine = shares[rank]
    return mine + [mine[-1]] * (max(map(len, shares)) - len(mine))


def _worker(rank, port, out_dir):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        documents = _documents()
        result = {}
        for arch in SETTINGS:
            for shared in (True, False):
                result[f"{arch}/{shared}"] = _statistics(arch, _rank_share(documents, rank), shared, rank,
                                                         WORLD_SIZE)[1]
        # lm-eval on CPU: every process scores every request (world_size 1): nothing is summed.
        result["every rank, all documents"] = _statistics("qwen3_moe", _instances(documents), True)[1]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_statistics_of_two_ranks_equal_one_process(tmp_path):
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    workers = [context.Process(target=_worker, args=(rank, port, str(tmp_path))) for rank in range(WORLD_SIZE)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(TIME_LIMIT_S)
    alive = [worker for worker in workers if worker.is_alive()]
    for worker in alive:
        worker.kill()
    assert not alive, f"data-parallel workers did not finish within {TIME_LIMIT_S} s"
    assert [worker.exitcode for worker in workers] == [0] * WORLD_SIZE

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert ranks[0] == ranks[1]  # every rank reports the gathered statistics
    documents = _documents()
    for arch in SETTINGS:
        for shared in (True, False):
            single = json.loads(json.dumps(_statistics(arch, _instances(documents), shared)[1]))
            assert ranks[0][f"{arch}/{shared}"] == single, (arch, shared)
    assert ranks[0]["every rank, all documents"] == ranks[0]["qwen3_moe/True"]  # expert counts, not doubled
    # The two paths count differently (contexts once per document vs once per choice), so the
    # comparison above would notice a rank that fell back to the other path.
    assert ranks[0]["llama/True"] != ranks[0]["llama/False"]


def test_padding_repeats_are_scored_once_with_the_same_answers():
    documents = _documents(count=3)
    instances = _instances(documents)
    padded = instances + [instances[-1]] * 2
    answers, statistics = _statistics("llama", padded, True)
    plain_answers, plain_statistics = _statistics("llama", instances, True)
    assert answers == plain_answers + [plain_answers[-1]] * 2
    assert statistics == plain_statistics


def test_not_distributed_summing_is_the_identity():
    from common.core.recorder import SparsityRecorder

    recorder = SparsityRecorder()
    assert recorder.summed_over_ranks() is recorder


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
