"""workers/supervised.py, the loops the SFT, reward-model and DPO workers share, on one process (gloo,
world 1) with a stand-in engine that records what DeepSpeed would be asked to do."""

import pytest
import torch

from rlhf_system.workers.supervised import eval_size, optimizer_step, strided_shares, strided_sums


@pytest.fixture(autouse=True, scope="module")
def gloo_world_of_one(tmp_path_factory):
    import torch.distributed as dist

    if dist.is_initialized():  # another test's group: reuse it
        yield
        return
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Engine:
    device = torch.device("cpu")

    def __init__(self):
        self.backward_losses, self.steps = [], 0

    def backward(self, loss):
        self.backward_losses.append(float(loss))

    def step(self):
        self.steps += 1


def test_each_micro_batch_is_scaled_stepped_and_summed():
    engine = Engine()
    items = [("rows 0-1", 2.0), ("rows 2-3", 3.0)]
    sums = optimizer_step(engine, items, lambda x: (torch.tensor(x), torch.tensor([x, 1.0])), 0.5, "SFT", 7, 0)
    assert engine.backward_losses == [1.0, 1.5] and engine.steps == 2
    assert sums.dtype == torch.float64 and sums.tolist() == [5.0, 2.0]


def test_a_non_finite_loss_names_step_rank_and_rows():
    with pytest.raises(FloatingPointError, match=r"non-finite RM loss at step 3, rank 0, rows 2-3: nan"):
        optimizer_step(Engine(), [("rows 0-1", 1.0), ("rows 2-3", float("nan"))],
                       lambda x: (torch.tensor(x), torch.tensor([x])), 1.0, "RM", 3, 0)


def test_strided_shares_give_every_rank_the_same_count():
    # 10 samples, micro-batches of 2, 3 ranks: rank 2 gets a real share, then an empty one (a throw-away forward)
    shares = [strided_shares(10, 2, r, 3) for r in range(3)]
    assert shares == [[[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], []]]
    assert sorted(i for s in shares for m in s for i in m) == list(range(10))


def test_strided_sums_score_empty_shares_on_sample_0_and_drop_them():
    seen = []

    def score(idx):
        seen.append(list(idx))
        return torch.tensor([float(len(idx)), float(sum(idx))])

    got = strided_sums(Engine(), [[4, 5], []], score, 2)
    assert seen == [[4, 5], [0]] and got.tolist() == [2.0, 9.0]


def test_eval_size_caps_at_max_eval_samples():
    from rlhf_system.config import RunConfig

    cfg = RunConfig()
    assert eval_size(cfg, 40) == 40
    cfg.train.max_eval_samples = 16
    assert eval_size(cfg, 40) == 16 and eval_size(cfg, 8) == 8
