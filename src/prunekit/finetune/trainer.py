"""Fine-tuning on the transformers Trainer, with a TrainingMethod's hooks around every step.

Order per optimiser step: forward (+ ``extra_loss``, + distillation) -> backward -> gradient clipping
-> ``after_backward`` (``on_pre_optimizer_step``) -> optimiser step -> ``after_step``
(``on_optimizer_step``). ``step`` given to every hook is the 0-based index of the optimiser step being
taken (``state.global_step`` before it is incremented). The method's state is saved beside every
checkpoint (``prunekit_method.pt``) and loaded before a resumed run, so a resumed run ends with the
same mask as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from prunekit.errors import PrunekitError
from prunekit.finetune.hooks import TrainingMethod

METHOD_STATE = "prunekit_method.pt"
RUN_FILE = "prunekit_run.json"


@dataclass
class TrainConfig:
    """How to train. ``max_steps`` wins over ``epochs``; ``eval_steps``/``save_steps`` None = 4 times a run."""

    epochs: float = 1.0
    lr: float = 5e-5
    batch_size: int = 32
    eval_batch_size: int | None = None
    max_steps: int | None = None
    grad_accum: int = 1
    max_length: int = 128  # classification: tokens per example
    seq_len: int = 256  # causal LM: tokens per block
    max_train_tokens: int | None = None  # causal LM: use only the head of the train split
    max_eval_tokens: int | None = 16384  # causal LM: evaluation blocks during training
    max_eval_examples: int | None = None  # classification: evaluation examples during training
    weight_decay: float = 0.0
    lr_warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int = 2
    logging_steps: int | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps; continue with resume
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5  # weight of the distillation loss; 1 - alpha on the task loss

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What a run produced: the model to export, the method's facts, the log and the step count."""

    model: nn.Module
    facts: dict[str, Any]
    history: list[dict[str, Any]]
    steps: int
    total_steps: int
    stopped_early: bool
    n_train: int
    world_size: int
    train_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class MethodCallback(TrainerCallback):
    """Calls the method's after_backward/after_step; saves its state with each checkpoint; stops early on ask."""

    def __init__(self, method: TrainingMethod, model: nn.Module, stop_after: int | None = None) -> None:
        self.method = method
        self.model = model
        self.stop_after = stop_after

    def on_pre_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.method.after_backward(self.model, state.global_step)

    def on_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.method.after_step(self.model, state.global_step)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stop_after is not None and state.global_step >= self.stop_after and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if args.should_save:
            folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{METHOD_STATE}.tmp"
            torch.save(self.method.state_dict(), tmp)
            tmp.replace(folder / METHOD_STATE)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over positions (where ``mask`` is True)."""
    student_log = F.log_softmax(student.float() / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_position = (teacher_log.exp() * (teacher_log - student_log)).sum(dim=-1)
    if mask is not None:
        per_position = per_position[mask]
    return per_position.mean() * temperature ** 2


class PrunekitTrainer(Trainer):
    """The transformers Trainer plus a TrainingMethod (extra loss, extra optimiser groups) and a teacher."""

    def __init__(self, *args: Any, method: TrainingMethod, teacher: nn.Module | None = None,
                 distill_temperature: float = 2.0, distill_alpha: float = 0.5, causal_lm: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method = method
        self.teacher = teacher
        self.distill_temperature = distill_temperature
        self.distill_alpha = distill_alpha
        self.causal_lm = causal_lm
        self.method_model: nn.Module = self.model  # type: ignore[assignment]
        if teacher is not None:
            teacher.to(self.args.device).eval()
            for param in teacher.parameters():
                param.requires_grad_(False)
            self.loss_is_scaled_for_ga = False  # our loss is a per-batch mean

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.teacher is None or not model.training:  # evaluations report the task loss alone
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        else:
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits
            mask = inputs.get("attention_mask")
            mask = mask.bool() if mask is not None and self.causal_lm else None
            kd = distillation_loss(outputs.logits, teacher_logits, self.distill_temperature, mask)
            loss = self.distill_alpha * kd + (1.0 - self.distill_alpha) * outputs.loss
        extra = self.method.extra_loss(self.method_model, self.state.global_step) if model.training else None
        if extra is not None:
            scaled = self.loss_is_scaled_for_ga is not False and num_items_in_batch is not None
            loss = loss + (extra / self.current_gradient_accumulation_steps if scaled else extra)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's AdamW groups, minus the method's own parameters, plus the method's groups."""
        opt_model: Any = self.model if model is None else model
        extra_groups = self.method.param_groups(opt_model) if self.optimizer is None else []
        if not extra_groups:
            return super().create_optimizer(model)
        taken = {id(p) for group in extra_groups for p in group["params"]}
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad and id(p) not in taken]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}, *extra_groups]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.causal_lm and "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(50.0, logs["eval_loss"]))
        super().log(logs, start_time)


