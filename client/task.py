"""The hospital's answers to messages, by approved code only: a process per run and bundle.

:mod:`client.runner` starts ``python -m client.task`` for the tasks its
SuperNode holds; for each task it does what Flower's ``flwr-clientapp``
does, with the hospital's checks around the app:

1. pull the message, context, run and bundle from the node's local
   ClientApp runtime API (Flower's ``pull_task_input``);
2. hash the bundle from its bytes (:func:`client.bundle.read_bundle`), keep
   it for review and note the offer (:class:`client.approval.AppStore`);
3. if the hospital has not approved that hash: nothing of the bundle is
   unpacked, imported or run; the reply is an error (code
   :data:`NOT_APPROVED`) naming the hash, and the hospital's log says how to
   review and approve it;
4. otherwise install it with Flower's installer into the hospital's
   ``apps/installed/HASH/``, load its ClientApp with Flower's loader and run
   it, exactly as ``flwr-clientapp`` would (the app's declared dependencies
   are never installed: the hospital's environment is used as it is);
5. record the final reply in the hospital's audit log (:mod:`client.audit`),
   then push it (Flower's ``push_message``). A reply that cannot be
   recorded is not sent: an error reply goes instead.

One process answers task after task of one run and one bundle: the runner
hands it each task's token on standard input and reads ``idle`` back on a
pipe of its own when it is done. So PyTorch and MONAI are imported once a
run instead of once a message (as a simulated hospital's Ray actor imports
them once). Every task still pulls its own message, context and bundle, is
checked against the approvals, recorded and pushed on its own; a task of
another run or bundle is given another process.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.telemetry import EventType
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from client import audit
from client.approval import AppStore, review_commands
from client.bundle import Bundle, BundleError, read_bundle
from common.logs import medfed_logger

NOT_APPROVED = 4005
"""Error code of the reply to a message whose bundle this hospital has not approved."""
IDLE = "idle"
"""What a task process writes on its ready pipe (``--ready-fd``) after each task."""
NOT_RECORDED = 4006
"""Error code sent instead of a reply that could not be written to the audit log."""

log = medfed_logger()


def install(store: AppStore, bundle: Bundle, fab: bytes) -> Path:
    """Unpack an approved bundle once (Flower's installer, into ``apps/installed/HASH``).

    Unpacked into a temporary folder first and moved in place, so a crash
    never leaves a half-installed app that a later message would load.
    """
    target = store.installed / bundle.hash
    if not target.is_dir():
        store.installed.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=store.installed, prefix=".unpacking-"))
        try:
            install_from_fab(fab, install_dir=staging, skip_prompt=True)
            if not target.is_dir():  # another message may have installed it meanwhile
                os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    (app_dir,) = (target / "apps").iterdir()
    return app_dir


def forget_hospital_modules(bundle: Bundle) -> None:
    """Drop this process' already imported modules that the bundle also provides.

    The runner itself is MedFed code (``client``, ``common``): without this,
    ``import client.app`` would find the hospital's installed package instead
    of the bundle's, mixing two versions. Functions already imported here
    keep working; the app's imports now resolve in the bundle's folder.
    """
    for name in list(sys.modules):
        if name.split(".")[0] in bundle.top_level and name != "__main__":
            del sys.modules[name]
    importlib.invalidate_caches()


def run_approved(store: AppStore, bundle: Bundle, fab: bytes, run: Run, message: Message,
                 context: Context, loaded: dict[str, ClientApp]) -> Message:
    """Install, load and run the approved app on one message, as ``flwr-clientapp`` does.

    ``loaded`` keeps the ClientApp of each bundle hash this process loaded
    (a bundle is installed and imported once per process).
    """
    app_dir = None
    if bundle.hash not in loaded:
        app_dir = install(store, bundle, fab)
        forget_hospital_modules(bundle)
    try:
        if app_dir is not None:
            load = get_load_client_app_fn(default_app_ref="", app_path=str(app_dir),
                                          multi_app=True)
            loaded[bundle.hash] = load(run.fab_id, run.fab_version, "")
        return loaded[bundle.hash](message=message, context=context)
    except Exception as err:  # noqa: BLE001 - Flower's own handling, as in flwr-clientapp
        log.error("[MedFed] the ClientApp raised %s", type(err).__name__, exc_info=err)
        if isinstance(err, LoadClientAppError):
            return Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=(
                "An exception was raised when attempting to load `ClientApp`")), reply_to=message)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             reason=f"the ClientApp raised {type(err).__name__}"),
                       reply_to=message)


def answer(store: AppStore, home: Path, run: Run, fab: bytes, message: Message,
           context: Context, loaded: dict[str, ClientApp]) -> tuple[str, Message]:
    """The bundle hash and the reply: the approved app's, or a refusal."""
    try:
        bundle = read_bundle(fab)
    except BundleError as err:
        log.error("[MedFed] run %s: refused an unreadable app bundle: %s", run.run_id, err)
        return "unreadable", Message(Error(code=NOT_APPROVED, reason=(
            f"refused by the hospital: unreadable app bundle ({err})")), reply_to=message)
    store.record_offer(bundle, fab, run.run_id)
    if bundle.hash not in store.approved():
        log.warning("[MedFed] run %s: refused app bundle %s (%s, clientapp %s): this hospital "
                    "has not approved it; nothing of it was run. To run it, %s", run.run_id,
                    bundle.hash, bundle.label, bundle.clientapp,
                    review_commands(bundle.hash, home))
        return bundle.hash, Message(Error(code=NOT_APPROVED, reason=(
            f"refused by the hospital: app bundle {bundle.hash} is not approved there "
            f"(it must run `python -m client approve {bundle.hash}`)")), reply_to=message)
    return bundle.hash, run_approved(store, bundle, fab, run, message, context, loaded)


def round_of(message: Message) -> int | str | None:
    """The round a message belongs to: its config's ``server-round`` (Flower's strategies set
    it), else its group ID, else None."""
    if not message.has_content():
        return None
    for record in message.content.config_records.values():
        if isinstance(record.get("server-round"), int):
            return int(record["server-round"])  # type: ignore[arg-type]
    return message.metadata.group_id or None


def recorded(home: Path, app_hash: str, message: Message, reply: Message) -> Message:
    """Write the reply to the audit log; an error reply instead if that fails."""
    fields = {"run_id": message.metadata.run_id, "node_id": message.metadata.dst_node_id,
              "app_hash": app_hash, "message_type": message.metadata.message_type,
              "round": round_of(message)}
    try:
        entry = audit.append(home / audit.AUDIT_FILE, {**fields, **audit.describe(reply)})
    except (audit.AuditError, OSError) as err:
        log.error("[MedFed] reply not sent: it could not be recorded: %s", err)
        return Message(Error(code=NOT_RECORDED, reason="refused by the hospital: its audit "
                             "record could not be written"), reply_to=message)
    log.info("[MedFed] audit entry %d recorded (%s)", entry["seq"], entry["hash"][:16])
    return reply


def parse(argv: list[str]) -> argparse.Namespace:
    """Command line (the runner builds it)."""
    p = argparse.ArgumentParser(prog="python -m client.task", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime-api-address", required=True, help="the node's runtime API")
    p.add_argument("--home", type=Path, required=True, help="the hospital's node folder")
    p.add_argument("--parent-pid", type=int, help="stop when this process (the runner) ends")
    p.add_argument("--ready-fd", type=int, required=True,
                   help=f"answer task after task, one token per line on standard input (kept "
                        f"off the command line), writing '{IDLE}' to this file descriptor "
                        f"after each; exit at the end of input")
    return p.parse_args(argv)


def runtime_client(address: str, token: str) -> RuntimeHttpClient:
    """HTTP client of the node's runtime API, authenticated with the task's token."""
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())


def serve(client: RuntimeHttpClient, home: Path, outcome: dict[str, object],
          loaded: dict[str, ClientApp]) -> int:
    """Pull the task, answer it, record and push the reply; fills ``outcome`` for the node."""
    message: Message | None = None
    code, reply = ExitCode.SUCCESS, None
    try:
        message, context, run, fab = pull_task_input(client)
        outcome["context"] = context
        app_hash, reply = answer(AppStore(home), home, run, fab.content, message, context,
                                 loaded)
    except Exception as err:  # noqa: BLE001 - the node gets a failed task and an error reply
        log.error("[MedFed] task failed: %s", err, exc_info=err)
        code, app_hash = ExitCode.TASK_PROC_EXCEPTION, "unknown"
        if message is not None:  # exception text may quote local paths: only its type leaves
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=(
                f"the hospital's runner failed ({type(err).__name__})")), reply_to=message)
    if message is None or reply is None or not isinstance(outcome["context"], Context):
        return code
    reply = recorded(home, app_hash, message, reply)
    outcome["status"], outcome["details"] = ((SubStatus.FAILED, str(reply.error.reason))
                                             if reply.has_error() else (SubStatus.COMPLETED, ""))
    try:
        push_message(client, reply, outcome["context"])
    except Exception as err:  # noqa: BLE001
        log.error("[MedFed] the reply could not be handed to the node: %s", err)
        code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
    return code


