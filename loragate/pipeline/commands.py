"""Command-line parts of the loop: ``loragate adapters``, ``loragate train``, ``loragate evaluate``.

Exit codes: 0 done (evaluate: the gate passed), 1 refused (evaluate: the gate failed or the
card does not match its files; adapters: an illegal change), 2 bad input. Errors are one line
on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time


def add_adapters_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    for name, text in (
        ("list", "every version with its state and gate verdict"),
        ("show", "one card as JSON"),
        ("retire", "take a version out of service for good"),
        ("approve", "record a human approval: the loop may start the rollout"),
        ("register", "register an existing adapter directory (e.g. the first stable one)"),
    ):
        p = actions.add_parser(name, help=text)
        p.add_argument("--registry", required=True, help="registry location (a directory)")
        if name != "list":
            p.add_argument(
                "ref",
                help="NAME/VERSION in the registry, or a directory holding a card"
                if name != "register"
                else "the adapter directory to copy in",
            )
        if name in ("retire", "approve"):
            p.add_argument("--by", default=_user(), help="who (recorded in the card)")
        if name == "retire":
            p.add_argument("--reason", default="retired by hand")
        if name == "approve":
            p.add_argument("--note", default="")
        if name == "register":
            p.add_argument("--name", required=True)
            p.add_argument("--version", required=True)
            p.add_argument("--base-model", required=True, help="the base model directory it was trained on")
            p.add_argument(
                "--state",
                default="stable",
                choices=["candidate", "stable"],
                help="stable: an adapter already serving, taken as the first baseline",
            )


def adapters_command(args: argparse.Namespace) -> int:
    from loragate.common.registry import Registry, RegistryError, base_model_ref, new_card, read_card

    try:
        registry = Registry(args.registry)
        if args.action == "list":
            cards = registry.cards()
            print(f"{'NAME':<16} {'VERSION':<10} {'STATE':<10} {'GATE':<5} {'PARENT':<16} {'SINCE':<20} BASE")
            for card in cards:
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(card.history[-1].at)) if card.history else "-"
                print(
                    f"{card.name:<16} {card.version:<10} {card.state:<10} {card.verdict or '-':<5} "
                    f"{card.parent or '-':<16} {since:<20} {card.base.name}"
                )
            return 0
        if args.action == "register":
            card = new_card(args.name, args.version, args.ref, base_model_ref(args.base_model))
            directory = registry.register(card, args.ref, state=args.state, by=_user(), reason="registered by hand")
            print(directory)
            return 0
        directory = registry.resolve(args.ref)
        if args.action == "show":
            print(json.dumps(read_card(directory).model_dump(mode="json"), indent=2))
        elif args.action == "retire":
            card = registry.transition(directory, "retired", by=args.by, reason=args.reason)
            print(f"{card.ref}: retired")
        elif args.action == "approve":
            card = registry.approve(directory, by=args.by, note=args.note)
            print(f"{card.ref}: approved by {args.by}")
        return 0
    except RegistryError as exc:
        print(f"loragate: {exc}", file=sys.stderr)
        return 1


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="chat JSONL (what the dataset trigger exports)")
    p.add_argument("--base-model", required=True, help="the base model directory")
    p.add_argument("--parent", help="continue from this adapter directory's weights (default: a fresh adapter)")
    p.add_argument("--registry", required=True, help="where the new version is registered (a directory)")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out-share", type=float, default=0.2, help="share of prompts kept out of training")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--time-budget-s", type=float, help="stop training after this many seconds")
    p.add_argument(
        "--batch-size", type=int, default=8, help="the effective batch: rows per optimizer step, over all processes"
    )
    p.add_argument(
        "--micro-batch-size",
        type=int,
        help="rows per forward pass, accumulated to --batch-size (default: on a GPU the largest that fits; on a CPU 1)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto: bf16 on GPUs that have it, else fp16; fp32 on a CPU (bf16 there is >5x slower)",
    )
    p.add_argument("--quantization", choices=["nf4"], help="nf4: a 4-bit base (QLoRA, bitsandbytes), CUDA only")
    p.add_argument(
        "--gradient-checkpointing",
        default="auto",
        choices=["auto", "on", "off"],
        help="recompute activations in the backward pass (~30%% slower, far less memory); auto: on "
        "where the batch does not fit without it",
    )
    p.add_argument(
        "--no-group-by-length",
        action="store_true",
        help="batch rows in shuffled order (default: rows of similar length together, less padding)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="save a checkpoint every N steps (also on SIGTERM); 0: on SIGTERM only",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start over, discarding the checkpoints of an earlier attempt of this version",
    )
    p.add_argument(
        "--memory-limit-gb", type=float, help="memory the run may use on one device (default: what is free there)"
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="data-parallel processes on this node (one per GPU), started with torchrun",
    )
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (the tiny demo model: 3e-2)")
    p.add_argument("--rank", type=int, default=8, help="fresh adapters only")
    p.add_argument("--alpha", type=float, default=16, help="fresh adapters only")
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj", help="fresh adapters only")
    p.add_argument(
        "--max-len",
        type=int,
        default=2048,
        help="the cap on tokens per row (prompt + answer; also the model's positions); batches are "
        "padded to their longest row",
    )
    p.add_argument("--window-start", type=float, help="unix seconds: the traffic window the dataset came from")
    p.add_argument("--window-end", type=float)
    p.add_argument("--trigger", help="JSON (or a JSON file) of the trigger / drift report that caused this run")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: measured fastest on a shared small VM; 0: torch's default)",
    )
    p.add_argument("--no-progress", action="store_true")


def train_command(args: argparse.Namespace) -> int:
    """Exit 0 registered, 2 bad input (or it cannot fit), 143 stopped by SIGTERM (the same command resumes)."""
    import os
    from pathlib import Path

    if args.processes > 1 and "WORLD_SIZE" not in os.environ:
        from loragate.pipeline.launch import run_forwarding_sigterm, torchrun_command

        result, terminated = run_forwarding_sigterm(torchrun_command(_without_processes(sys.argv[1:]), args.processes))
        return 143 if terminated or result.returncode in (143, -15) else result.returncode

    from loragate.pipeline.train import TrainConfig, TrainError, train
    from loragate.pipeline.trainloop import TrainInterrupted

    trigger = None
    if args.trigger:
        try:
            text = Path(args.trigger).read_text() if Path(args.trigger).is_file() else args.trigger
            trigger = json.loads(text)
        except ValueError as exc:
            print(f"loragate: --trigger is not JSON: {exc}", file=sys.stderr)
            return 2
    config = TrainConfig(
        dataset=args.dataset,
        base_model=args.base_model,
        registry=args.registry,
        name=args.name,
        version=args.version,
        parent=args.parent,
        seed=args.seed,
        held_out_share=args.held_out_share,
        epochs=args.epochs,
        max_steps=args.max_steps,
        time_budget_s=args.time_budget_s,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        precision=args.precision,
        quantization=args.quantization,
        gradient_checkpointing=args.gradient_checkpointing,
        group_by_length=not args.no_group_by_length,
        checkpoint_every=args.checkpoint_every,
        resume=not args.no_resume,
        memory_limit_gb=args.memory_limit_gb,
        lr=args.lr,
        rank=args.rank,
        alpha=args.alpha,
        target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
        max_len=args.max_len,
        window_start=args.window_start,
        window_end=args.window_end,
        trigger=trigger,
        command=["loragate", *sys.argv[1:]] if sys.argv and sys.argv[0] else [],
        threads=args.threads or None,
        progress=not args.no_progress,
    )
    try:
        directory, card = train(config)
    except TrainInterrupted as exc:
        print(f"loragate: {exc}", file=sys.stderr)
        return 143
    except TrainError as exc:
        print(f"loragate: {exc}", file=sys.stderr)
        return 2
    run, data = card.training, card.data
    assert run is not None and data is not None  # train() always fills them
    if os.environ.get("RANK", "0") != "0":
        return 0  # the first process reports
    print(
        json.dumps(
            {
                "adapter": str(directory),
                "ref": card.ref,
                "state": card.state,
                "steps": run.steps,
                "duration_s": run.duration_s,
                "tokens_per_s": run.tokens_per_s,
                "loss_first": run.loss_first,
                "loss_last": run.loss_last,
                "precision": run.precision,
                "quantization": run.quantization,
                "effective_batch": run.effective_batch,
                "micro_batch": run.micro_batch,
                "gradient_checkpointing": run.gradient_checkpointing,
                "processes": run.processes,
                "checkpoints_resumed": run.checkpoints_resumed,
                "memory_estimate_gb": run.memory_estimate_gb,
                "memory_peak_gb": run.memory_peak_gb,
                "train_rows": data.train_rows,
                "held_out_rows": data.held_out_rows,
                "held_out": data.held_out_location,
            }
        )
    )
    return 0


def _without_processes(argv: list[str]) -> list[str]:
    """The command line each worker runs: the same, less ``--processes N`` / ``--processes=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--candidate", required=True, help="the candidate's directory (with its card)")
    p.add_argument("--baseline", required=True, help="the stable version's directory (with its card)")
    p.add_argument("--data", help="held-out chat JSONL (default: the one beside the candidate's card)")
    p.add_argument("--regression-set", help="a fixed chat JSONL per route the candidate must not do worse on")
    p.add_argument("--engine", required=True, help="a vLLM base URL (the candidate is loaded there)")
    p.add_argument(
        "--margin", type=float, default=0.02, help="non-inferiority margin in nats per answer token (default 0.02)"
    )
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=255, help="tokens per scored row (below the engine's limit)")
    p.add_argument("--generate-tokens", type=int, default=32, help="answer length for the token-F1 metric (0: off)")
    p.add_argument("--keep-loaded", action="store_true", help="leave the candidate loaded on the engine")


