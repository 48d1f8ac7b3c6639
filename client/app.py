"""The ClientApp each hospital runs: Message in, Message out.

Each handler reads the experiment settings and the hospital's own settings
once at the top, calls a plain function of :mod:`client.local`, and packs
the reply. Only model weights and scalar metrics leave the hospital. A run's
privacy history lives in the hospital's ledger alone (the node's state holds
only the last global weights received, :mod:`client.held_weights`), so a
restarted node continues from it.
"""

from __future__ import annotations

# First of all: MONAI imported once, whole, before another thread can race it
# (Flower's simulation process imports the ServerApp and the ClientApp at once)
import common.monai_first  # noqa: F401  # isort: skip

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from client.clipping import client_level_clipping_mod
from client.guard import only_weights_mod
from client.held_weights import digest_named, held_weights_mod
from client.hospital import RoundDeclinedError, hospital_from_node_config
from client.local import evaluate_round, train_round
from client.personalise import personalise_and_score
from client.privacy_ledger import LedgerError
from common import wire
from common.config import settings_from_json
from common.logs import medfed_logger

DECLINED = 4001
"""Error code of a round a hospital declines (its policy, its privacy ceiling, an
unreadable ledger)."""

log = medfed_logger()

# The guard is outermost: it sees the reply exactly as it would leave. Inside it,
# held global weights go into a training message that names their digest.
app = ClientApp(mods=[only_weights_mod, held_weights_mod, client_level_clipping_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this hospital's images."""
    # Settings: the experiment (run config) and this hospital (node config)
    settings = settings_from_json(str(context.run_config[wire.RUN_CONFIG_KEY]))
    hospital = hospital_from_node_config(context.node_config, settings)
    config = msg.content.config_records[wire.CONFIG]

    # The global weights: sent, or held since the last evaluation (put in place by
    # held_weights_mod); a node that does not hold them asks for them in full
    if wire.ARRAYS not in msg.content.array_records:
        digest = digest_named(msg)
        named = f"with digest {digest[:12]}..." if digest else "(neither sent nor named)"
        log.info("[MedFed] %s does not hold the global weights %s; asking for them",
                 hospital.name, named)
        return Message(Error(code=wire.WEIGHTS_NOT_HELD,
                             reason=f"{hospital.name} does not hold the global weights "
                                    f"{named}; send them in full"),
                       reply_to=msg)

    # Train locally on the global weights (declined if the hospital's policy
    # forbids the round or DP-SGD would cross its ceiling)
    try:
        result = train_round(
            settings,
            hospital,
            msg.content.array_records[wire.ARRAYS].to_torch_state_dict(),
            server_round=int(wire.scalar(config[wire.SERVER_ROUND])),
            proximal_mu=wire.scalar(config.get(wire.PROXIMAL_MU, 0.0)),
            run_id=str(context.run_id),
        )
    except (RoundDeclinedError, LedgerError) as err:
        log.warning("[MedFed] %s declines round: %s", hospital.name, err)
        return Message(Error(code=DECLINED, reason=f"{hospital.name}: {err}"), reply_to=msg)

    # Reply with the weights and scalar metrics only
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(result.weights),
        wire.METRICS: wire.metric_record(result.metrics),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global model on this hospital's held-out images."""
    settings = settings_from_json(str(context.run_config[wire.RUN_CONFIG_KEY]))
    hospital = hospital_from_node_config(context.node_config, settings)

    config = msg.content.config_records.get(wire.CONFIG)
    server_round = int(wire.scalar(config[wire.SERVER_ROUND])) if config else 0

    # Score the global model on the test split and, in the rounds model
    # selection asks for and where the hospital's policy lets them leave,
    # on the validation split
    weights = msg.content.array_records[wire.ARRAYS].to_torch_state_dict()
    # After training, when the server asks: fine-tune locally, score both models
    # (the personalised weights never leave this hospital)
    epochs = int(wire.scalar(config.get(wire.PERSONALISE_EPOCHS, 0))) if config else 0
    if epochs > 0:
        metrics = {k: v for k, v in personalise_and_score(
            settings, hospital, weights, epochs=epochs).items() if k in hospital.allowed_metrics}
        return Message(content=RecordDict({wire.METRICS: wire.metric_record(metrics)}),
                       reply_to=msg)
    validate = (settings.selection.due(server_round, settings.federation.rounds)
                and wire.VAL_NUM_EXAMPLES in hospital.allowed_metrics)
    metrics = evaluate_round(settings, hospital, weights, validate=validate)
    # Only what the hospital's policy lets leave (a hospital that withholds the ROC
    # counts is scored at the fixed threshold; see server/threshold.py)
    metrics = {k: v for k, v in metrics.items() if k in hospital.allowed_metrics}

    return Message(content=RecordDict({wire.METRICS: wire.metric_record(metrics)}),
                   reply_to=msg)
