# A small sweep from Python on the bundled digits: two methods, same settings.
from cilab import METHODS, build_config, run

print("methods:", ", ".join(METHODS))
results = {}
for method in ("finetune", "icarl"):
    cfg = build_config(method, {  # a preset, then overrides as a dict (or ["key=value", ...])
        "seed": 0,
        "data": {"name": "digits"},
        "scenario": {"num_tasks": 2},
        "train": {"epochs": 1, "milestones": [], "batch_size": 64},
        "memory": {"size": 100} if method == "icarl" else {},
    })
    metrics = run(cfg, f"runs/sweep/{method}", overwrite=True, progress=False)  # metrics.json's content
    results[method] = metrics["fc"]["final_accuracy"]
for method, acc in results.items():
    print(f"{method:8s} final accuracy (fc) {acc:.1f}%")
