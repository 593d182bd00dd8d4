"""The `medlm` command.

Each flow command's options are generated from the flow's parameters: a config dataclass
parameter gives one option per field (``--vocab-size``; ``--tokenizer.vocab-size`` where two
configs share a field name), a plain parameter gives ``--corpus-ref``. ``--config FILE|NAME``
reads a run configuration (flows/configs/*.toml) first; options given override it. Flows are
imported only by the command that runs them, so ``medlm --help`` needs neither prefect nor torch.

A user error prints one line, ``error: ...``, and exits with status 2; ``--debug`` (or
MEDLM_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import typing
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

from flows.prefect_env import apply_prefect_defaults, crash_orphaned_runs, leased, send_prefect_backlog, settle_leases, temporary_server
from flows.registry import COMMANDS, current_name
from storage.config import ArgumentParser, ConfigError, add_config_options, config_values, make_config, read_run_config, shared_names
from storage.settings import described, settings
from storage.store import release_holds

OTHER_COMMANDS = {
    "demo": "The whole pipeline on the sample data that ships with the repository (CPU, tiny presets).",
    "train": "Pretrain without Prefect (the flags of `python -m model.train`; try `medlm train --help`).",
    "join": "Join, from this machine, a multi-node training run another node's stage started (--nodes N).",
    "export-hf": "Export a checkpoint so transformers' AutoModelForCausalLM / AutoTokenizer load it.",
    "store": "Inspect and tidy the artifact store: ls, verify, gc, pin, unpin, purge.",
    "lineage": "Show where an artifact came from, down to the source XML files and their md5s.",
    "chat": "Chat with a fine-tuned model (a finetune ref or folder): its chat template, streamed answers.",
    "worker": "Join a served stack (make up HOST=... on the head) from this machine, as a worker of one pool.",
    "settings": "Show the MEDLM_* settings medlm reads here: each value, where it came from, and what it sets.",
}


class UsageError(Exception):
    """What the user asked for cannot be done as asked; the message says what to do instead."""


class Terminated(BaseException):
    """SIGTERM arrived: the command stops as on Ctrl-C (a flow run is marked Crashed, not left
    Running; the temporary server stops), then exits at once with 143, whatever threads still run."""


STOPPED = "error: stopped by SIGTERM"
STOP_GRACE_S = 15  # what unwinding may take after SIGTERM (Slurm waits 30 s before SIGKILL)


def _terminate(signum, frame) -> None:
    raise Terminated()


_sigterm_watch: tuple[socket.socket, socket.socket] | None = None
# The running flow command's context: Prefect's settings (which server, its credentials) live in
# context variables, which a thread does not inherit; without them a client starts a server of its own.
_command_context: contextvars.Context | None = None


def _watch_for_sigterm() -> None:
    """Unwinding after SIGTERM can stall: during a flow run Prefect's handler takes the signal, and
    its engine then waits for the task threads, where training runs on. A thread of ours sees every
    signal through the wakeup fd, whichever handler runs, and ``STOP_GRACE_S`` after a SIGTERM
    marks this command's unfinished runs Crashed and exits 143 (its children die with it)."""
    global _sigterm_watch
    if _sigterm_watch is None:
        _sigterm_watch = socket.socketpair()
        _sigterm_watch[1].setblocking(False)
        signal.set_wakeup_fd(_sigterm_watch[1].fileno(), warn_on_full_buffer=False)
        threading.Thread(target=_stop_after_grace, args=(_sigterm_watch[0],), name="sigterm-watch", daemon=True).start()


def _stop_after_grace(signals: socket.socket) -> None:
    while (received := signals.recv(1)) and received[0] != signal.SIGTERM:
        pass
    if not received:
        return
    time.sleep(STOP_GRACE_S)
    try:
        if _command_context is not None:  # else no flow run has started
            _command_context.run(settle_leases, f"the medlm command running it was stopped by SIGTERM and had not ended the run {STOP_GRACE_S} s later")
    finally:  # with the server gone too, the next command marks them (crash_orphaned_runs)
        print(STOPPED, file=sys.stderr, flush=True)
        os._exit(143)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    signal.signal(signal.SIGTERM, _terminate)
    try:
        debug = debug or settings().debug  # a setting that does not parse is the one-line error below
        _dispatch(argv, debug)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # `medlm ... | head` has read what it wanted: no error, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except Terminated:
        print(STOPPED, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(143)  # a task's thread may still wait on a child (which the parent-death signal ends)
    except Exception as error:
        if debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)