def evaluate_command(args: argparse.Namespace) -> int:
    from loragate.pipeline.evaluate import EvaluateError, GateConfig, run_gate

    config = GateConfig(
        candidate=args.candidate,
        baseline=args.baseline,
        data=args.data,
        regression_set=args.regression_set,
        engine=args.engine.rstrip("/"),
        margin=args.margin,
        confidence=args.confidence,
        resamples=args.resamples,
        seed=args.seed,
        max_len=args.max_len,
        generate_tokens=args.generate_tokens,
        keep_loaded=args.keep_loaded,
    )
    try:
        card, evaluation = run_gate(config)
    except EvaluateError as exc:
        print(f"loragate: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({"candidate": card.ref, "state": card.state, **evaluation.model_dump(mode="json")}))
    return 0 if evaluation.verdict == "pass" else 1


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    p = actions.add_parser("run", help="train -> evaluate -> approval for one route; resumes a stopped run")
    p.add_argument(
        "--state-file",
        required=True,
        help="the run's step records (JSON); runs of one route share its directory (and a lock)",
    )
    for flag in ("route", "dataset", "base-model", "registry", "name", "version", "stable", "engine"):
        p.add_argument(f"--{flag}", help="needed for a new run (a resumed one reads them from the state file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--require-approval", action="store_true", help="wait for `loragate adapters approve`")
    p.add_argument("--train-arg", action="append", default=[], help="extra `loragate train` argument (repeat)")
    p.add_argument("--evaluate-arg", action="append", default=[], help="extra `loragate evaluate` argument")
    p = actions.add_parser("status", help="the run's steps as JSON")
    p.add_argument("--state-file", required=True)


def pipeline_command(args: argparse.Namespace) -> int:
    """Exit 0 ready, 1 rejected, 2 failed or bad input, 3 waiting for approval, 4 another run holds the route,
    143 stopped by SIGTERM (run again: training resumes from its checkpoint)."""
    from pydantic import ValidationError

    from loragate.common.registry import RegistryError
    from loragate.pipeline.run import Pipeline, PipelineBusy, PipelineInterrupted, PipelineSpec, status

    try:
        if args.action == "status":
            print(json.dumps(status(args.state_file), indent=2))
            return 0
        fields = {
            k: getattr(args, k)
            for k in ("route", "dataset", "base_model", "registry", "name", "version", "stable", "engine")
        }
        spec = None
        if any(v is not None for v in fields.values()):
            spec = PipelineSpec(
                **fields,
                seed=args.seed,
                train_args=args.train_arg,
                evaluate_args=args.evaluate_arg,
                require_approval=args.require_approval,
            )
        outcome = Pipeline(args.state_file, spec).run()
    except PipelineBusy as exc:
        print(f"loragate: {exc}", file=sys.stderr)
        return 4
    except PipelineInterrupted as exc:
        print(f"loragate: {exc}", file=sys.stderr)
        return 143
    except ValidationError as exc:
        missing = ", ".join("--" + str(e["loc"][0]).replace("_", "-") for e in exc.errors())
        print(f"loragate: pipeline run needs {missing}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RegistryError) as exc:
        print(f"loragate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status(args.state_file)))
    return {"ready": 0, "rejected": 1, "failed": 2, "waiting_approval": 3}.get(outcome, 2)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