def answer_task(address: str, home: Path, token: str, loaded: dict[str, ClientApp],
                finishing: list[Callable[[], None]]) -> int:
    """Answer the task of ``token`` (pull, check, run if approved, record, push) and report
    its final status and context to the node, as ``flwr-clientapp`` does; the exit code.

    ``finishing`` holds that last report while the task runs, for a signal to run it.
    """
    client = runtime_client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    outcome: dict[str, object] = {"context": None, "status": SubStatus.FAILED,
                                  "details": "the hospital's task failed"}

    def finish() -> None:  # final status and context to the node, exactly once
        finishing.remove(finish)
        context = outcome["context"]
        push_task_output(client=client, context=context if isinstance(context, Context) else None,
                         sub_status=str(outcome["status"]), details=str(outcome["details"]))
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()

    finishing.append(finish)
    heartbeat.start()
    try:
        return serve(client, home, outcome, loaded)
    finally:
        if finish in finishing:
            finish()


def main(argv: list[str]) -> None:
    """Answer each task handed over until the end of input; exits the process."""
    args = parse(argv)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    loaded: dict[str, ClientApp] = {}
    finishing: list[Callable[[], None]] = []  # the running task's last report, on a signal

    def on_exit() -> None:
        for finish in list(finishing):
            finish()

    register_signal_handlers(event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE,
                             exit_message="Task stopped.", exit_handlers=[on_exit])
    code = ExitCode.SUCCESS
    with os.fdopen(args.ready_fd, "w") as ready:
        for line in sys.stdin:  # one token per task; the runner closes the pipe to stop us
            code = answer_task(args.runtime_api_address, args.home, line.strip(), loaded,
                               finishing)
            ready.write(IDLE + "\n")
            ready.flush()
    flwr_exit(code=code, event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)


if __name__ == "__main__":
    main(sys.argv[1:])