def _one_line(error: BaseException) -> str:
    message = str(error).strip() or type(error).__name__
    if message.startswith("Failed to reach API at"):  # Prefect's, after its client's retries with back-off
        message += (" (PREFECT_API_URL: a served stack's API, with its credentials in PREFECT_API_AUTH_STRING; "
                    "unset it to run on a temporary server of this command's own)")
    if not isinstance(error, (ValueError, OSError, UsageError, RuntimeError, LookupError)) or isinstance(error, KeyError):
        message = f"{type(error).__name__}: {message} (a bug? run again with --debug for the traceback)"
    return " ".join(message.split())


def _dispatch(argv: list[str], debug: bool) -> None:
    command = current_name("command", argv[0]) if argv and not argv[0].startswith("-") else None
    if command == "release" and argv[1:2] == ["push"]:
        return _push_release(argv[2:])
    if command in COMMANDS or command == "demo":
        apply_prefect_defaults()
        asks_for_help = bool({"-h", "--help"} & set(argv[1:]))
        with nullcontext(lambda: None) if asks_for_help else temporary_server() as server_ready:
            if not debug:
                _console_without_tracebacks()
            return _run_flow(command, argv[1:], server_ready) if command in COMMANDS else _demo(argv[1:], server_ready)
    if command == "train":
        from model.training_stages import PRETRAINING

        _refuse_output_in_store(_value_of("--out", argv[1:]))
        PRETRAINING.main(argv[1:], prog="medlm train")
        return
    if command == "export-hf":
        return _export_hf(argv[1:])
    if command == "join":
        return _join(argv[1:])
    if command == "store":
        return _store(argv[1:])
    if command == "lineage":
        return _lineage(argv[1:])
    if command == "chat":
        return _chat(argv[1:])
    if command == "settings":
        return _settings(argv[1:])
    if command == "worker":  # the served stack's side (deployments/), reached from the one command users have
        from deployments.worker import main as worker

        return worker(argv[1:])
    parser = ArgumentParser(prog="medlm", description="medlm: train a medical language model from PubMed, as a Prefect pipeline.")
    parser.add_argument("command", choices=[*COMMANDS, *OTHER_COMMANDS], metavar="COMMAND")
    parser.epilog = "commands:\n" + "\n".join(
        f"  {name:<10} {text}" for name, text in [*((n, e.description) for n, e in COMMANDS.items()), *OTHER_COMMANDS.items()]
    ) + "\n\n`medlm COMMAND --help` lists a command's options. --debug shows tracebacks."
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.parse_args(argv or ["--help"])


def _console_without_tracebacks() -> None:
    """Prefect logs a failed run's traceback; on the console the one-line error says it all. The
    run's logs in the UI keep it: only the console's formatter (PrefectFormatter) changes, not
    the API log handler's."""
    from prefect.logging.formatters import PrefectFormatter

    format_record = PrefectFormatter.format

    def without_traceback(self, record: logging.LogRecord) -> str:
        # A copy: the API handler may already have cached the traceback text on the record.
        return format_record(self, logging.makeLogRecord(record.__dict__ | {"exc_info": None, "exc_text": None}))

    PrefectFormatter.format = without_traceback


# -- flows ------------------------------------------------------------------------------------------


def _load_flow(command: str):
    apply_prefect_defaults()
    return COMMANDS[command].load()


def flow_parameters(flow) -> tuple[dict[str, type], dict[str, typing.Any]]:
    """The flow's config parameters (name -> dataclass) and its plain parameters (name -> type hint)."""
    hints = typing.get_type_hints(flow.fn, include_extras=True)
    hints.pop("return", None)
    configs = {name: cls for name, cls in hints.items() if hasattr(cls, "__pydantic_fields__")}
    plain = {name: hint for name, hint in hints.items() if name not in configs}
    return configs, plain


