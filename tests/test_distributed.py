"""K-FAC collection over torch.distributed: 2 CPU processes (gloo), each with half of the batches, give the
factors of one process over all batches; only rank 0 writes the caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crispedit_easyedit.curvature import FactorSet, collect_kfac_factors, shard_batches
from tests.tiny_models import tiny_llama, tiny_tokenizer, training_text

NAMES = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
WORLD = 2

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def batches() -> list[dict[str, torch.Tensor]]:
    """Five batches (an odd number: the shards differ in size) with left and right padding, so the ranks count
    different numbers of tokens."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(5):
        ids = torch.randint(0, 512, (3, 24), generator=g)
        mask = torch.ones_like(ids)
        mask[0, : 2 + i] = 0  # left padding
        mask[1, 20 - i :] = 0  # right padding
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _hparams(tmp: Path):
    from crispedit_easyedit.hparams import CrispEditHyperParams

    return CrispEditHyperParams(model_name="tiny-llama", layers=[1, 2], device="cpu", max_length=32,
                                mom2_dataset=str(tmp / "corpus.txt"), mom2_n_samples=6, curvature_seq_len=32,
                                curvature_batch_size=2, fisher_type="empirical", cache_dir=str(tmp / "cache"))


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    tmp = Path(tmp)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'rendezvous'}", rank=rank, world_size=WORLD)
    try:
        model = tiny_llama()
        shard = shard_batches(batches())
        factors = collect_kfac_factors(model, NAMES, shard, fisher_type="empirical", progress=False)
        factors.metadata["shard_batches"] = len(shard)
        factors.save(tmp / f"rank{rank}.safetensors")
        from crispedit_easyedit.state import capability_curvature

        curvature = capability_curvature(model, tiny_tokenizer(), _hparams(tmp), progress=False)
        curvature.factors.save(tmp / f"capability-rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "corpus.txt").write_text("\n\n".join(training_text()))
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    return tmp


def assert_factors_close(found: FactorSet, expected: FactorSet) -> None:
    for name in NAMES:
        assert found[name].num_tokens == expected[name].num_tokens
        for which in ("A", "S"):
            a, b = getattr(found[name], which), getattr(expected[name], which)
            scale = float(b.abs().max())
            assert float((a - b).abs().max()) <= 1e-6 * scale, (name, which)


def test_two_ranks_with_half_the_batches_equal_one_process_over_all(two_ranks):
    single = collect_kfac_factors(tiny_llama(), NAMES, batches(), fisher_type="empirical", progress=False)
    ranks = [FactorSet.load(two_ranks / f"rank{r}.safetensors") for r in range(WORLD)]
    assert [r.metadata["shard_batches"] for r in ranks] == [3, 2]
    for found in ranks:
        assert found.metadata["num_tokens"] == single.metadata["num_tokens"]
        assert found.metadata["num_sequences"] == 15
        assert_factors_close(found, single)
    for name in NAMES:  # every rank holds the same factors
        assert torch.equal(ranks[0][name].A, ranks[1][name].A) and torch.equal(ranks[0][name].S, ranks[1][name].S)


def test_capability_curvature_is_sharded_and_only_rank_0_writes_the_caches(two_ranks):
    from crispedit_easyedit.state import _collect_capability
    from crispedit_easyedit.editing import edit_targets

    cached = sorted(p.name.split("-")[0] for p in (two_ranks / "cache").iterdir())
    assert cached == ["eig", "kfac"]  # one factor file and one eigenbasis file, no temporaries
    model, hp = tiny_llama(), _hparams(two_ranks)
    single = _collect_capability(model, tiny_tokenizer(), hp, edit_targets(model, hp), progress=False)
    for rank in range(WORLD):
        assert_factors_close(FactorSet.load(two_ranks / f"capability-rank{rank}.safetensors"), single)


def test_shards_cover_every_batch_once():
    items = list(range(7))
    shards = [shard_batches(items, rank, 3) for rank in range(3)]
    assert sorted(sum(shards, [])) == items and shards[0] == [0, 3, 6]
    assert shard_batches(items) == items  # no process group: everything
