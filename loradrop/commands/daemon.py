"""`loradrop daemon`: run the training daemon (gRPC API, watched inbox, GPU workers)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "daemon",
        help="run the daemon: a watched inbox, a job queue, GPU workers and the gRPC API",
        description=(
            "Run the loradrop daemon. A folder of captioned images dropped into HOME/inbox becomes a job once it "
            "has been quiet for --quiet-seconds; jobs train one per GPU (one on a CPU machine) and their files land in "
            "HOME/outputs/JOB. Clients (loradrop submit/jobs/logs/tui, scripts) talk to it over gRPC: by default a "
            "unix socket HOME/daemon.sock only you can open. SIGTERM stops it cleanly; the running job resumes on the next start."
        ),
    )
    p.add_argument(
        "--home",
        metavar="DIR",
        help="the daemon's folder (default: $XDG_DATA_HOME/loradrop, i.e. ~/.local/share/loradrop)",
    )
    p.add_argument(
        "--model", metavar="CKPT", help="default base checkpoint for jobs (default: the embedded tiny twin)"
    )
    p.add_argument("--listen", metavar="ADDR", help="unix:PATH or HOST:PORT (default: unix:HOME/daemon.sock)")
    p.add_argument("--tls-cert", metavar="FILE", help="TLS certificate (PEM) for a TCP listener")
    p.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM) for a TCP listener")
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the token every client must send (required with TCP)",
    )
    p.add_argument(
        "--insecure-loopback",
        action="store_true",
        help="allow TCP without TLS and token, on a loopback address only",
    )
    p.add_argument(
        "--quiet-seconds",
        type=float,
        default=10.0,
        metavar="S",
        help="how long an inbox folder must be unchanged before it starts (default: 10)",
    )
    p.add_argument(
        "--on-job-end",
        metavar="CMD",
        help="shell command run when a job ends; LORADROP_JOB_ID, LORADROP_JOB_STATE, LORADROP_JOB_NAME, LORADROP_ARTIFACTS, LORADROP_FINAL/RESIZED/CHOPPED are set",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=1,
        metavar="N",
        help="times a job resumes after its worker died (out of memory, crash) before it fails (default: 1)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="training workers (default: one per visible GPU, one on a CPU machine; 0: queue only)",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the training workers as Ray actors across a cluster, one per GPU: `auto` joins the "
        "cluster this machine belongs to (`ray start --head`), or give the head's HOST:PORT; needs "
        "loradrop[ray] on every node (see docs/cluster.md)",
    )
    p.add_argument(
        "--ray-resource",
        default="GPU",
        metavar="NAME",
        help="the Ray resource one worker holds (default: GPU; a custom resource lets CPU nodes stand in)",
    )
    p.add_argument(
        "--ray-transfer",
        choices=("auto", "always"),
        default="auto",
        help="auto: a node that sees the daemon's home (a shared filesystem) works in it, others get a "
        "copy of each job's files; always: every node works in a copy (default: auto)",
    )
    p.add_argument(
        "--heartbeat-seconds",
        type=float,
        default=60.0,
        metavar="S",
        help="a worker silent this long (frozen, stopped) is killed and its job resumed (default: 60)",
    )
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=60.0,
        metavar="S",
        help="an upload that sends nothing, or a download nobody reads, this long is ended (default: 60)",
    )
    p.add_argument(
        "--on-job-end-seconds",
        type=float,
        default=300.0,
        metavar="S",
        help="the most an --on-job-end command may run before it is ended (default: 300)",
    )
    p.add_argument(
        "--captioner",
        metavar="PATH",
        help="caption images that have no caption with this local model before training: a WD14 tagger folder (model.onnx, selected_tags.csv) or a transformers VLM folder (see docs/captions.md)",
    )
    p.add_argument(
        "--captioner-kind",
        choices=("tagger", "vlm"),
        help="what --captioner holds (default: told by its files)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from loradrop.daemon.config import DaemonConfig, Listen
    from loradrop.daemon.home import Home, default_home
    from loradrop.daemon.server import serve
    from loradrop.errors import UserError

    if args.model and not Path(args.model).expanduser().is_file():
        raise UserError(
            f"--model {args.model} is not a file; give a single-file SDXL checkpoint (.safetensors)."
        )
    captioner = Path(args.captioner).expanduser().resolve() if args.captioner else None
    if captioner is not None and not captioner.exists():
        raise UserError(
            f"--captioner {args.captioner} does not exist; give a WD14 tagger folder (model.onnx, selected_tags.csv) or a transformers model folder (config.json)."
        )
    if captioner is not None:
        from loradrop.daemon.captions import check_model

        check_model(captioner, args.captioner_kind or "", "--captioner")
    if args.captioner_kind and captioner is None:
        raise UserError("--captioner-kind says what --captioner holds; give --captioner PATH too.")
    home = Home(Path(args.home).expanduser() if args.home else default_home())
    listen = (
        Listen.parse(args.listen)
        if args.listen
        else Listen(unix=home.root.expanduser().absolute() / "daemon.sock")
    )
    config = DaemonConfig(
        home=home,
        listen=listen,
        model=str(Path(args.model).expanduser().resolve()) if args.model else None,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        token_file=Path(args.token_file) if args.token_file else None,
        insecure_loopback=args.insecure_loopback,
        quiet_seconds=args.quiet_seconds,
        on_job_end=args.on_job_end,
        max_retries=args.max_retries,
        workers=args.workers,
        heartbeat_seconds=args.heartbeat_seconds,
        idle_seconds=args.idle_seconds,
        hook_seconds=args.on_job_end_seconds,
        captioner=str(captioner) if captioner else None,
        captioner_kind=args.captioner_kind,
        ray=args.ray,
        ray_resource=args.ray_resource,
        ray_transfer=args.ray_transfer,
    )
    serve(config)
    return 0