def _description(hint) -> str:
    return next((m.description for m in getattr(hint, "__metadata__", ()) if getattr(m, "description", None)), "")


def _flow_parser(command: str, flow) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=f"medlm {command}", description=flow.fn.__doc__ or COMMANDS[command].description)
    parser.add_argument("--config", metavar="FILE|NAME", help="Run configuration: a TOML file or a name in flows/configs (demo, full).")
    configs, plain = flow_parameters(flow)
    for name, hint in plain.items():
        metavar = "REF" if name.endswith("_ref") else "FOLDER"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, metavar=metavar, help=_description(hint))
    # An option has one name in every command: qualified when two tables of a run configuration
    # (the pipeline's, which has them all) share the field name.
    shared = shared_names(flow_parameters(_load_flow("pipeline"))[0] | configs)
    for name, cls in configs.items():
        add_config_options(parser, name, cls, qualified=shared)
    return parser


def flow_arguments(flow, args: argparse.Namespace) -> dict:
    """The flow's keyword arguments: the run configuration's tables, overridden by the options given."""
    configs, plain = flow_parameters(flow)
    tables = read_run_config(args.config) if args.config else {}
    known = set(flow_parameters(_load_flow("pipeline"))[0]) | set(configs)
    if unknown := sorted(set(tables) - known):
        raise ConfigError(f"{args.config}: unknown table(s) {unknown}; run configurations have tables {sorted(known)}")
    kwargs = {name: make_config(cls, tables.get(name, {}) | config_values(args, name), where=name) for name, cls in configs.items()}
    kwargs |= {name: _checked(name, hint, getattr(args, name)) for name, hint in plain.items() if getattr(args, name) is not None}
    return kwargs


