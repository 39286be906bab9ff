"""Trainers: one shared loop (loop.py) around one small module per algorithm, listed in registry.py."""


def run_training(config, workdir: str) -> dict:
    """Validate, record the resolved config, then run (or resume) the configured algorithm.

    Returns {"state": the final train state, "metrics": the last logged metrics}."""
    import json
    import jax
    from alignjax.checkpoint import has_checkpoint
    from alignjax.config import check_resume_config, load_saved_config, save_config
    from alignjax.errors import require_writable_dir
    from alignjax.train import loop, registry
    from alignjax import fs
    workdir = fs.without_file_scheme(workdir)  # file:///abs/path is the local file system
    require_writable_dir(workdir, "--workdir")
    settings = registry.validate_config(config, jax.device_count())
    if has_checkpoint(workdir):  # a run that never saved a step pins nothing
        changed = check_resume_config(load_saved_config(workdir), config)
        if changed:
            print("resuming with changed settings: " + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))
    save_config(config, workdir)
    out = loop.train(config, workdir, settings=settings)
    shown = {k: round(v, 4) for k, v in out["metrics"].items() if isinstance(v, float)}
    print(f"done: {workdir} (metrics.jsonl, tb/, checkpoints/) {json.dumps(shown)}")
    return out
