"""The ``appliance`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance import __version__
from appliance import config as config_mod


def _shape(text: str) -> tuple[int, int, int]:
    """'COLSxROWSxSLICES' (e.g. 512x512x64) -> (slices, rows, columns)."""
    try:
        cols, rows, slices = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be COLUMNSxROWSxSLICES, e.g. 512x512x64, not {text!r}")
    if min(cols, rows, slices) < 1 or max(cols, rows) > 4096:
        raise argparse.ArgumentTypeError(f"shape out of range: {text}")
    return slices, rows, cols


def _cmd_run(args: argparse.Namespace) -> int:
    from appliance.daemon import Daemon
    from appliance.logging import configure

    cfg = config_mod.load(args.config)
    configure(args.log_level)
    try:
        daemon = Daemon(cfg)
    except Exception as exc:  # a configuration or model that cannot run: say why, exit non-zero
        print(f"appliance cannot start: {exc}", file=sys.stderr)
        return 2
    return daemon.run_forever()


def _cmd_echo(args: argparse.Namespace) -> int:
    from appliance.dicom.scu import SendError, echo

    try:
        status = echo(args.host, args.port, args.aet, args.aec)
    except SendError as exc:
        print(f"echo failed: {exc}", file=sys.stderr)
        return 2
    print(f"C-ECHO {args.aec}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def _cmd_send(args: argparse.Namespace) -> int:
    from appliance.dicom.scu import send_folder

    if not args.folder.is_dir():
        print(f"not a folder: {args.folder}", file=sys.stderr)
        return 2
    report = send_folder(args.folder, args.host, args.port, args.aet, args.aec)
    print(f"sent {report.sent} instance(s) in {report.series} series; {len(report.failed)} failed; "
          f"{len(report.skipped)} non-DICOM file(s) skipped")
    for path, why in report.failed[:20]:
        print(f"  failed: {path}: {why}", file=sys.stderr)
    return 0 if report.ok and report.sent else 1


def _load_config(path: Path | None):
    """The configuration, or None after printing why it cannot be used (the command exits 2)."""
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def _cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _load_config(args.file)
    if cfg is None:
        return 2
    sys.stdout.write(config_mod.to_toml(cfg))
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    cfg = _load_config(args.file)
    if cfg is None:
        return 2
    from appliance.dicom import tls

    problems = tls.check(cfg)  # the certificates, keys and CA bundles load as the daemon will load them
    for problem in problems:
        print(f"{args.file}: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(f"{args.file}: OK")
    return 0


def _cmd_synth_ct(args: argparse.Namespace) -> int:
    from appliance.synth.study import write_synthetic_ct

    result = write_synthetic_ct(
        args.out,
        shape_zyx=args.shape,
        dose_fraction=args.dose,
        seed=args.seed,
        fov_mm=args.fov,
        slice_spacing_mm=args.slice_spacing,
        uid_root=args.uid_root or config_mod.load(args.config).dicom.uid_root,
        transfer_syntax=args.transfer_syntax,
        signed=args.signed,
        z_start_mm=args.z_start,
    )
    print(f"wrote {len(result.paths)} CT instances to {args.out} "
          f"(series {result.series_uid}, dose {'noiseless' if args.dose is None else args.dose})")
    return 0


def _cmd_process(args: argparse.Namespace) -> int:
    from appliance.process import process_folder

    if not args.input.is_dir():
        print(f"not a folder: {args.input}", file=sys.stderr)
        return 2
    try:
        report = process_folder(args.input, args.output, args.pipeline, config_mod.load(args.config))
    except KeyError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2
    for uid, files in report.written.items():
        stage_s = ", ".join(f"{k} {v:.3f} s" for k, v in report.timings[uid].items())
        print(f"wrote {len(files)} instance(s) of derived series {uid} to {args.output / uid} ({stage_s})")
    for uid, reasons in report.rejected.items():
        print(f"series {uid} not processed: {'; '.join(reasons)}", file=sys.stderr)
    if not report.written and not report.rejected:
        print(f"no DICOM images found in {args.input} ({len(report.skipped)} other file(s))", file=sys.stderr)
    return 0 if report.ok else 1


def _cmd_events_schema(args: argparse.Namespace) -> int:
    import json

    from appliance.events import schema

    print(json.dumps(schema(), indent=2))
    return 0


def _cmd_events_tail(args: argparse.Namespace) -> int:
    from appliance.events_tail import tail

    try:
        tail(args.endpoint, topics=args.topic or (), count=args.count, timeout_s=args.timeout)
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_synth_ctpd(args: argparse.Namespace) -> int:
    from appliance.synth.projections import write_synthetic_projections

    result = write_synthetic_projections(
        args.out, shape_zyx=args.shape, dose_fraction=args.dose, seed=args.seed, fov_mm=args.fov,
        slice_mm=args.slice_spacing, n_views=args.views,
        uid_root=args.uid_root or config_mod.load(args.config).dicom.uid_root, z_start_mm=args.z_start,
    )
    v, r, c = result.geometry.shape
    print(f"wrote {len(result.paths)} DICOM-CT-PD views ({r} rows x {c} columns, curved detector) to {args.out} "
          f"(series {result.series_uid}, dose {'noiseless' if args.dose is None else args.dose})")
    return 0


def _model_and_cache(args: argparse.Namespace) -> tuple[Path, Path]:
    """The card ``--model`` names, else the one ``[denoise] model`` names now (the model store's
    active version, else the packaged model); and the engine cache."""
    from engines.card import CardError
    from engines.store import StoreError

    cfg = config_mod.load(args.config)
    if args.model is not None:
        return args.model, args.cache or cfg.denoise.engine_cache
    try:
        card = cfg.model_store().resolve(cfg.denoise.model).card
    except StoreError as exc:
        raise CardError(str(exc)) from exc
    return card, args.cache or cfg.denoise.engine_cache


def _cmd_diag(args: argparse.Namespace) -> int:
    from appliance.diag import collect, default_name

    cfg = _load_config(args.config)
    if cfg is None:
        return 2
    out = args.out or Path.cwd() / default_name()
    if out.is_dir():
        out = out / default_name()
    try:
        path, report = collect(cfg, out, logs=args.log, use_journal=not args.no_journal, since=args.since)
    except OSError as exc:
        print(f"no diagnostic bundle: {exc}", file=sys.stderr)
        return 2
    print(f"{path} ({path.stat().st_size} bytes): {', '.join(report['files'])}")
    print(f"scrubbed: {report['uids_tokenised']} UID(s) tokenised, {report['person_names_removed']} person name(s) "
          f"and {report['patient_values_removed']} patient value(s) removed")
    for note in report["notes"]:
        print(f"note: {note}")
    return 0


def _store(args: argparse.Namespace):
    return config_mod.load(args.config).model_store()


def _cmd_models_list(args: argparse.Namespace) -> int:
    from engines.store import StoreError

    store = _store(args)
    try:
        rows = store.rows()
    except StoreError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"model store {store.root} (keyring: {store.keyring or 'none: hashes checked, signatures not'})")
    for r in rows:
        mark = "*" if r.active else " "
        extra = f"  installed {r.installed_at} by {r.installed_by}" if r.installed_at else ""
        signer = f"  signed by {r.signer}" if r.signer else ("  unsigned" if r.origin == "store" else "")
        print(f"{mark} {r.name}  {r.version}  sha256 {r.sha256[:12]}...{extra}{signer}")
    print("(* active: what [denoise] model = NAME uses for new jobs)")
    return 0


def _cmd_models_install(args: argparse.Namespace) -> int:
    from engines.store import StoreError

    store = _store(args)
    try:
        row = store.install(args.card, signature=args.signature, activate=args.activate)
    except StoreError as exc:
        print(f"model not installed: {exc}", file=sys.stderr)
        return 2
    state = "installed and active" if row.active else f"installed (activate: appliance models activate {row.name} " \
                                                       f"{row.version})"
    print(f"{row.name} {row.version}: {state}; sha256 {row.sha256[:12]}...; "
          f"{'signed by ' + row.signer if row.signer else 'signature not checked (no keyring)'}")
    return 0


def _cmd_models_switch(args: argparse.Namespace) -> int:
    """``models activate NAME VERSION`` and ``models rollback NAME``."""
    from engines.store import StoreError

    store = _store(args)
    activate = args.models_command == "activate"
    try:
        before, after = store.activate(args.name, args.version) if activate else store.rollback(args.name)
    except StoreError as exc:
        print(f"not {'activated' if activate else 'rolled back'}: {exc}", file=sys.stderr)
        return 2
    print(f"{args.name}: {before} -> {after}; the daemon loads it before its next job")
    return 0


def _cmd_engines_verify(args: argparse.Namespace) -> int:
    from engines.card import CardError
    from engines.manage import verify

    try:
        model, _ = _model_and_cache(args)
        print(verify(model))
    except CardError as exc:
        print(f"model refused: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_engines_build(args: argparse.Namespace) -> int:
    from engines.build import EngineBuildError
    from engines.card import CardError
    from engines.manage import build
    from engines.runtime import BackendUnavailable

    try:
        model, cache = _model_and_cache(args)
        key, path = build(model, cache, args.compute_capability, args.precision, args.max_batch)
    except (CardError, EngineBuildError, BackendUnavailable) as exc:
        print(f"engine not built: {exc}", file=sys.stderr)
        return 2
    print(f"engine {key}: {path}")
    return 0


def _cmd_engines_list(args: argparse.Namespace) -> int:
    from engines.manage import listing

    cache = args.cache or config_mod.load(args.config).denoise.engine_cache
    rows = listing(cache)
    print("\n".join(rows) if rows else f"no engines in {cache}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance", description="Scanner-side CT/MR inference appliance")
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground (SIGTERM drains and exits 0)")
    run.add_argument("--config", type=Path, help="TOML file (default: $APPLIANCE_CONFIG, /etc/appliance/appliance.toml, built-in)")
    run.add_argument("--log-level", default="INFO")
    run.set_defaults(func=_cmd_run)

    for name, helptext in (("echo", "C-ECHO a DICOM peer"), ("send", "C-STORE every DICOM file of a folder")):
        c = sub.add_parser(name, help=helptext)
        if name == "send":
            c.add_argument("folder", type=Path)
        c.add_argument("host")
        c.add_argument("port", type=int)
        c.add_argument("--aet", default="APPLIANCE_SCU", help="calling AE title")
        c.add_argument("--aec", default="ANY-SCP", help="called AE title")
        c.set_defaults(func=_cmd_echo if name == "echo" else _cmd_send)

    cfg = sub.add_parser("config", help="show or check a configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    show = cfg_sub.add_parser("show", help="print the effective configuration as TOML")
    show.add_argument("file", nargs="?", type=Path)
    show.set_defaults(func=_cmd_config_show)
    check = cfg_sub.add_parser("check", help="validate a configuration file")
    check.add_argument("file", type=Path)
    check.set_defaults(func=_cmd_config_check)

    proc = sub.add_parser("process", help="run a pipeline on a folder of DICOM files, no network")
    proc.add_argument("--pipeline", default="passthrough")
    proc.add_argument("--config", type=Path, default=None)
    proc.add_argument("input", type=Path)
    proc.add_argument("output", type=Path)
    proc.set_defaults(func=_cmd_process)

    events = sub.add_parser("events", help="the ZeroMQ event stream")
    events_sub = events.add_subparsers(dest="events_command", required=True)
    es = events_sub.add_parser("schema", help="print the JSON Schema of every event")
    es.set_defaults(func=_cmd_events_schema)
    et = events_sub.add_parser("tail", help="print events as they happen")
    et.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5556")
    et.add_argument("--topic", action="append", help="only these topics (repeatable)")
    et.add_argument("--count", type=int, default=None, help="stop after this many events")
    et.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    et.set_defaults(func=_cmd_events_tail)

    eng = sub.add_parser("engines", help="denoiser models and their TensorRT engines")
    eng_sub = eng.add_subparsers(dest="engines_command", required=True)
    for name, helptext, func in (("verify", "check a model and its card as the daemon would", _cmd_engines_verify),
                                 ("build", "build the TensorRT engine into the cache", _cmd_engines_build),
                                 ("list", "list the engines in the cache", _cmd_engines_list)):
        e = eng_sub.add_parser(name, help=helptext)
        e.add_argument("--model", type=Path, default=None, help="model card (default: denoise.model)")
        e.add_argument("--cache", type=Path, default=None, help="engine cache (default: denoise.engine_cache)")
        e.add_argument("--config", type=Path, default=None)
        if name == "build":
            e.add_argument("--compute-capability", default=None, help="e.g. 8.9; default: the local GPU")
            e.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
            e.add_argument("--max-batch", type=int, default=16)
        e.set_defaults(func=func)

    models = sub.add_parser("models", help="denoiser models on this box: install, activate, roll back (model store)")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    ml = models_sub.add_parser("list", help="packaged and installed models, the active one marked")
    mi = models_sub.add_parser("install", help="install a model (card + ONNX beside it) as a new version")
    mi.add_argument("card", type=Path, help="the model card (TOML); its ONNX file beside it")
    mi.add_argument("--signature", type=Path, default=None,
                    help="detached CMS signature of the card (default: CARD.sig when present; required with a keyring)")
    mi.add_argument("--activate", action="store_true", help="make it the active version at once")
    ma = models_sub.add_parser("activate", help="make an installed version (or 'packaged') the active one")
    ma.add_argument("name")
    ma.add_argument("version")
    mr = models_sub.add_parser("rollback", help="back to the version active before the current one")
    mr.add_argument("name")
    for m, func in ((ml, _cmd_models_list), (mi, _cmd_models_install), (ma, _cmd_models_switch),
                    (mr, _cmd_models_switch)):
        m.add_argument("--config", type=Path, default=None)
        m.set_defaults(func=func)

    diag = sub.add_parser("diag", help="a diagnostic bundle for the vendor: logs, state, configuration, versions; "
                          "no patient data (README.txt inside says what was removed)")
    diag.add_argument("--out", type=Path, default=None,
                      help="the .tar.gz to write, or a folder for it (default: appliance-diag-HOST-TIME.tar.gz here)")
    diag.add_argument("--log", type=Path, action="append", default=[], help="a log file to add (repeatable)")
    diag.add_argument("--no-journal", action="store_true", help="leave the systemd journal out")
    diag.add_argument("--since", default="-7d", help="journal entries since this (journalctl --since; default -7d)")
    diag.add_argument("--config", type=Path, default=None)
    diag.set_defaults(func=_cmd_diag)

    from bench.cli import add_arguments as add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="latency benchmarks, report and budget gate (QA)"))

    synth = sub.add_parser("synth", help="make synthetic studies")
    synth_sub = synth.add_subparsers(dest="synth_command", required=True)
    ct = synth_sub.add_parser("ct", help="a synthetic CT series of an anatomical phantom")
    ct.add_argument("--out", type=Path, required=True)
    ct.add_argument("--shape", type=_shape, default=(64, 512, 512), help="COLUMNSxROWSxSLICES (default 512x512x64)")
    ct.add_argument("--dose", type=float, default=None,
                    help="dose fraction in (0, 1] for simulated noise (1 = full dose); omit for a noiseless series")
    ct.add_argument("--seed", type=int, default=0)
    ct.add_argument("--fov", type=float, default=400.0, help="in-plane field of view, mm")
    ct.add_argument("--slice-spacing", type=float, default=2.5, help="mm")
    ct.add_argument("--z-start", type=float, default=0.0,
                    help="mm below the lung apex where the slab starts (~180 reaches liver and kidneys)")
    ct.add_argument("--uid-root", default=None, help="UID prefix (default: dicom.uid_root of the configuration)")
    ct.add_argument("--config", type=Path, default=None)
    ct.add_argument("--transfer-syntax", default="1.2.840.10008.1.2.1", help="UID (default Explicit VR Little Endian)")
    ct.add_argument("--signed", action="store_true", help="int16 pixels, intercept 0, instead of uint16 with -1024")
    ct.set_defaults(func=_cmd_synth_ct)
    pd = synth_sub.add_parser("ct-pd", help="synthetic CT projection data (DICOM-CT-PD) of the phantom slab")
    pd.add_argument("--out", type=Path, required=True)
    pd.add_argument("--shape", type=_shape, default=(8, 128, 128), help="COLUMNSxROWSxSLICES of the phantom slab")
    pd.add_argument("--dose", type=float, default=0.25, help="dose fraction in (0, 1]; projection-domain noise")
    pd.add_argument("--views", type=int, default=360, help="views per rotation")
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--fov", type=float, default=400.0)
    pd.add_argument("--slice-spacing", type=float, default=2.5)
    pd.add_argument("--z-start", type=float, default=250.0)
    pd.add_argument("--uid-root", default=None)
    pd.add_argument("--config", type=Path, default=None)
    pd.set_defaults(func=_cmd_synth_ctpd)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "dose", None) is not None and not 0 < args.dose <= 1:
        print("--dose must be in (0, 1]", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except config_mod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