def _checked(name: str, hint, value):
    """A plain parameter's value as the flow will validate it, checked here: before any run is made."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(hint).validate_python(value)
    except ValidationError as e:
        raise ConfigError(f"{name}: " + "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())) from None


def _run_flow(command: str, argv: list[str], server_ready: Callable[[], None]):
    """Every option and configuration value is checked (types, bounds, the data paths a run may
    read) while the command's Prefect server starts (``temporary_server``), before any run is
    made: a wrong value costs the imports, and the server is stopped unused."""
    flow = _load_flow(command)
    args = _flow_parser(command, flow).parse_args([_current_option(arg) for arg in argv])
    kwargs = flow_arguments(flow, args)
    if before_start := getattr(sys.modules[flow.fn.__module__], "before_start", None):  # checks of a flow that need the store or the machine
        before_start(kwargs, read_run_config(args.config) if args.config else {}, args.config)
    _watch_for_sigterm()
    server_ready()
    global _command_context
    _command_context = contextvars.copy_context()
    crash_orphaned_runs()
    try:
        result = leased(flow)(**kwargs)
    finally:
        settle_leases("the medlm command running it stopped before the run ended (SIGTERM or Ctrl-C)")
        release_holds()
        send_prefect_backlog()
    print("\n".join(result) if isinstance(result, list) else result)
    return result


def _current_option(arg: str) -> str:
    """An option given by an old name (flows/registry.py ALIASES) as its new one, a value given with = kept."""
    option, equals, value = arg.partition("=")
    return current_name("option", option) + equals + value if option.startswith("--") else arg


def _demo(argv: list[str], server_ready: Callable[[], None]) -> None:
    parser = ArgumentParser(prog="medlm demo", description=OTHER_COMMANDS["demo"] + " Same as `medlm pipeline --config demo`.")
    parser.parse_args(argv)
    started = time.time()
    *evaluations, release = _run_flow("pipeline", ["--config", "demo"], server_ready)
    pipeline_seconds = time.time() - started
    from flows.finetune import comparison
    from storage import Store
    from storage.lineage import lineage, stage_times, table, tree_lines
    from storage.processes import process_age
    from tasks.evaluate import rows_markdown
    from storage.formats import MODEL_KINDS

    store = Store()
    print(f"\nDemo outputs are in {store.root.resolve()}:\n")
    print(table(*(lineage(store, ref) for ref in evaluations)))
    print("\nEvaluation, before and after each fine-tuning stage (a tiny model: near chance, every number real):\n")
    print(rows_markdown(comparison(store, evaluations)))
    model = next((p for p in store.require(evaluations[-1]).parents if p.split("/")[0] in MODEL_KINDS), evaluations[-1])
    print("Lineage of the final model:\n")
    print("\n".join(tree_lines(lineage(store, model))))
    print(f"\nTrace any of them with: medlm lineage {evaluations[-1]}")
    folder = store.require(release).path
    print(f"\nThe release ({release}), for transformers, llama.cpp and Ollama: {folder.resolve()}\n  " + "  ".join(sorted(p.name for p in folder.iterdir())))
    if model.startswith(("finetune/", "dpo/")):
        from model.chat import DISCLAIMER, Chat

        question = "Does aspirin lower the risk of stroke?"
        notes: list[str] = []
        answer = "".join(Chat(store.require(model).path, notify=notes.append).reply(question)).strip()
        print(f'\nmedlm chat {model} --message "{question}"  (a tiny model: words, not yet answers)\n{DISCLAIMER}\n' + "".join(n + "\n" for n in notes) + answer)
    print("\nWhere the time went: each stage's build seconds in this run (the downloads and parses overlap), or cached:\n")
    print(stage_times(*(lineage(store, ref) for ref in [*evaluations, release]), since=started))
    print(f"\nmedlm demo: {process_age():.1f} s in all, of which the pipeline {pipeline_seconds:.1f} s (the flow run, and what was left of starting Prefect's"
          " temporary server after the imports); the rest is starting Python, the imports, the tables above and the chat answer")


def _settings(argv: list[str]) -> None:
    ArgumentParser(prog="medlm settings", description=OTHER_COMMANDS["settings"] + " An empty variable counts as unset, but an empty list is a list.").parse_args(argv)
    print("\n".join(described(settings())))


# -- the store ----------------------------------------------------------------------------------------


def _store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, help="Artifact store root [default: MEDLM_STORE; `medlm settings` shows it].")


def _open_store(args):
    from storage import Store

    return Store(args.store)


def _store(argv: list[str]) -> None:
    parser = ArgumentParser(prog="medlm store", description=OTHER_COMMANDS["store"])
    sub = parser.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("ls", help="List the complete artifacts, and what is in quarantine.")
    ls.add_argument("kind", nargs="?", help="Only this kind (download, parse, corpus, ...).")
    verify = sub.add_parser("verify", help="Re-hash every file of an artifact against its manifest.")
    verify.add_argument("ref")
    purge = sub.add_parser("purge", help="Delete the artifacts in quarantine (moved aside after failing a check).")
    gc = sub.add_parser("gc", help="Remove old artifacts that nothing kept needs (a dry run unless --yes).")
    gc.add_argument("--keep-last", type=int, required=True, metavar="N", help="Keep the newest N artifacts of each kind, and everything they came from.")
    gc.add_argument("--kind", action="append", dest="kinds", metavar="KIND", help="Only remove artifacts of this kind (repeatable) [default: every kind].")
    gc.add_argument("--min-age-hours", type=float, default=24, help="Never remove an artifact younger than this [default: 24].")
    gc.add_argument("--remote", action="store_true", help="Plan (and remove) on the remote (MEDLM_REMOTE), not this machine's copies.")
    verify.add_argument("--remote", action="store_true", help="Re-hash the remote's copy (every blob downloaded) instead of this machine's.")
    pin = sub.add_parser("pin", help="Keep an artifact (and everything it came from) whatever gc decides.")
    unpin = sub.add_parser("unpin", help="Let gc decide about an artifact again.")
    for p in (pin, unpin):
        p.add_argument("ref")
    purge.add_argument("--yes", action="store_true", help="Delete without asking.")
    gc.add_argument("--yes", action="store_true", help="Remove them (without it: a dry run, which only lists them).")
    for p in (ls, verify, purge, gc, pin, unpin):
        _store_argument(p)
    args = parser.parse_args(argv)
    store = _open_store(args)
    if args.action == "ls":
        from storage.lineage import summary_line

        artifacts = store.ls(args.kind)
        newest = {a.kind: a.ref for a in artifacts}  # ls sorts by creation: the last of a kind is what a default picks
        for a in artifacts:
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(a.manifest.get("created", 0)))
            mark = "newest" if newest[a.kind] == a.ref else ""
            where = "" if a.present else "  (on the remote only)"
            print(f"{a.ref:<32} {created}  {mark:<6}  {a.label or summary_line(a.summary)}{where}")
        if artifacts:
            print("\n(times UTC; `newest` is what a command picks when no ref is given)")
        if not artifacts:
            print(f"no artifacts in {store.root}")
        quarantined = store.quarantined()
        if quarantined:
            print("\nquarantined (failed a check; kept, not used; `medlm store purge` deletes them):")
            for item in quarantined:
                print(f"{item['ref']:<40} {item['path']}  {item['reasons'][0]}")
    elif args.action == "verify":
        ref = store.resolve(args.ref)
        if args.remote and store.remote is None:
            raise UsageError("this store has no remote: set MEDLM_REMOTE")
        if problems := (store.remote.problems(ref) if args.remote else store.problems(ref)):
            print(f"error: {ref} does not verify: " + "; ".join(problems), file=sys.stderr)
            sys.exit(1)
        print(f"{ref}: ok")
    elif args.action == "purge":
        quarantined = store.quarantined()
        if quarantined and _confirmed(f"delete the {len(quarantined)} quarantined artifact(s) in {store.root / '.quarantine'}?", args.yes):
            removed = store.purge_quarantine()
            print(f"deleted {len(removed)} quarantined artifact(s)" + "".join(f"\n  {item['path']}" for item in removed))
        elif not quarantined:
            print("nothing in quarantine")
    elif args.action == "gc":
        from storage.retention import plan_removal, remove

        plan = plan_removal(store, args.keep_last, kinds=args.kinds, min_age_s=args.min_age_hours * 3600, on_remote=args.remote)
        print("\n".join(plan.lines()))
        if args.yes:
            print(f"removed {len(remove(store, plan))} artifact(s)")
        elif plan.remove:
            print("a dry run: nothing was removed (--yes removes them)")
    else:
        print(f"pinned {store.pin(args.ref)}" if args.action == "pin" else f"unpinned {store.unpin(args.ref)}")


def _confirmed(question: str, yes: bool) -> bool:
    """--yes, or the user's answer at a terminal; without either, one line saying how."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError(f"{question} Nothing was deleted: give --yes to do it without asking")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _lineage(argv: list[str]) -> None:
    parser = ArgumentParser(prog="medlm lineage", description=OTHER_COMMANDS["lineage"])
    parser.add_argument("ref", help="An artifact ref, e.g. pretrain/3f9a...")
    show = parser.add_mutually_exclusive_group()
    show.add_argument("--json", action="store_true", help="Nested JSON instead of a tree.")
    show.add_argument("--dot", action="store_true", help="Graphviz: medlm lineage REF --dot | dot -Tsvg > lineage.svg")
    show.add_argument("--diff", metavar="OTHER_REF", help="What differs between the two ancestries: source files added or removed, parameters changed, stage by stage.")
    _store_argument(parser)
    args = parser.parse_args(argv)
    from storage.lineage import diff, dot, lineage, tree_lines

    store = _open_store(args)
    root = lineage(store, store.require(args.ref).ref)
    if args.diff:
        print("\n".join(diff(root, lineage(store, store.require(args.diff).ref))))
    elif args.dot:
        print(dot(root))
    else:
        print(json.dumps(root.as_dict(), indent=2) if args.json else "\n".join(tree_lines(root)))


