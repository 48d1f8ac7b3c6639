"""Personalisation after federated training: the coordinator's side.

After the last round, :func:`personalise` sends the final global model (the
validation-selected ``best_model.pt`` when the run wrote one) to every
hospital in one extra evaluation message whose config carries
``personalise-epochs``. Each hospital fine-tunes it on its own training split
(:mod:`client.personalise`), keeps the personalised weights to itself, and
replies with the global and the personalised model's metrics on its test
split. Replies are checked like every evaluation reply
(:func:`server.replies.evaluate_reply_problem`); a failed or unsound one is
logged and left out. The result goes into ``summary.json`` under
``personalised``: per hospital ``{"global": {...}, "personalised": {...},
"epochs": k}`` (``personalised`` null where the hospital skipped it, e.g.
under DP-SGD), plus both weighted by test samples under ``overall``, and
into ``metrics.jsonl`` as ``personalise`` rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import wire
from common.config import Settings
from common.logs import medfed_logger
from common.transfer import TransferReport
from server.checkpoint import FINAL_MODEL
from server.replies import evaluate_reply_problem
from server.report import METRICS_FILE, SUMMARY_FILE, RunRecorder, atomic_write_text
from server.selection import BEST_MODEL

PHASE = "personalise"

log = medfed_logger()
Scores = dict[str, float]


def model_to_personalise(run_dir: Path, final: Mapping[str, torch.Tensor]
                         ) -> tuple[str, dict[str, torch.Tensor]]:
    """``best_model.pt`` of the run folder if there is one, else the final weights."""
    best = run_dir / BEST_MODEL
    if best.is_file():
        return BEST_MODEL, torch.load(best, map_location="cpu", weights_only=True)
    return FINAL_MODEL, dict(final)


def split_metrics(metrics: Mapping[str, Any]) -> tuple[Scores, Scores | None]:
    """A reply's metrics as (global model's, personalised model's or None if skipped)."""
    own = {k: float(v) for k, v in metrics.items()
           if k not in wire.IDENTITY_KEYS and not k.startswith(wire.PERSONAL_PREFIX)
           and not k.startswith(wire.VALIDATION_PREFIX) and not isinstance(v, list)}
    personal = {k[len(wire.PERSONAL_PREFIX):]: float(v) for k, v in metrics.items()
                if k.startswith(wire.PERSONAL_PREFIX) and k != wire.PERSONAL_EPOCHS
                and not isinstance(v, list)}
    return own, (personal or None)


def weighted(rows: list[Scores]) -> Scores:
    """Every metric averaged over ``rows`` weighted by ``num-examples`` (which is summed)."""
    total = sum(r.get(wire.NUM_EXAMPLES, 0.0) for r in rows)
    if total <= 0:
        return {}
    keys = {k for r in rows for k in r} - {wire.NUM_EXAMPLES}
    out = {}
    for key in sorted(keys):
        having = [r for r in rows if key in r]
        weight = sum(r[wire.NUM_EXAMPLES] for r in having)
        out[key] = sum(r[key] * r[wire.NUM_EXAMPLES] for r in having) / weight
    return {**out, wire.NUM_EXAMPLES: total}


def _sound(replies: Iterable[Message], sent: dict[str, int], recorder: RunRecorder,
           round_: int) -> list[dict[str, Any]]:
    """The metrics of every sound reply; failures and unsound replies are logged."""
    sound = []
    for msg in replies:
        node = f"node {sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)}"
        problem = (str(msg.error.reason) if msg.has_error()
                   else evaluate_reply_problem(msg))
        if problem:
            recorder.failure(round_, PHASE, node, problem if msg.has_error()
                             else f"reply dropped: {problem}")
            continue
        sound.append(dict(msg.content[wire.METRICS]))
    return sound


def _by_hospital(replies: list[dict[str, Any]], recorder: RunRecorder) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metrics in replies:
        name = recorder.name(metrics)
        own, personal = split_metrics(metrics)
        out[name] = {"global": own, "personalised": personal,
                     "epochs": int(metrics.get(wire.PERSONAL_EPOCHS, 0))}
        headline = next((k for k in ("auc", "dice") if k in own), "loss")
        after = f"{personal[headline]:.4f}" if personal and headline in personal else "skipped"
        log.info("[MedFed] personalised %s: test %s %.4f global -> %s personalised "
                 "(%d epochs kept)", name, headline, own.get(headline, float("nan")), after,
                 out[name]["epochs"])
    return dict(sorted(out.items()))


def _append_rows(run_dir: Path, round_: int, hospitals: dict[str, Any]) -> None:
    with open(run_dir / METRICS_FILE, "a") as handle:
        for name, both in hospitals.items():
            for model in ("global", "personalised"):
                if both[model] is not None:
                    handle.write(json.dumps({"round": round_, "phase": PHASE, "hospital": name,
                                             "model": model, **both[model]}) + "\n")


def personalise(grid: Grid, settings: Settings, final: Mapping[str, torch.Tensor],
                recorder: RunRecorder) -> dict[str, Any] | None:
    """Have every hospital fine-tune and score the model; None when ``personalise.epochs=0``.

    Args:
        grid: the ServerApp's grid (all connected hospitals are asked).
        settings: the experiment (``personalise.*``).
        final: the final global weights (used unless ``best_model.pt`` exists).
        recorder: the run's recorder (names hospitals, logs failures).

    Returns:
        ``{"model", "epochs", "hospitals", "overall"}`` for ``summary.json``.
    """
    tune = settings.personalise
    if tune.epochs == 0:
        return None
    source, weights = model_to_personalise(Path(settings.run_dir), final)
    round_ = settings.federation.rounds
    config = ConfigRecord({wire.PERSONALISE_EPOCHS: tune.epochs, wire.SERVER_ROUND: round_})
    content = RecordDict({wire.ARRAYS: ArrayRecord(weights), wire.CONFIG: config})
    messages = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node)
                for node in grid.get_node_ids()]
    log.info("[MedFed] personalisation: %d hospitals fine-tune %s for up to %d epochs",
             len(messages), source, tune.epochs)
    replies = list(grid.send_and_receive(messages, timeout=tune.timeout_s))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    hospitals = _by_hospital(_sound(replies, sent, recorder, round_), recorder)
    answered = {sent.get(m.metadata.reply_to_message_id) for m in replies}
    for node in sorted(set(sent.values()) - answered):
        recorder.failure(round_, PHASE, f"node {node}", f"no reply within {tune.timeout_s:g} s")
    _append_rows(Path(settings.run_dir), round_, hospitals)
    tuned = [h for h in hospitals.values() if h["personalised"] is not None]
    return {"model": source, "epochs": tune.epochs, "hospitals": hospitals,
            "overall": {"global": weighted([h["global"] for h in tuned]),
                        "personalised": weighted([h["personalised"] for h in tuned])}}


def extend_summary(run_dir: Path, summary: dict[str, Any], *,
                   transfer: TransferReport | None = None,
                   personalised: dict[str, Any] | None = None) -> dict[str, Any]:
    """``summary`` with ``transfer`` and ``personalised`` sections, rewritten atomically."""
    if transfer is None and personalised is None:
        return summary
    summary = dict(summary)
    if transfer is not None:
        summary["transfer"] = {k: v for k, v in transfer.to_json().items()
                               if not k.startswith("first_")}
    if personalised is not None:
        summary["personalised"] = personalised
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary
