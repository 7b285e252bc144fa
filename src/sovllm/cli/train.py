"""`sovllm train`: fine-tune a LoRA adapter on the curated train split, tracked in MLflow."""

from __future__ import annotations

import typer

from sovllm.cli import options
from sovllm.progress import make_console

console = make_console()
err = make_console(stderr=True)


def print_result(extra: dict, title: str = "train") -> None:
    metrics, stop, mlflow = extra["metrics"], extra.get("stop_check"), extra["mlflow"]
    console.print(f"{title}: adapter {extra['adapter']}")
    training = extra.get("training")
    if training:
        where = f"{training['processes']} × {training['device']}" if training["processes"] > 1 else training["device"]
        console.print(f"  trained on {where}, {training['precision']}, base weights {training['base_weights']}")
    console.print(f"  {metrics['steps']} steps, best val loss {metrics['best_val_loss']} (step {metrics['best_step']}), "
                  f"{metrics['loss_tokens_per_s']} loss tokens/s, padding {metrics['padding_share']:.1%}")
    if stop:
        console.print(f"  stop rate on {stop['prompts']} val prompts (max {stop['max_new_tokens']} new tokens): "
                      f"adapter {stop['adapter_rate']:.0%}, base {stop['base_rate']:.0%}")
    refusal = extra.get("refusal_calibration")
    if refusal:
        after, n = refusal["val"]["after"], refusal["val"]
        weight = (refusal.get("support") or {}).get("weight")
        minus = f" - {weight:g} x lexical support" if weight else ""
        console.print(f"  refusal bias {refusal['bias']:+.2f}{minus} (chosen on val: refuses {after['refused_unanswerable']}/"
                      f"{n['unanswerable']} unanswerable, {after['refused_answerable']}/{n['answerable']} answerable; "
                      "applied by sovllm serve)")
    version = f"version {mlflow['version']} (alias {mlflow['alias']})" if mlflow.get("version") else "not registered"
    console.print(f"  MLflow run {mlflow['run_id']} in experiment {mlflow['experiment']}; "
                  f"{mlflow['registered_model']} {version}")
    console.print(f"  browse: {mlflow['ui']}")


def train(
    project: str = typer.Argument(".", help="Project folder with sovllm.yaml."),
    quick: bool = options.quick("Train train.quick_steps steps on a few examples (the CI smoke run)."),
    set_: list[str] = options.overrides(),
    force: bool = options.force(),
    allow_non_vllm_adapter: bool = typer.Option(False, "--allow-non-vllm-adapter",
                                                help="Permit DoRA, modules_to_save or trained biases."),
) -> None:
    """Fine-tune a LoRA adapter on out/curate/train.jsonl (audited, resumable, tracked in MLflow)."""
    from sovllm.progress import bar_factory
    from sovllm.train import stage

    root, cfg, log = options.stage_project(project, set_)
    result = options.pushed(cfg, "train", "adapter", root, lambda: stage.run(
        root, cfg, quick=quick, force=force, allow_non_vllm=allow_non_vllm_adapter, log=log,
        progress_factory=bar_factory("train", err)), log, outputs=("adapter", "mlflow"))
    print_result(result.manifest.extra, "train (up to date, skipped)" if result.skipped else "train")


def register(app: typer.Typer) -> None:
    app.command()(train)