def _chat(argv: list[str]) -> None:
    parser = ArgumentParser(prog="medlm chat", description=OTHER_COMMANDS["chat"])
    parser.add_argument("model", help="A finetune ref (finetune/3f9a...: a unique prefix will do) or a model folder with a chat template.")
    _store_argument(parser)
    from model.chat import add_chat_options, chat_from

    add_chat_options(parser)
    args = parser.parse_args(argv)
    chat_from(_chat_folder(args.model, args), args)


def _push_release(argv: list[str]) -> None:
    parser = ArgumentParser(prog="medlm release push", description="Upload a release folder to a Hugging Face Hub model repository (created if missing). "
                            "The token: HF_TOKEN, or `hf auth login` once.")
    parser.add_argument("repo", help="The Hub repository, USER/NAME or ORG/NAME.")
    parser.add_argument("--ref", help="The release to upload, release/KEY [default: the newest].")
    parser.add_argument("--private", action="store_true", help="Create the repository private.")
    _store_argument(parser)
    args = parser.parse_args(argv)
    from tasks.release import push_release

    store = _open_store(args)
    print(push_release((store.require(args.ref) if args.ref else store.newest("release")).path, args.repo, private=args.private))


def _model_folder(model: str, args) -> Path:
    """A folder given as a path, or an artifact's folder given as its ref (fetched from the remote if need be)."""
    return _open_store(args).require(model).path if _names_an_artifact(model) else Path(model)


