"""What the end of a finished run prints: where its files are and the next commands to try,
with the run's own paths, so a first run shows the way to sampling, export and the GPU plan."""

from __future__ import annotations

import os
import shlex

PLAN_MODELS = ("gpt", "moderngpt", "moegpt")  # the configs benchmarks/plan.py knows


def _quote(word: str) -> str:
    """shlex.quote, but "it's" rather than 'it'"'"'s' where double quotes are as safe."""
    if "'" in word and not any(c in word for c in '"$`\\!'):
        return f'"{word}"'
    return shlex.quote(word)


def _join(words: list[str]) -> str:
    return " ".join(_quote(w) for w in words)


def checkpoint_name(framework: str, step: int) -> str:
    """The checkpoint a run writes after ``step``, in its log folder (JAX: an orbax folder)."""
    return os.path.join("checkpoints", str(step)) if framework == "jax" else f"model_{step:06d}.pt"


def _sample_command(args, framework: str, tokenizer: str) -> str:
    log = os.path.normpath(args.log_dir)
    if framework == "jax":  # the checkpoint's meta names the tokenizer
        where, extra = log, []
    else:  # model_final.pt has no tokenizer: the sampler guesses from the vocabulary
        where = os.path.join(log, "model_final.pt")
        extra = [] if tokenizer in ("byte", "gpt2") else ["--tokenizer", tokenizer]
    return _join(["python", "-m", f"nanomoe_{framework}.sample", "--checkpoint", where,
                  "--prompt", args.sample_prompt, "--max_new_tokens", "200", *extra])


def _export_commands(args, framework: str) -> list[str]:
    log = os.path.normpath(args.log_dir)
    # Exports go inside the run's folder (with it in .gitignore, deleted with it), never beside
    # it where a run in a clone leaves untracked folders. --out must lie outside the input, so
    # a JAX run exports from its checkpoints/ folder (its newest step), not the whole folder.
    source = (os.path.join(log, "checkpoints") if framework == "jax"
              else os.path.join(log, "model_final.pt"))
    return [_join(["python", "-m", "conversion", "to-hf", source, "--out",
                   os.path.join(log, "hf")]),
            _join(["python", "-m", "conversion", "to-torch", source, "--format", "safetensors",
                   "--out", os.path.join(log, "safetensors")])]


def text(args, framework: str, tokenizer: str) -> str:
    """The lines printed after a run that reached --max_steps."""
    log = os.path.normpath(args.log_dir)
    final = os.path.join(log, "model_final.pt")
    files = [("metrics.jsonl", "one JSON line per step and per eval"),
             ("loss.png", "train and val loss"),
             (checkpoint_name(framework, args.max_steps),
              "the last checkpoint (weights, optimizer state, data position)")]
    if os.path.exists(final):  # a JAX run without torch installed skips it
        files.append(("model_final.pt", "the weights in the original's format"))
    width = max(len(name) for name, _ in files)
    export = _export_commands(args, framework)
    return "\n".join(
        [f"Done: {args.max_steps} steps. Files in {log}/:"]
        + [f"  {name:<{width}}  {what}" for name, what in files]
        + ["Next:",
           f"  sample    {_sample_command(args, framework, tokenizer)}",
           f"  export    {export[0]}",
           f"            {export[1]}",
           "            (a Hugging Face folder, and one for nanomoe_torch's from_pretrained; "
           "pip install -e \".[hf]\")",
           *_plan_lines(args.model)])


def _plan_lines(model: str) -> list[str]:
    if model not in PLAN_MODELS:
        return []
    plan = _join(["JAX_PLATFORMS=cpu", ".venv-plan/bin/python", "-m", "benchmarks.plan",
                  "--target", "rtx4090", "--model", model])
    return [f"  GPU plan  {plan}",
            f"            (the original's {model} on an RTX 4090, from the repository root; "
            "set up .venv-plan as README \"GPU plan\" says)"]