def world_size() -> int:
    """Processes in this run (``accelerate launch`` / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def steps_for(n_train: int, config: TrainConfig, processes: int) -> int:
    """Optimiser steps the run will take (the Trainer's own arithmetic, done early to size the schedule)."""
    if config.max_steps is not None and config.max_steps > 0:
        return int(config.max_steps)
    batches = math.ceil(n_train / (config.batch_size * processes))
    per_epoch = max(1, math.ceil(batches / config.grad_accum))
    return max(1, math.ceil(config.epochs * per_epoch))


def accuracy_metrics(prediction: Any) -> dict[str, float]:
    """compute_metrics for classification (predictions are already argmax-ed)."""
    predicted = torch.as_tensor(prediction.predictions).reshape(-1)
    labels = torch.as_tensor(prediction.label_ids).reshape(-1)
    return {"accuracy": float((predicted == labels).float().mean())}


def _argmax(logits: Any, labels: Any) -> torch.Tensor:
    logits = logits[0] if isinstance(logits, tuple) else logits
    return logits.argmax(dim=-1)


def training_arguments(checkpoint_dir: Path, config: TrainConfig, total_steps: int, causal_lm: bool,
                       has_eval: bool) -> TrainingArguments:
    """TrainingArguments from a TrainConfig: no hub, no reporting, checkpoints every save_steps."""
    every = max(1, total_steps // 4)
    eval_steps = every if config.eval_steps is None else int(config.eval_steps)
    save_steps = (eval_steps or every) if config.save_steps is None else int(config.save_steps)
    use_cpu = str(config.device) == "cpu" or not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(checkpoint_dir), max_steps=total_steps, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size, learning_rate=config.lr,
        weight_decay=config.weight_decay, warmup_steps=int(round(config.lr_warmup_ratio * total_steps)),
        lr_scheduler_type=config.lr_scheduler, gradient_accumulation_steps=config.grad_accum,
        max_grad_norm=config.max_grad_norm, eval_strategy="steps" if has_eval and eval_steps > 0 else "no",
        eval_steps=eval_steps if eval_steps > 0 else None, save_strategy="steps" if save_steps > 0 else "no",
        save_steps=save_steps if save_steps > 0 else 500, save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps or max(1, min(50, total_steps // 10)), report_to=[], seed=config.seed,
        use_cpu=use_cpu, disable_tqdm=not config.progress, dataloader_num_workers=0, remove_unused_columns=False,
        prediction_loss_only=causal_lm, ddp_backend="gloo" if use_cpu and world_size() > 1 else None,
        ddp_find_unused_parameters=False, push_to_hub=False, label_names=["labels"])


def last_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` folder with the method's state beside it, or None."""
    if not checkpoint_dir.is_dir():
        return None
    found = [p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    found = [p for p in found if (p / METHOD_STATE).exists() and (p / "trainer_state.json").exists()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def run_signature(config: TrainConfig, method: TrainingMethod, total_steps: int, n_train: int) -> dict[str, Any]:
    """What must not change between a run and its resumption (progress, stop_after and eval cadence may)."""
    loose = ("progress", "stop_after", "eval_steps", "save_steps", "save_total_limit", "logging_steps",
             "max_eval_examples", "eval_batch_size", "device")
    settings = {key: value for key, value in config.describe().items() if key not in loose}
    own = getattr(method, "settings", None)
    method_settings = own() if callable(own) else {}
    return json.loads(json.dumps({"method": method.name, "method_settings": method_settings, "config": settings,
                                  "total_steps": total_steps, "n_train": n_train, "world_size": world_size()},
                                 default=str))


def check_same_run(checkpoint_dir: Path, signature: dict[str, Any], resume: bool) -> None:
    """Write the run's signature beside its checkpoints; on resume, refuse different settings."""
    file = checkpoint_dir / RUN_FILE
    if resume and file.exists():
        earlier = json.loads(file.read_text())
        changed = sorted(key for key in set(earlier) | set(signature) if earlier.get(key) != signature.get(key))
        if changed:
            raise PrunekitError(f"the checkpoints in '{checkpoint_dir}' come from a run with other settings "
                                f"({', '.join(changed)} differ): resume with the same settings, or start afresh")
    if int(os.environ.get("RANK", "0")) == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{RUN_FILE}.tmp")
        tmp.write_text(json.dumps(signature, indent=2) + "\n")
        tmp.replace(file)


def check_masks_agree(method: TrainingMethod, device: torch.device) -> bool:
    """In a multi-process run, verify every rank holds the same masks (a checksum gathered from all ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    masks = getattr(method, "masks", None) or {}
    checksum = torch.zeros(2, dtype=torch.float64, device=device)
    for index, name in enumerate(sorted(masks)):
        kept = masks[name].reshape(-1).to(device)
        positions = torch.nonzero(kept).reshape(-1).double()
        checksum[0] += kept.sum().double()
        checksum[1] += ((positions % 9973) * (index + 1)).sum()
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("the ranks of this run ended with different masks: report this as a prunekit bug")
    return True


def build_datasets(tokenizer: Any, data: Any, config: TrainConfig, train_split: str = "train",
                   eval_split: str | None = None, num_labels: int | None = None) -> tuple[Any, Any, str | None]:
    """(train, eval or None, eval split name) for a TextData (causal LM) or ClassificationData."""
    from prunekit.data import ClassificationData
    from prunekit.finetune.data import check_labels, classification_dataset, text_dataset

    if train_split not in data.splits or not data.splits[train_split]:
        raise PrunekitError(f"dataset '{data.name}' has no {train_split} examples: give a set with a "
                            f"'{train_split}' split to train on")
    if isinstance(data, ClassificationData):
        if not data.label_names:
            raise PrunekitError(f"dataset '{data.name}' has no labels: classification training needs a labelled "
                                "set (reviews, glue/sst2, csv:PATH with a label column)")
        if eval_split is None:
            eval_split = "validation" if data.splits.get("validation") else None
        eval_examples = list(data.splits.get(eval_split, []))[: config.max_eval_examples] if eval_split else []
        if num_labels is not None:
            check_labels(data.splits[train_split], num_labels, train_split, data.name)
            check_labels(eval_examples, num_labels, eval_split or "eval", data.name)
        train = classification_dataset(tokenizer, data.splits[train_split], config.max_length)
        evaluation = classification_dataset(tokenizer, eval_examples, config.max_length) if eval_examples else None
        return train, evaluation, eval_split
    train = text_dataset(tokenizer, data.splits[train_split], config.seq_len, config.max_train_tokens)
    if eval_split is None:
        eval_split = "eval" if data.splits.get("eval") else None
    evaluation = None
    if eval_split:
        evaluation = text_dataset(tokenizer, data.splits[eval_split], config.seq_len, config.max_eval_tokens)
    return train, evaluation, eval_split


def is_classifier(model: nn.Module) -> bool:
    """True for a sequence-classification model (one score per class, not per token).

    Asked of transformers' registry (:func:`prunekit.adapters.model_head`: an instance of the class
    ``AutoModelForSequenceClassification`` builds for the model's config), not read from the class name;
    a peft or DDP wrapper is looked through.
    """
    from prunekit.adapters.heads import model_head

    base: Any = model
    for _ in range(3):  # PeftModel -> LoraModel -> the model; DistributedDataParallel -> .module
        unwrap = getattr(base, "get_base_model", None)
        inner = unwrap() if callable(unwrap) else getattr(base, "module", None)
        if not isinstance(inner, nn.Module) or inner is base:
            break
        base = inner
    return model_head(base) == "classification"


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '1.5 h': a rough duration for a person."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe_work(steps: int, config: TrainConfig, processes: int, n_train: int, causal_lm: bool,
                  start_step: int = 0) -> str:
    """One line saying how much work a run will do: optimiser steps, examples (and tokens) per step, in all.

    ``steps`` is the step the run ends at, ``start_step`` the one it starts from (a resumed run).
    """
    per_step = config.batch_size * config.grad_accum * processes
    parts = [str(config.batch_size)] + ([f"{config.grad_accum} accumulated"] if config.grad_accum > 1 else []) + (
        [f"{processes} processes"] if processes > 1 else [])
    batch = " x ".join(parts)
    todo = steps - start_step
    unit = "blocks" if causal_lm else "examples"
    passes = f"{todo * per_step / max(1, n_train):.1f} passes over {n_train:,} {unit}"
    resumed = f" (resuming at step {start_step})" if start_step else ""
    if causal_lm:
        tokens = per_step * config.seq_len
        what = f"{batch} blocks x {config.seq_len} tokens = {tokens:,} tokens each, {todo * tokens:,} tokens in all"
    else:
        what = f"{batch} = {per_step:,} examples each" if len(parts) > 1 else f"{per_step:,} examples each"
        what += f", {todo * per_step:,} examples in all"
    return f"prunekit: training {todo:,} optimiser steps{resumed} of {what} ({passes})"


class AnnounceTime(TrainerCallback):
    """After the first optimiser step of a run, print what it took and what the whole run will take at that pace."""

    def __init__(self, steps: int, print_fn: Any = print) -> None:
        self.steps = steps  # the optimiser steps this run will take (after a resume: those left)
        self.print_fn = print_fn
        self.started: float | None = None
        self.done = False

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.done or self.started is None:
            return
        self.done = True
        seconds = time.perf_counter() - self.started
        if state.is_world_process_zero:
            steps = f"{self.steps:,} step{'s' if self.steps != 1 else ''}"
            self.print_fn(f"prunekit: first step {seconds:.1f} s: about {format_duration(seconds * self.steps)} for "
                          f"{steps} on this machine (plus evaluations)", flush=True)


def train_model(model: nn.Module, tokenizer: Any, data: Any, *, method: TrainingMethod | None = None,
                config: TrainConfig | None = None, checkpoint_dir: str | Path, resume: bool = False,
                teacher: nn.Module | None = None, train_split: str = "train",
                eval_split: str | None = None) -> TrainResult:
    """Fine-tune ``model`` on ``data`` (ClassificationData: classification; TextData: causal LM) with ``method``.

    Checkpoints go to ``checkpoint_dir``; ``resume`` continues from its newest one. Returns the
    finalised model (``method.finalize``) unless the run stopped early (``config.stop_after``).
    """
    from prunekit.data import ClassificationData
    from prunekit.finetune.data import collator

    config = config or TrainConfig()
    method = method or TrainingMethod()
    classification = isinstance(data, ClassificationData)
    if classification and not is_classifier(model):
        raise PrunekitError(f"dataset '{data.name}' is labelled but the model is not a sequence classifier: load "
                            "the model for classification (an encoder such as minilm-l6)")
    if not classification and is_classifier(model):
        raise PrunekitError(f"dataset '{data.name}' has no labels: a classification model needs a labelled set "
                            "(reviews, glue/sst2, csv:PATH with a label column)")
    num_labels = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0) if classification else None
    config_obj: Any = getattr(model, "config", None)
    if classification and getattr(config_obj, "pad_token_id", None) is None and tokenizer is not None:
        config_obj.pad_token_id = tokenizer.pad_token_id
    train, evaluation, _ = build_datasets(tokenizer, data, config, train_split, eval_split, num_labels)
    processes = world_size()
    total = steps_for(len(train), config, processes)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint = last_checkpoint(checkpoint_dir)
    if resume and checkpoint is None:
        raise PrunekitError(f"--resume was given but '{checkpoint_dir}' holds no complete checkpoint: run without "
                            "--resume to start afresh")
    if not resume and checkpoint is not None:
        raise PrunekitError(f"'{checkpoint_dir}' holds checkpoints of an earlier run: pass --resume to continue it, "
                            "or delete that folder to start afresh")
    model = method.setup(model, total_steps=total, n_train=len(train))
    check_same_run(checkpoint_dir, run_signature(config, method, total, len(train)), resume)
    args = training_arguments(checkpoint_dir, config, total, not classification, evaluation is not None)
    trainer = PrunekitTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation,
        data_collator=collator("classification" if classification else "causal-lm", tokenizer),
        compute_metrics=accuracy_metrics if classification else None,
        preprocess_logits_for_metrics=_argmax if classification else None,
        callbacks=[MethodCallback(method, model, config.stop_after)], method=method, teacher=teacher,
        distill_temperature=config.distill_temperature, distill_alpha=config.distill_alpha,
        causal_lm=not classification)
    if checkpoint is not None:
        method.load_state_dict(torch.load(checkpoint / METHOD_STATE, map_location="cpu", weights_only=True))
    if config.progress:
        start_step = int(checkpoint.name.split("-")[-1]) if checkpoint is not None else 0
        end_step = min(total, config.stop_after) if config.stop_after is not None else total
        if trainer.is_world_process_zero():
            print(describe_work(end_step, config, processes, len(train), not classification, start_step), flush=True)
        trainer.add_callback(AnnounceTime(max(1, end_step - start_step)))
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    seconds = time.perf_counter() - start
    model.eval()
    stopped = trainer.state.global_step < total
    facts: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if not stopped:
        if processes > 1:  # before finalize, which may replace the layers the masks belong to
            extra["masks_agree_across_ranks"] = check_masks_agree(method, trainer.args.device)
        model, facts = method.finalize(model)
    history = [dict(entry) for entry in trainer.state.log_history]
    return TrainResult(model=model, facts=facts, history=history, steps=trainer.state.global_step, total_steps=total,
                       stopped_early=stopped, n_train=len(train), world_size=processes, train_seconds=seconds,
                       extra=extra)