def _names_an_artifact(model: str) -> bool:
    return not Path(model).is_dir() and "/" in model and not model.startswith((".", "/"))


def _chat_folder(model: str, args) -> Path:
    """``_model_folder``, checked to hold a model with a chat template before anything loads it."""
    if _names_an_artifact(model):
        artifact = _open_store(args).require(model)
        if artifact.kind not in ("finetune", "dpo", "hf_model"):
            raise UsageError(f"{artifact.ref} is a {artifact.kind}, not a model to chat with: give a finetune or dpo ref (medlm ls finetune)")
        folder = artifact.path
    elif not (folder := Path(model)).is_dir():
        raise UsageError(f"{model}: no such folder or artifact; give a finetune or dpo ref (medlm ls finetune) or a model folder")
    if not (folder / "config.json").is_file() or "chat_template" not in _json_or_empty(folder / "tokenizer_config.json"):
        raise UsageError(f"{model}: not a model folder with a chat template (config.json, and tokenizer_config.json's chat_template); "
                         "give a finetune or dpo ref (medlm ls finetune) or a folder fine-tuning wrote")
    return folder


def _json_or_empty(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _join(argv: list[str]) -> None:
    parser = ArgumentParser(prog="medlm join", description=OTHER_COMMANDS["join"])
    parser.add_argument("rdzv_id", help="The run's rdzv_id, as given to the stage (e.g. $SLURM_JOB_ID).")
    parser.add_argument("--timeout", type=float, default=600, help="Seconds to wait for the stage to announce the run [default: 600].")
    args = parser.parse_args(argv)
    from model.distributed import join

    join(args.rdzv_id, args.timeout)


# -- writing outside the store --------------------------------------------------------------------------


def _value_of(option: str, argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def _refuse_output_in_store(path: str | os.PathLike | None) -> None:
    """Nothing but the store writes inside the store: published artifacts are immutable."""
    if path is None:
        return
    from storage import Store

    target, store = Path(path).resolve(), Store()
    inside_artifact = any((folder / "manifest.json").is_file() for folder in [target, *target.parents])
    if store.contains(target) or inside_artifact:
        raise UsageError(f"{path} is inside the artifact store ({store.root}); published artifacts are read-only: write to a folder outside it")


def _export_hf(argv: list[str]) -> None:
    parser = ArgumentParser(prog="medlm export-hf", description=OTHER_COMMANDS["export-hf"])
    parser.add_argument("checkpoint", help="A checkpoint: a ref (pretrain/3f9a, finetune/...: a unique prefix will do), a checkpoint artifact folder or a ckpt_NNNNNNN folder.")
    parser.add_argument("out", type=Path, help="Folder to write the Hugging Face model into (outside the store).")
    parser.add_argument("--tokenizer", type=Path, help="Tokenizer folder to copy in (a checkpoint artifact already has one).")
    parser.add_argument("--force", action="store_true", help="Write into OUT even if it holds files (theirs may be overwritten).")
    _store_argument(parser)
    args = parser.parse_args(argv)
    _refuse_output_in_store(args.out)
    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        raise UsageError(f"{args.out} is not empty: its files would be overwritten; name an empty or new folder, or give --force")
    from model.export_hf import export_hf
    from storage.formats import TOKENIZER_FILES

    folder = _model_folder(args.checkpoint, args)
    tokenizer = args.tokenizer
    if tokenizer is None and all((folder / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = folder
    print(export_hf(folder, args.out, tokenizer))


if __name__ == "__main__":
    main()
