import torch
import torch.nn.functional as F

from cilab.memory import ExemplarMemory, herding, random_selection


def brute_force_herding(f: torch.Tensor, m: int) -> list[int]:
    """Straight from the definition, one candidate at a time."""
    mu = f.mean(0)
    chosen: list[int] = []
    for _ in range(min(m, len(f))):
        best, best_d = None, None
        for i in range(len(f)):
            if i in chosen:
                continue
            d = torch.linalg.norm(mu - f[chosen + [i]].mean(0)).item()
            if best_d is None or d < best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_herding_matches_brute_force_on_random_features():
    g = torch.Generator().manual_seed(0)
    feats = [F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1) for n in (30, 17, 25)]
    got = herding(feats, 12)
    for f, idx in zip(feats, got):
        assert idx.tolist() == brute_force_herding(f, 12)
        assert len(set(idx.tolist())) == len(idx)  # never the same image twice


def test_herding_with_fewer_images_than_m_takes_all_once():
    g = torch.Generator().manual_seed(1)
    feats = [F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1),
             F.normalize(torch.randn(9, 4, generator=g, dtype=torch.float64), dim=1)]
    got = herding(feats, 7)
    assert sorted(got[0].tolist()) == list(range(5))
    assert got[1].tolist() == brute_force_herding(feats[1], 7)


def test_random_selection_is_seeded_without_replacement():
    feats = [torch.zeros(50, 4), torch.zeros(30, 4)]
    a = random_selection(feats, 10, torch.Generator().manual_seed(0))
    b = random_selection(feats, 10, torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(len(set(x.tolist())) == 10 for x in a)


def test_memory_invariants_across_tasks():
    K, per_task = 20, 2
    mem = ExemplarMemory(K)
    history = {}
    for t in range(5):
        n_seen = (t + 1) * per_task
        m = mem.per_class_quota(n_seen)
        before = {c: x.clone() for c, x in mem.per_class.items()}
        mem.reduce(m)
        for c in range(t * per_task, n_seen):
            imgs = torch.full((50, 3, 32, 32), c, dtype=torch.uint8)
            imgs[:, 0, 0, 0] = torch.arange(50, dtype=torch.uint8)  # position tag
            mem.add(c, imgs[:m])
            history[c] = imgs[:m]
        assert len(mem) <= K
        counts = {len(x) for x in mem.per_class.values()}
        assert counts == {K // n_seen}  # balanced
        for c, old in before.items():
            assert torch.equal(mem.per_class[c], old[: K // n_seen])  # cutting keeps the prefix
        x, y = mem.data()
        assert len(x) == len(y) == len(mem) and y.unique().tolist() == list(range(n_seen))
    # round trip through a checkpoint
    again = ExemplarMemory.from_state_dict(mem.state_dict())
    assert all(torch.equal(again.per_class[c], mem.per_class[c]) for c in mem.classes)
