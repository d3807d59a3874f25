# A small sweep from Python: two methods on the bundled digits (add seeds, presets, overrides at will).
from cilab import METHODS, build_config, run

print("methods:", ", ".join(METHODS))
results = {}
for method in ("finetune", "icarl"):
    for seed in (0,):
        cfg = build_config(method, {
            "seed": seed,
            "data": {"name": "digits"},
            "scenario": {"num_tasks": 2},
            "train": {"epochs": 1, "milestones": [], "batch_size": 64},
            "memory": {"size": 100} if method == "icarl" else {},
        })
        metrics = run(cfg, f"runs/sweep/{method}-s{seed}", overwrite=True, progress=False)
        results[method, seed] = metrics["fc"]["final_accuracy"]  # the same numbers as metrics.json
for (method, seed), acc in results.items():
    print(f"{method:8s} seed {seed}: final accuracy (fc) {acc:.1f}%")
